"""Resume and checkpoints: what may change on resume, damaged checkpoints, the run's config kept current."""

import json

import pytest
import torch
from tinyrun import tiny_cfg as _tiny_cfg

from fasttrain.checkpoint import CheckpointError, check_resume_config, load_checkpoint
from fasttrain.cli import main
from fasttrain.config import Config, ConfigError, apply_overrides, load_config
from fasttrain.engine import train


def tiny_cfg(root, runs, *extra):
    return _tiny_cfg(root, runs, *extra, epochs=1, max_steps=2)


@pytest.fixture(scope="module")
def run_dir(shapes_root, tmp_path_factory):
    """A finished one-epoch run (module-wide: tests that change it copy it first)."""
    return train(tiny_cfg(shapes_root, tmp_path_factory.mktemp("runs")), progress=False).run_dir


def copy_run(run_dir, tmp_path):
    import shutil

    return shutil.copytree(run_dir, tmp_path / run_dir.name)


@pytest.mark.parametrize(
    "setting, shown",
    [
        ("model.width=16", "model.width (8 -> 16)"),
        ("data.image_size=24", "data.image_size (32 -> 24)"),
        ("data.channels=1", "data.channels (3 -> 1)"),
        ("optim.lr=0.1", "optim.lr (0.005 -> 0.1)"),
        ("task.name=regress", "task.name ('classify' -> 'regress')"),
        ("train.batch_size=16", "train.batch_size (32 -> 16)"),
    ],
)
def test_resume_names_what_cannot_change(run_dir, capsys, setting, shown):
    before = (run_dir / "config.toml").read_text()
    code = main(["train", "--resume", str(run_dir), "--set", "train.epochs=2", "--set", setting, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert shown in err and "cannot change on resume" in err and "train.epochs" in err  # what may change
    assert (run_dir / "config.toml").read_text() == before  # refused before anything was written
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["epoch"] == 1


def test_resume_may_change_length_and_how_it_runs():
    saved = Config()
    new = apply_overrides(
        saved,
        [
            "train.epochs=20",
            "train.log_every=5",
            "train.checkpoint_every_steps=100",
            "runtime.compile=off",
            "runtime.device=cpu",
            "data.workers=2",
            "data.loader=torch",
            "data.root=/moved/data",
            "tune.max_batch=64",
            "name=other",
        ],
    )
    check_resume_config(saved, new, "run")  # no error
    with pytest.raises(ConfigError, match=r"schedule\.name .*, train\.max_steps"):
        check_resume_config(saved, apply_overrides(saved, ["schedule.name=step", "train.max_steps=3"]), "run")
    crops = apply_overrides(saved, ["data.random_resized_crop=false"])  # the augmentation is what was trained on
    with pytest.raises(ConfigError, match=r"data\.flip_alternate \(False -> True\), data\.translate \(0 -> 2\)"):
        check_resume_config(crops, apply_overrides(crops, ["data.translate=2", "data.flip_alternate=true"]), "run")


def test_resume_with_more_epochs_updates_config_toml(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    result = train(resume=run, overrides=["train.epochs=2"], progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert load_config(run / "config.toml").train.epochs == 2  # the run folder says what it ran
    assert not list(run.glob(".*.tmp"))


def test_resume_with_fewer_epochs_than_trained_is_refused_and_changes_nothing(shapes_root, tmp_path, capsys):
    run = train(_tiny_cfg(shapes_root, tmp_path, epochs=2, max_steps=1), progress=False).run_dir
    before = (run / "config.toml").read_text()
    code = main(["train", "--resume", str(run), "--set", "train.epochs=1", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.epochs = 1 is less than this run has trained (2 epochs, 2 steps" in err, err
    assert f"fasttrain train {run / 'config.toml'} --set train.epochs=1" in err
    assert (run / "config.toml").read_text() == before
    with pytest.raises(ConfigError, match=r"train.total_steps = 1 is less than this run has trained"):
        train(resume=run, overrides=["train.total_steps=1"], progress=False)


def test_resume_that_would_drop_a_started_epoch_is_refused(shapes_root, tmp_path, monkeypatch):
    """A step checkpoint inside epoch 2 resumed with train.epochs=1: the run would end at once, the epoch's steps
    in its weights and config.toml saying one epoch."""
    from fasttrain.tasks.classify import ClassifyTask

    plain_end = ClassifyTask.on_step_end

    def killed_at_5(self, state, batch, run_dir):
        plain_end(self, state, batch, run_dir)
        if state.step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ClassifyTask, "on_step_end", killed_at_5)
    cfg = _tiny_cfg(shapes_root, tmp_path, "train.checkpoint_every_steps=1", epochs=2, max_steps=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    (run,) = tmp_path.iterdir()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["position"]["micro"] == 1  # step 4: 1 into epoch 2
    with pytest.raises(ConfigError, match=r"train.epochs = 1 is less than this run has trained \(1 epochs and part"):
        train(resume=run, overrides=["train.epochs=1"], progress=False)


def _damage(run_dir, tmp_path, name, change):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("noconfig.pt", lambda c: c.pop("config"), "has no 'config' table"),
        ("nostate.pt", lambda c: c.pop("state"), "has no 'state'"),
        ("nomodules.pt", lambda c: c["state"].pop("modules"), "has no 'modules' weights"),
        (
            "fewnames.pt",
            lambda c: c["meta"].update(class_names=["circle", "square"]),
            "2 class names for the model's 3 outputs",
        ),
        ("badconfig.pt", lambda c: c["config"]["model"].update(width=-3), r"its config is not valid: model\.width"),
        (
            "wrongweights.pt",
            lambda c: c["state"]["modules"]["model"].update(
                {k: v[:1] for k, v in c["state"]["modules"]["model"].items() if v.ndim}
            ),
            "weights do not fit",
        ),
    ],
)
def test_damaged_checkpoints_give_one_named_error(run_dir, tmp_path, shapes_root, capsys, name, change, message):
    path = _damage(run_dir, tmp_path, name, change)
    image = next((shapes_root / "val" / "circle").iterdir())
    code = main(["predict", str(path), str(image), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("rng"), "no RNG states"),
        (lambda c: c["state"].pop("optimizers"), "no 'optimizers'"),
        (lambda c: c["state"]["modules"].update(extra={}), "modules"),
    ],
)
def test_damaged_checkpoint_refused_on_resume(run_dir, tmp_path, change, message):
    run = copy_run(run_dir, tmp_path)
    _damage(run, run / "checkpoints", "last.pt", change)
    with pytest.raises(CheckpointError, match=message) as e:
        train(resume=run, overrides=["train.epochs=2"], progress=False)
    assert str(run / "checkpoints" / "last.pt") in str(e.value)


def test_resume_keeps_this_runs_fused_optimizer_and_its_scaler_works(run_dir, monkeypatch):
    """A checkpoint written with foreach kernels (any CPU run), resumed where the runtime builds fused ones (CUDA):
    torch's load_state_dict would take the saved groups (fused=None) and fp16's scaler would then hand grad_scale
    to the foreach kernels, which assert. The fused kernels and an on-device step must survive the load."""
    from fasttrain.checkpoint import checkpoint_config
    from fasttrain.runtime import Runtime, runtime_for
    from fasttrain.tasks import make_task

    last = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last, resume=True)
    saved_group = ckpt["state"]["optimizers"]["model"]["param_groups"][0]
    assert saved_group["foreach"] and not saved_group.get("fused")  # what a CPU run saves
    cfg = checkpoint_config(ckpt, last)
    monkeypatch.setattr(Runtime, "optimizer_kwargs", lambda self: {"fused": True})  # what CUDA builds
    task = make_task(cfg, runtime_for(cfg), None, restoring=True)
    state = task.build_state()
    state.scalers["model"] = torch.amp.GradScaler("cpu", init_scale=8.0)  # fp16's scaler, enabled
    state.load_state_dict({**ckpt["state"], "schedulers": {}})
    opt = state.optimizers["model"]
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    steps = [s["step"] for s in opt.state.values()]
    assert steps and all(s.dtype == torch.float32 and s.item() == 2 for s in steps)
    for g in opt.param_groups:
        g["lr"] = 1e-3  # the finished schedule left 0
    before = [p.detach().clone() for p in state.modules["model"].parameters()]
    task.train_step(state, task.synthetic_batch(4, task.input_spec()))  # AssertionError without the fix
    assert any(not torch.equal(a, p) for a, p in zip(before, state.modules["model"].parameters()))
    assert all(s["step"].item() == 3 for s in opt.state.values())


@pytest.mark.gpu
def test_a_cpu_checkpoint_resumes_on_cuda_in_fp16(run_dir):
    """The first step after resuming a foreach (CPU) checkpoint on CUDA's fused optimizer with fp16's scaler."""
    from fasttrain.checkpoint import checkpoint_config
    from fasttrain.runtime import runtime_for
    from fasttrain.tasks import make_task

    last = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last, resume=True)
    cfg = apply_overrides(checkpoint_config(ckpt, last), ["runtime.device=cuda", "runtime.precision=fp16"])
    task = make_task(cfg, runtime_for(cfg, compile="off"), None, restoring=True)
    state = task.build_state()
    state.load_state_dict({**ckpt["state"], "schedulers": {}})
    assert all(g["fused"] for g in state.optimizers["model"].param_groups)
    task.train_step(state, task.synthetic_batch(4, task.input_spec()))
    torch.cuda.synchronize()


def _flip_bit_in_weights(path) -> None:
    """One flipped bit inside the first tensor record (the weights), as a failing disk or copy would leave."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 16)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the local header's length
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_one_flipped_bit_is_refused_by_name_and_best_pt_offered(run_dir, tmp_path, capsys):
    """It used to resume with exit 0 and different final weights (torch.load never checks the zip's CRC-32s)."""
    run = copy_run(run_dir, tmp_path)
    last = run / "checkpoints" / "last.pt"
    _flip_bit_in_weights(last)
    code = main(["train", "--resume", str(run), "--set", "train.epochs=2", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"checkpoint {last} is damaged" in err and "CRC-32" in err
    assert f"fasttrain train --resume {run / 'checkpoints' / 'best.pt'}" in err
    # The offered command works: the run goes on from best.pt.
    result = train(resume=run / "checkpoints" / "best.pt", overrides=["train.epochs=2"], progress=False)
    assert result.run_dir == run and result.history[-1]["epoch"] == 2


def test_any_flipped_bit_is_refused_or_changes_nothing(tmp_path):
    """Property over random single-bit flips anywhere in a small checkpoint: refused by name, or the loaded
    state is exactly the saved one (a bit in zip padding). Never different weights."""
    import random

    from fasttrain.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = torch.nn.Linear(12, 5)
    payload = {"config": {}, "state": {"modules": {"m": m.state_dict()}}}
    data = save_checkpoint(tmp_path / "a.pt", payload).read_bytes()
    rng = random.Random(0)
    refused = 0
    for _ in range(120):
        raw = bytearray(data)
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        (tmp_path / "b.pt").write_bytes(bytes(raw))
        try:
            got = load_checkpoint(tmp_path / "b.pt")
        except CheckpointError as e:
            assert str(tmp_path / "b.pt") in str(e) and "\n" not in str(e)
            refused += 1
            continue
        for k, v in m.state_dict().items():
            assert torch.equal(got["state"]["modules"]["m"][k], v)
    assert refused > 60


def test_resume_without_last_pt_says_why_and_what_to_run(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    (run / "checkpoints" / "last.pt").unlink()
    code = main(["train", "--resume", str(run), "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "stopped before its first checkpoint" in err and "deleted" in err
    assert f"fasttrain train --resume {run / 'checkpoints' / 'best.pt'}" in err
    (run / "checkpoints" / "best.pt").unlink()
    main(["train", "--resume", str(run), "-q"])
    err = capsys.readouterr().err.strip()
    assert f"start again (fasttrain train {run / 'config.toml'})" in err, err
    config = run / "config.toml"  # a run of a model given from Python: the command line cannot build it
    config.write_text(config.read_text().replace('[model]\nname = "', '[model]\nname = "custom"\nold = "'))
    from fasttrain.checkpoint import alternatives

    said = alternatives(run / "checkpoints" / "last.pt", resume=True)
    assert f"start again from Python, train(load_config('{config}'), model=...)" in said, config.read_text()


def test_resume_of_a_folder_that_is_not_a_run_writes_nothing_into_it(shapes_root, tmp_path, capsys):
    import shutil

    data = shutil.copytree(shapes_root, tmp_path / "photos")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    code = main(["train", "--resume", str(data), "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert f"{data} is not a run folder (it holds no config.toml, checkpoints/ or train.log)" in err
    assert f"fasttrain train CONFIG --set data.root={data}" in err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # no .lock left in the user's folder


def test_a_pickle_payload_is_refused_in_one_line_without_advice_to_lower_the_guard(tmp_path, capsys):
    import os as _os

    class Payload:
        def __reduce__(self):
            return (_os.system, ("echo owned > /dev/null",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "config": {}, "state": Payload()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refused" in msg and "system" in msg
    assert "weights_only" not in msg and "trusted" not in msg


def test_a_checkpoint_reads_cuda_generators_only_where_the_process_started_cuda(monkeypatch):
    """Reading CUDA's generators starts CUDA: a run on the CPU of a GPU machine made a context on GPU 0 at every
    checkpoint. A process that never started CUDA never drew from it: nothing to keep, nothing to put back."""
    from fasttrain import checkpoint as C

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: pytest.fail("started CUDA"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: pytest.fail("started CUDA"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    state = C.rng_state()
    assert state["cuda"] == []
    C.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})  # a CUDA run's checkpoint, here


def test_a_checkpoint_keeps_its_own_gpus_stream_and_puts_it_back_on_whichever_gpu_resumes(monkeypatch):
    """One stream, the process's current GPU's (a rank's own): a rank resumed where the machine shows another number
    of GPUs gets it back. A checkpoint with every visible GPU's (older ones) is put back where the count matches."""
    from fasttrain import checkpoint as C

    mine, put = torch.arange(16, dtype=torch.uint8), {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: mine)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every GPU's"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: put.setdefault("current", s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: put.setdefault("all", s))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    state = C.rng_state()
    assert len(state["cuda"]) == 1 and state["cuda"][0] is mine
    C.set_rng_state(state)
    assert put == {"current": mine}
    put.clear()
    C.set_rng_state({**state, "cuda": [mine] * 4})  # an older checkpoint of a 4-GPU machine: not this one's
    assert put == {}
    C.set_rng_state({**state, "cuda": [mine] * 8})
    assert list(put) == ["all"]


def test_an_early_stop_whose_record_was_lost_is_recorded_on_resume(shapes_root, tmp_path):
    from fasttrain.io import atomic_write_text, read_jsonl

    cfg = _tiny_cfg(shapes_root, tmp_path, "train.early_stop_patience=1", "train.early_stop_min_delta=10", epochs=5)
    run = train(cfg, progress=False).run_dir
    (stop,) = _records(run, "early_stop")
    kept = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") not in ("early_stop", "finished")]
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    again = train(resume=run, progress=False)
    assert again.stopped_early and _records(run, "early_stop") == [stop]
    train(resume=run, progress=False)  # finished now: nothing written twice
    assert len(_records(run, "early_stop")) == 1 and len(_records(run, "finished")) == 1


# -- a finished run resumed -----------------------------------------------------------------------------------------
def _records(run, event=None):
    from fasttrain.io import read_jsonl

    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == event]


@pytest.fixture
def finished_run(shapes_root, tmp_path):
    """A one-epoch run with a test split, finished."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    shutil.copytree(root / "val", root / "test")
    return train(tiny_cfg(root, tmp_path / "runs"), progress=False)


def test_a_finished_run_resumed_trains_and_writes_nothing_again(finished_run, caplog):
    run = finished_run.run_dir
    reports = {p: p.stat().st_mtime_ns for p in (run / "confusion.json", run / "checkpoints" / "last.pt")}
    records = (run / "metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="fasttrain"):
        again = train(resume=run, progress=False)
    assert (run / "metrics.jsonl").read_text() == records  # not even a start-up record
    assert "run already finished at epoch 1, step 2: nothing is trained" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in reports} == reports
    assert len(_records(run, "test")) == 1 and len(_records(run, "finished")) == 1
    assert again.test_metrics == finished_run.test_metrics and again.test_weights == finished_run.test_weights
    assert again.history == finished_run.history


@pytest.mark.parametrize("lost", [("finished", "test"), ("finished",)])
def test_a_run_killed_in_its_end_reports_makes_them_on_resume(finished_run, caplog, lost):
    """No ``finished`` record (the process died after the last checkpoint, in the test evaluation or the
    reports, or after the test record): the resume evaluates and reports again, once."""
    from fasttrain.io import atomic_write_text, read_jsonl

    run = finished_run.run_dir
    kept = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") not in lost]
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    (run / "confusion.json").unlink()
    with caplog.at_level("INFO", logger="fasttrain"):
        again = train(resume=run, progress=False)
    assert "already finished" not in caplog.text and "run finished: 1 epochs" in caplog.text
    assert (run / "confusion.json").is_file()
    assert [r["test_loss"] for r in _records(run, "test")] == [finished_run.test_metrics["test_loss"]]
    assert len(_records(run, "finished")) == 1
    assert again.test_metrics == pytest.approx(finished_run.test_metrics)


def test_a_resume_on_data_that_gained_files_warns_that_the_split_was_drawn_again(shapes_root, tmp_path, caplog):
    """Files added to the data between a run and its resume re-drew the held-out validation split (images it
    had trained on could validate) with only an INFO line about the rebuilt index."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_root, data)
    first = train(_tiny_cfg(data, tmp_path / "runs", "data.val_fraction=0.2", epochs=1), progress=False)
    caplog.clear()
    train(resume=first.run_dir, progress=False, overrides=["train.epochs=2"])  # the same data: no warning
    assert "the data changed" not in caplog.text
    images = sorted(p for p in (data / "train").rglob("*.png"))[:5]
    for i, image in enumerate(images):
        shutil.copy(image, image.parent / f"added_{i}{image.suffix}")
    train(resume=first.run_dir, progress=False, overrides=["train.epochs=3"])
    assert "the data changed since the checkpoint (train" in caplog.text and "is drawn again" in caplog.text


def test_a_resume_on_data_with_another_class_says_the_classes_differ(shapes_root, tmp_path):
    """It said 'model.num_outputs: 3, but ... has 4 classes: leave it 0', which a resume cannot do (its config
    holds 3): the class names it was trained on are what differ."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_root, data)
    first = train(_tiny_cfg(data, tmp_path / "runs", epochs=1), progress=False)
    shutil.copytree(data / "train" / "circle", data / "train" / "oval")
    with pytest.raises(
        ConfigError, match=r"data.root: the data's class names \(circle, oval, square, triangle\) differ"
    ):
        train(resume=first.run_dir, progress=False, overrides=["train.epochs=2"])
