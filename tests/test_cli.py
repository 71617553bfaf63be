"""The command line a newcomer meets: help, names, settings, curves, predictions and interruptions."""

from __future__ import annotations

import json

import pytest

from fasttrain.cli import main


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _quick(shapes_root, runs, *extra: str) -> list[str]:
    sets = [
        f"data.root={shapes_root}",
        "data.image_size=32",
        "data.resize_size=32",
        "data.loader=torch",
        "data.workers=0",
        "model.name=smallcnn",
        "model.width=8",
        "train.epochs=1",
        "train.batch_size=32",
        "train.max_steps=2",
        "train.log_every=1",
        f"train.runs_dir={runs}",
        "runtime.device=cpu",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def test_help_of_every_command_and_of_make_data(capsys):
    code, out, _ = _run_cli(capsys, "--help")
    assert code == 0 and "examples:" in out and "fasttrain config show" in out and "make-data" in out
    for command, expected in (
        ("train", "--nproc"),
        ("autotune", "tune.max_batch"),
        ("bench", "bench.steps"),
        ("check-data", "--skip-list"),
        ("config", "--changed"),
        ("plot", "RUN_DIR"),
    ):
        code, out, _ = _run_cli(capsys, command, "--help")
        assert code == 0 and expected in out, command
    code, out, _ = _run_cli(capsys, "train", "--help")
    assert "(default: 1)" in out and "(default: None)" not in out  # defaults shown where they mean something
    code, out, err = _run_cli(capsys, "make-data", "--help")  # was "unrecognized arguments: --help"
    assert code == 0 and "shapes" in out and "imagenet" in out


def test_an_unknown_config_name_lists_the_packaged_ones(capsys):
    code, _, err = _run_cli(capsys, "train", "catfsh")
    assert (
        code == 2
        and "packaged: catfish, cifar10-speedrun-cpu, cifar10-speedrun, convnet" in err
        and "did you mean catfish?" in err
    )


def test_a_folder_given_as_the_config_says_what_to_do_with_it(capsys, tmp_path):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    code, _, err = _run_cli(capsys, "train", str(tmp_path / "photos"))
    assert (
        code == 2
        and f"a folder, not a config; a folder of images trains with --set data.root={tmp_path / 'photos'}" in err
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")
    code, _, err = _run_cli(capsys, "train", str(tmp_path / "run"))
    assert code == 2 and f"a run folder, not a config: continue it with --resume {tmp_path / 'run'}" in err


def test_a_runs_dir_that_is_a_file_and_nproc_0_are_refused_before_any_work(capsys, tmp_path, monkeypatch):
    import fasttrain.engine

    monkeypatch.setattr(fasttrain.engine, "prepare", lambda *a, **k: pytest.fail("prepared the run"))
    (tmp_path / "my.toml").write_text("")
    code, _, err = _run_cli(capsys, "train", "--set", f"train.runs_dir={tmp_path / 'my.toml'}")
    assert code != 0 and f"train.runs_dir: cannot write to {tmp_path / 'my.toml'}: " in err and "not a folder" in err
    code, _, err = _run_cli(capsys, "train", "--nproc", "0")
    assert code == 2 and "argument --nproc: 0: at least 1 process" in err


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly_and_other_pipes_are_errors(capsys, monkeypatch):
    """`fasttrain config show | head` printed "fasttrain: error: [Errno 32] Broken pipe" and exited 1."""
    import subprocess
    import sys

    import fasttrain.cli

    proc = subprocess.Popen(
        [sys.executable, "-m", "fasttrain", "config", "show"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 0 and err == b""

    def worker_pipe(args):  # a pipe of the run's own (a worker's), stdout intact: an error as any other
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(fasttrain.cli, "cmd_config", worker_pipe)
    code, _, err = _run_cli(capsys, "config", "show")
    assert code == 1 and "Broken pipe" in err


def test_a_packaged_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """catfish's data.root is the folder catfish beside where it runs: `fasttrain train catfish` there."""
    from fasttrain.config import config_path, packaged_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "catfish" / "train" / "cat").mkdir(parents=True)
    assert config_path("catfish") == packaged_config("catfish")


def test_a_setting_given_as_the_config_points_to_set(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli(capsys, "train", "train.epochs=2")
    assert code == 2 and "a setting is given with --set (--set train.epochs=2)" in err
    code, _, err = _run_cli(capsys, "train", "data.root=/x/photos")  # a path in the value
    assert code == 2 and "a setting is given with --set (--set data.root=/x/photos)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["train", "catfish", "--epochs", "1"],
            "--epochs 1; settings are given as --set section.key=value: --set train.epochs=1",
        ),
        (["autotune", "quickstart", "--lr=0.1"], "--set optim.lr=0.1"),
        (
            ["train", "--frobnicate"],
            "--frobnicate; settings are given as --set section.key=value (fasttrain config show",
        ),
        (["predict", "run", "a.jpg", "--epochs", "1"], "unrecognized arguments: --epochs 1\n"),
    ],
)
def test_an_unknown_option_is_refused_by_its_command_with_the_setting_it_means(capsys, args, said):
    """`fasttrain train catfish --epochs 1` printed the top level's usage and no word of --set."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: fasttrain {args[0]}" in err and said in err, err


def test_a_packaged_name_beside_a_users_file_of_that_name_says_which_runs(tmp_path, monkeypatch, caplog):
    """`fasttrain train catfish` beside one's own catfish.toml took the packaged one without a word."""
    import logging

    from fasttrain.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "catfish.toml").write_text('name = "mine"\n')
    with caplog.at_level(logging.WARNING):
        assert load_config("catfish").name == "catfish"
    assert "config catfish: the packaged one; catfish.toml here is another" in caplog.text
    assert load_config("catfish.toml", "train.epochs=3").name == "mine"  # one override may come as a string
    assert load_config("catfish.toml", "train.epochs=3").train.epochs == 3


