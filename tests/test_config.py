import dataclasses
import os

import pytest

from fasttrain.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_config,
    dump_config,
    field_docs,
    load_config,
    parse_overrides,
)


def write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_file_overrides(tmp_path):
    p = write(tmp_path, "[optim]\nlr = 0.05\nname = 'adamw'\n[train]\nepochs = 3\n")
    cfg = load_config(p, ["optim.lr=0.01"])
    assert cfg.optim.lr == 0.01  # --set beats the file
    assert cfg.optim.name == "adamw"  # the file beats the default
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == Config().train.batch_size  # default kept
    assert cfg.name == "exp"  # the file's stem names the config


def test_override_value_types():
    out = parse_overrides(
        [
            "data.mean=[0.5]",
            "data.hflip=false",
            "model.name=resnet50",
            "train.epochs=7",
            "data.root=/some/path with space",
        ]
    )
    assert out["data"] == {"mean": [0.5], "hflip": False, "root": "/some/path with space"}
    assert out["model"]["name"] == "resnet50" and out["train"]["epochs"] == 7


def test_int_accepted_for_float_but_not_reverse(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match=r"train\.epochs.*integer"):
        load_config(write(tmp_path, "[train]\nepochs = 2.5\n", "b.toml"))


@pytest.mark.parametrize(
    "items, pattern",
    [
        (["optim.lrr=0.1"], r"unknown key optim\.lrr"),
        (["optimizer.lr=0.1"], r"unknown section 'optimizer'"),
        (["optim.lr=fast"], r"optim\.lr: expected a number"),
        (["optim.lr=-1"], r"optim\.lr: must be > 0"),
        (["optim.lr=1e39"], r"optim\.lr: 1e\+39 is more than float32 holds \(3\.4e\+38\)"),  # was a traceback
        (["optim.lr=3.5e38"], r"optim\.lr: 3\.5e\+38 is more than float32 holds"),
        (["data.hflip=yes"], r"data\.hflip: expected true or false"),
        (["data.loader=gpu"], r"data\.loader: must be one of"),
        (["train.batch_size=100", "train.accumulation=3"], r"train\.batch_size: 100 is not divisible"),
        (["lr=0.1"], r"expected section\.key=value"),
        (["optim.lr"], r"expected section\.key=value"),
        (["name=../elsewhere"], r"name: must be a plain name"),
    ],
)
def test_errors_name_the_field(items, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Config(), items)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = write(tmp_path, "[optim\nlr = 1\n", "bad.toml")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    typo = write(tmp_path, "[train]\nepoch = 1\n", "typo.toml")
    with pytest.raises(ConfigError, match=r"typo.toml: unknown key train\.epoch"):
        load_config(typo)


