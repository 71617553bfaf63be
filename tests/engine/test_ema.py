"""train.ema_decay: a moving average of the weights, evaluated beside them, checkpointed, used by predict."""

from __future__ import annotations

import torch

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import load_config
from fasttrain.engine import train
from fasttrain.predict import predict


def test_ema_is_the_average_of_the_steps_weights(shapes_root, tmp_path):
    seen = []

    def keep(state, record):
        seen.append({k: v.clone() for k, v in state.modules["model"].state_dict().items()})

    decay = 0.5
    cfg = load_config(
        "quickstart",
        [
            f"data.root={shapes_root}",
            f"train.runs_dir={tmp_path}",
            "train.epochs=2",
            "train.max_steps=1",
            "data.workers=0",
            "data.loader=torch",
            f"train.ema_decay={decay}",
            "train.best_metric=val_ema_acc",
        ],
    )
    result = train(cfg, progress=False, on_epoch_end=keep)
    assert all("val_ema_acc" in r and "val_ema_loss" in r for r in result.history)
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    ema = ckpt["state"]["ema"]["model"]
    assert int(ema["n_averaged"]) == 2  # one update per optimizer step
    # AveragedModel's EMA: the first update copies the weights, the next one mixes in (1 - decay) of the new.
    name = next(k for k in seen[0] if k.endswith("weight"))
    expected = decay * seen[0][name] + (1 - decay) * seen[1][name]
    torch.testing.assert_close(ema[f"module.{name}"], expected)
    (record,) = predict(result.run_dir, [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert record["class"] in ("circle", "square", "triangle")
    # predict takes the averaged weights: zero the average's head and every class gets a third
    (linear,) = [k.rsplit(".", 1)[0] for k in ema if k.endswith(".weight") and ema[k].ndim == 2]  # the only Linear
    for k in (f"{linear}.weight", f"{linear}.bias"):
        ema[k].zero_()
    torch.save(ckpt, tmp_path / "zeroed.pt")
    (record,) = predict(tmp_path / "zeroed.pt", [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert abs(record["probability"] - 1 / 3) < 1e-3