def test_config_list_and_show(capsys):
    code, out, _ = _run_cli(capsys, "config", "list")
    assert code == 0 and "quickstart" in out and "resnet50-imagenet" in out and "ResNet-50 on ImageNet" in out
    code, out, _ = _run_cli(capsys, "config", "show", "catfish", "--set", "optim.lr=0.5")
    assert code == 0 and "[optim]" in out
    lines = out.splitlines()
    i = lines.index(next(ln for ln in lines if ln.startswith("optim.lr = ")))
    assert lines[i] == "optim.lr = 0.5  (default 0.1)" and lines[i + 1].startswith("    float: Peak learning rate")
    code, out, _ = _run_cli(capsys, "config", "show", "catfish", "--changed")
    keys = [ln.split(" = ")[0] for ln in out.splitlines() if " = " in ln]
    assert "data.image_size" in keys and "optim.momentum" not in keys
    code, out, _ = _run_cli(capsys, "config", "show", "--changed")  # printed nothing at all
    assert code == 0 and out.startswith("no setting differs from the defaults") and "config show quickstart" in out


def test_a_run_plots_predicts_from_its_folder_and_says_how_to_resume_after_ctrl_c(
    shapes_root, tmp_path, capsys, monkeypatch
):
    runs = tmp_path / "runs"
    code, out, _ = _run_cli(capsys, "train", *_quick(shapes_root, runs), "-q")
    assert code == 0
    (run,) = runs.iterdir()
    code, out, _ = _run_cli(capsys, "plot", str(run))
    assert code == 0 and (run / "curves.png").is_file()
    image = next(shapes_root.rglob("*.png"))
    code, out, _ = _run_cli(capsys, "predict", str(run), str(image), "--json")  # a run folder: its best.pt
    assert code == 0 and json.loads(out)["class"] in ("circle", "square", "triangle")

    from fasttrain.tasks.classify import ClassifyTask

    def ctrl_c(self, state, batch, run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(ClassifyTask, "on_step_end", ctrl_c)
    code, _, err = _run_cli(capsys, "train", *_quick(shapes_root, tmp_path / "runs2"), "-q")
    (run2,) = (tmp_path / "runs2").iterdir()
    assert code == 130 and f"fasttrain train --resume {run2}" in err and "RUN_DIR" not in err


def test_ctrl_c_inside_torchs_import_says_interrupted_without_a_traceback(capsys, monkeypatch):
    """A Ctrl-C while torch imports leaves half-made modules in sys.modules; the exit path imported through them."""
    import sys
    import types

    import torch

    import fasttrain.cli

    half_made = types.ModuleType("torch.distributed")  # its import stopped before is_initialized was defined
    monkeypatch.setitem(sys.modules, "torch.distributed", half_made)
    monkeypatch.setattr(torch, "distributed", half_made)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fasttrain.cli, "cmd_train", interrupted)
    code, _, err = _run_cli(capsys, "train")
    assert code == 130 and err.strip() == "fasttrain: interrupted"
    monkeypatch.undo()
    # torch's own import failed: torch left sys.modules, its whole torch.distributed stayed; importing it again
    # would run torch's __init__ a second time ("duplicate registrations")
    monkeypatch.setattr(fasttrain.cli, "cmd_train", interrupted)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr("fasttrain.distributed.shutdown", lambda: pytest.fail("imported through a failed torch"))
    code, _, err = _run_cli(capsys, "train")
    assert code == 130 and err.strip() == "fasttrain: interrupted"