def test_dump_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["optim.lr=0.02", "data.mean=[0.5]", "data.std=[0.5]", "data.channels=1", "name=x"])
    p = write(tmp_path, dump_config(cfg), "resolved.toml")
    again = load_config(p)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_grayscale_uses_averaged_rgb_statistics():
    cfg = apply_overrides(Config(), ["data.channels=1"])
    mean, std = cfg.data.norm_mean_std()
    assert len(mean) == 1 and mean[0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    assert len(std) == 1


def test_derived_batches():
    cfg = apply_overrides(Config(), ["train.batch_size=256", "train.accumulation=4"])
    assert cfg.train.micro_batch == 64
    assert cfg.train.eval_batch == 128


def _float_fields():
    """Every float setting (and list of floats) of every section, by name."""
    import typing

    from fasttrain.config import _SECTIONS

    for section, cls in _SECTIONS.items():
        for name, typ in typing.get_type_hints(cls).items():
            if typ is float or typ == list[float]:
                yield f"{section}.{name}"


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused_for_every_float_setting(value):
    fields = list(_float_fields())
    assert {"optim.lr", "data.mean", "train.label_smoothing", "tune.memory_budget_gib"} <= set(fields)
    for key in fields:
        with pytest.raises(ConfigError, match=rf"{key}(\[0\])?: must be a finite number"):
            apply_overrides(Config(), [f"{key}={value}"])


def test_non_finite_numbers_in_a_file_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr: must be a finite number, got inf"):
        load_config(write(tmp_path, "[optim]\nlr = inf\n"))
    with pytest.raises(ConfigError, match=r"data\.mean\[1\]: must be a finite number, got nan"):
        load_config(write(tmp_path, "[data]\nmean = [0.5, nan, 0.5]\n", "m.toml"))


def test_config_that_is_not_utf8_names_the_file(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes("# réglages\n[optim]\nlr = 0.05\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text .*save it as UTF-8"):
        load_config(p)


def test_config_with_a_byte_order_mark_is_read(tmp_path):
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf[optim]\nlr = 0.05\n")
    assert load_config(p).optim.lr == 0.05


def test_max_nonfinite_logs_is_validated():
    assert Config().train.max_nonfinite_logs == 3
    with pytest.raises(ConfigError, match=r"train\.max_nonfinite_logs: must be >= 0"):
        apply_overrides(Config(), ["train.max_nonfinite_logs=-1"])


def test_every_setting_is_described_with_its_value_and_default():
    cfg = load_config(None, ["optim.lr=0.5", "data.image_size=64"])
    rows = {f.key: f for f in describe_config(cfg)}
    n_fields = 1 + sum(
        len(dataclasses.fields(f.type if isinstance(f.type, type) else getattr(Config(), f.name)))
        for f in dataclasses.fields(Config)
        if f.name != "name"
    )
    assert len(rows) == n_fields
    assert rows["optim.lr"].value == 0.5 and rows["optim.lr"].default == 0.1 and rows["optim.lr"].type == "float"
    assert "pixels" in rows["data.image_size"].description  # the unit travels with the description
    assert [k for k, f in rows.items() if not f.description] == []  # a new field without a docstring fails here


def test_field_docs_reads_the_string_under_each_field():
    @dataclasses.dataclass
    class Section:
        a: int = 1
        """First, in
        two lines."""
        b: str = "x"
        c: float = 0.0
        """Third."""

    assert field_docs(Section) == {"a": "First, in two lines.", "c": "Third."}


def test_task_names_come_from_the_task_table(monkeypatch):
    """task.name accepts what the registry's tasks table lists: a new task is its module and one line there."""
    from fasttrain import registry

    with pytest.raises(ConfigError, match="task.name: must be one of classify, regress, pix2pix, got 'segment'"):
        load_config(None, ["task.name=segment"])
    monkeypatch.setitem(registry.TABLES["tasks"], "segment", "fasttrain.tasks.classify:ClassifyTask")
    assert load_config(None, ["task.name=segment"]).task.name == "segment"


def test_default_workers_are_shared_by_the_processes_of_a_node(monkeypatch):
    """Every rank took up to 15 workers or DALI threads: ~120 threads (and 15 padded decoders each) on an 8-GPU
    node. torchrun's LOCAL_WORLD_SIZE divides the machine's cores between them."""
    from fasttrain.config import DataConfig, default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 16  # one process: all cores but one, at most 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 11  # 95 cores / 8 processes
    assert DataConfig().num_workers == DataConfig().num_dali_threads == 11
    assert DataConfig(workers=4).num_workers == 4  # a set value is kept
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_workers() == 1  # never none


@pytest.mark.parametrize(
    "items, pattern",
    [
        (["task.name=regress", "task.mixup_alpha=0.2"], r"^task\.mixup_alpha: .*task\.name = 'regress'"),
        (["task.name=pix2pix", "task.cutmix_alpha=1.0"], r"^task\.cutmix_alpha: .*task\.name = 'pix2pix'"),
        (["task.name=regress", "train.label_smoothing=0.1"], r"^train\.label_smoothing: .*'regress'"),
        (["data.mean=[0.5]"], r"^data\.mean: needs one value per channel \(3 for data\.channels = 3\), got 1"),
        (["data.channels=1", "data.std=[0.5, 0.5]"], r"^data\.std: needs one value per channel \(1 for"),
        (["model.reset_head=true"], r"^model\.reset_head: applies only with model\.init_from"),
        (["data.target_columns=['x']"], r"^data\.target_columns: .*format = 'folder'"),
        (["data.flip_alternate=true", "task.name=regress"], r"^data\.flip_alternate: .*task regress flips at random"),
        (["data.hflip=false", "data.flip_alternate=true"], r"^data\.flip_alternate: .*set data\.hflip = true"),
    ],
)
def test_settings_a_task_or_shape_cannot_use_are_refused_naming_the_key(items, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Config(), items)


def test_settings_a_task_or_shape_can_use_still_pass():
    apply_overrides(Config(), ["task.mixup_alpha=0.2", "task.cutmix_alpha=1.0", "train.label_smoothing=0.1"])
    apply_overrides(Config(), ["data.channels=1"])  # RGB statistics (the defaults) serve grayscale, averaged
    apply_overrides(Config(), ["data.channels=1", "data.mean=[0.5]", "data.std=[0.5]", "task.name=regress"])
    apply_overrides(Config(), ["data.format=manifest", "data.target_columns=['x']"])
    apply_overrides(Config(), ["model.init_from=w.pt", "model.reset_head=true"])


def test_dropout_on_a_model_built_without_it_is_refused():
    from fasttrain.models import check_model

    with pytest.raises(ValueError, match=r"^model\.dropout: .*torchvision's resnet18 is built without it"):
        check_model("resnet18", dropout=0.2)
    with pytest.raises(ValueError, match=r"^model\.dropout: a model passed from Python"):
        check_model("custom", given=True, dropout=0.2)
    check_model("smallcnn", dropout=0.2)
    check_model("resnet18")


def test_auto_workers_on_a_two_core_cpu_run_are_none(monkeypatch):
    from fasttrain import config as C

    monkeypatch.setattr(C.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    data = C.DataConfig()
    assert data.workers_for("cpu") == 0  # a worker competes with the step's threads (measured 0.5x)
    assert data.workers_for("cuda") == 1  # beside a GPU the cores are free: cores - 1
    assert C.DataConfig(workers=2).workers_for("cpu") == 2  # what the user set
    monkeypatch.setattr(C.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert data.workers_for("cpu") == 7
