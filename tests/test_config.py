import pytest

from fasttrain.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
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
    out = parse_overrides(["data.mean=[0.5]", "data.hflip=false", "model.name=resnet50", "train.epochs=7",
                           "data.root=/some/path with space"])
    assert out["data"] == {"mean": [0.5], "hflip": False, "root": "/some/path with space"}
    assert out["model"]["name"] == "resnet50" and out["train"]["epochs"] == 7


def test_int_accepted_for_float_but_not_reverse(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match=r"train\.epochs.*integer"):
        load_config(write(tmp_path, "[train]\nepochs = 2.5\n", "b.toml"))


@pytest.mark.parametrize("items, pattern", [
    (["optim.lrr=0.1"], r"unknown key optim\.lrr"),
    (["optimizer.lr=0.1"], r"unknown section 'optimizer'"),
    (["optim.lr=fast"], r"optim\.lr: expected a number"),
    (["optim.lr=-1"], r"optim\.lr: must be > 0"),
    (["data.hflip=yes"], r"data\.hflip: expected true or false"),
    (["data.loader=gpu"], r"data\.loader: must be one of"),
    (["train.batch_size=100", "train.accumulation=3"], r"train\.batch_size: 100 is not divisible"),
    (["lr=0.1"], r"expected section\.key=value"),
    (["optim.lr"], r"expected section\.key=value"),
    (["name=../elsewhere"], r"name: must be a plain name"),
])
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
    cfg = apply_overrides(Config(), ["optim.lr=0.02", "data.mean=[0.5]", "data.std=[0.5]", "data.channels=1",
                                     "name=x"])
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