def test_log_lines_of_a_run_reach_train_log_under_quiet(shapes_root, tmp_path, capsys):
    """-q silences the console, not the run's own log: train.log keeps the INFO lines and the step lines."""
    runs = tmp_path / "runs"
    assert _run_cli(capsys, "train", *_quick(shapes_root, runs), "-q")[0] == 0
    (run,) = runs.iterdir()
    text = (run / "train.log").read_text()
    assert "run folder" in text and "epoch 1/1 step 1/2 | loss" in text and "epoch 1/1 | train_loss" in text
    err = capsys.readouterr().err
    assert "run folder" not in err  # the console under -q shows warnings only


@pytest.mark.parametrize("nproc_args", [["--nproc", "1"], ["--nproc=1"]])
def test_nproc_one_trains_in_this_process(shapes_root, tmp_path, capsys, nproc_args):
    code, _, _ = _run_cli(capsys, "train", *_quick(shapes_root, tmp_path / "runs"), *nproc_args, "-q")
    assert code == 0 and len(list((tmp_path / "runs").iterdir())) == 1


def test_without_a_terminal_progress_is_plain_lines_not_bar_fragments(shapes_root, tmp_path, capsys):
    code, _, err = _run_cli(capsys, "train", *_quick(shapes_root, tmp_path / "runs"))
    assert code == 0 and "\r" not in err  # no carriage-return fragments of a bar in a CI log
    steps = [ln for ln in err.splitlines() if "epoch 1/1 step" in ln]
    assert len(steps) == 2 and "img/s" in steps[0] and "lr " in steps[0] and "ETA" in steps[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--time-budget", "ten minutes"], "--time-budget: 'ten minutes' is not a duration"),
        (["autotune", "--time-budget", "ten"], "argument --time-budget: 'ten' is not a duration"),
        (["bench", "--run", "x"], "bench: --run RUN_DIR and --target METRIC=VALUE go together"),
        (["bench", "--run", "x", "--target", "val_acc"], "--target: expected METRIC=VALUE"),
        (["bench", "--run", "/nonexistent/run", "--target", "val_acc=0.9"], "has no metrics.jsonl"),
    ],
)
def test_time_budget_and_target_mistakes_are_one_line(capsys, argv, message):
    code, _, err = _run_cli(capsys, *argv)
    assert code != 0 and message in err and "Traceback" not in err


def test_time_budget_becomes_the_setting(capsys, shapes_root, tmp_path):
    code, out, _ = _run_cli(capsys, "train", "--time-budget", "1m", *_quick(shapes_root, tmp_path), "-q")
    assert code == 0
    (run,) = tmp_path.iterdir()
    from fasttrain.config import load_config

    assert load_config(run / "config.toml").train.time_budget_s == 60.0


def test_out_of_memory_is_one_line_saying_which_memory_ran_out():
    from fasttrain.cli import _oom_line

    gpu = _oom_line(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.7 GiB total)"))
    assert gpu.startswith("out of GPU memory (an allocation of 2.00 GiB failed)") and "train.batch_size" in gpu
    dali = _oom_line(RuntimeError("[DALI] Can't allocate 1048576 bytes on device 0."))  # DALI's memory pool
    assert dali.startswith("out of GPU memory (an allocation of 1048576 bytes failed)")
    host = _oom_line(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"))
    assert host.startswith("out of host memory")


def test_a_config_error_under_nproc_is_said_once_before_any_worker_starts(capsys, monkeypatch):
    """It was found by every worker after torchrun's start: about 7 s, said three times among torchrun's lines."""
    import fasttrain.cli as cli

    monkeypatch.setattr(cli, "_torchrun", lambda *a: pytest.fail("no worker starts for a config error"))
    assert main(["train", "--nproc", "2", "--set", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.count("optim.lr: must be > 0") == 1
