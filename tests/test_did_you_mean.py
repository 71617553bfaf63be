"""Did-you-mean: a misspelt config key or section, torchvision or timm model name gets the closest names."""

from __future__ import annotations

import pytest

from fasttrain.config import Config, ConfigError, apply_overrides, load_config
from fasttrain.models import check_model


@pytest.mark.parametrize(
    "item, hint",
    [
        ("optim.lrr=0.1", "did you mean optim.lr?"),
        ("train.epoch=3", "did you mean train.epochs?"),
        ("train.lr=0.1", "did you mean optim.lr?"),  # the key exists, in another section
        ("optimm.lr=0.1", "did you mean optim?"),
    ],
)
def test_unknown_config_keys_suggest_the_closest(item, hint):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [item])
    assert str(e.value).endswith(hint)


def test_nothing_close_suggests_nothing(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[train]\nqqqqqq = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "x.toml: unknown key train.qqqqqq" in str(e.value) and "did you mean" not in str(e.value)


def test_model_names_suggest_the_closest():
    with pytest.raises(ValueError, match=r"did you mean resnet50\b"):
        check_model("resnet51")
    with pytest.raises(ValueError, match=r"did you mean smallcnn\?"):
        check_model("smalcnn")


def test_timm_model_names_suggest_the_closest():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"timm has no model 'resnett18'.*did you mean timm/resnet18\b"):
        check_model("timm/resnett18")
