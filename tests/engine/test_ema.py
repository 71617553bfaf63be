"""train.ema_decay: a moving average of the weights, evaluated beside them, checkpointed, used by predict."""

from __future__ import annotations

import pytest
import torch

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import load_config
from fasttrain.ema import ModelEma, ema_decay_at
from fasttrain.engine import best_candidate, train
from fasttrain.prediction import predict


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
    # The first update copies the weights, the next one mixes in (1 - d) of the new, d warmed up (2/11 < 0.5).
    name = next(k for k in seen[0] if k.endswith("weight"))
    d = ema_decay_at(decay, 1)
    assert d == 2 / 11
    expected = d * seen[0][name] + (1 - d) * seen[1][name]
    torch.testing.assert_close(ema[f"module.{name}"], expected)
    (record,) = predict(result.run_dir, [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert record["class"] in ("circle", "square", "triangle")
    # predict takes the averaged weights: zero the average's head and every class gets a third
    (linear,) = [k.rsplit(".", 1)[0] for k in ema if k.endswith(".weight") and ema[k].ndim == 2]  # the only Linear
    for k in (f"{linear}.weight", f"{linear}.bias"):
        ema[k].zero_()
    ckpt["weights"] = "ema"  # the average validated better (best_metric is val_ema_acc: it always does)
    torch.save(ckpt, tmp_path / "zeroed.pt")
    (record,) = predict(tmp_path / "zeroed.pt", [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert abs(record["probability"] - 1 / 3) < 1e-3
    # --weights raw: the raw weights, whatever the checkpoint prefers
    (record,) = predict(tmp_path / "zeroed.pt", [str(next(shapes_root.rglob("*.png")))], device="cpu", weights="raw")
    assert abs(record["probability"] - 1 / 3) > 1e-3
    # a checkpoint that says the raw weights validated better predicts with them unless --weights ema
    ckpt["weights"] = "raw"
    torch.save(ckpt, tmp_path / "raw.pt")
    (record,) = predict(tmp_path / "raw.pt", [str(next(shapes_root.rglob("*.png")))], device="cpu")
    assert abs(record["probability"] - 1 / 3) > 1e-3
    (record,) = predict(tmp_path / "raw.pt", [str(next(shapes_root.rglob("*.png")))], device="cpu", weights="ema")
    assert abs(record["probability"] - 1 / 3) < 1e-3


def test_ema_decay_warms_up_so_a_short_run_is_not_averaged_into_its_start():
    """decay 0.9998 averages over ~5000 steps: without a warm-up, 200 steps leave the average at the initial
    weights (the quickstart ended at val_ema_acc 0.25). Warmed up, it follows the recent weights."""
    assert [round(ema_decay_at(0.9998, n), 4) for n in (0, 1, 10, 90)] == [0.1, 0.1818, 0.55, 0.91]
    assert ema_decay_at(0.9, 10_000) == 0.9  # never above the configured decay
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
    ema = ModelEma(model, 0.9998)
    for step in range(1, 201):  # the weights walk from 0 to 1
        with torch.no_grad():
            model.weight.fill_(step / 200)
        ema.update(model)
    assert ema.updates == 200
    assert 0.9 < float(ema.module.weight.mean()) < 1.0  # without warm-up: ~0.02


def test_ema_update_averages_floats_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEma(model, 0.5)
    seen = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # BatchNorm's running stats and num_batches_tracked move
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    avg = ema.module.state_dict()
    for key in ("0.weight", "1.running_mean"):
        expected = seen[0][key]
        for n in (1, 2):
            d = ema_decay_at(0.5, n)
            expected = d * expected + (1 - d) * seen[n][key]
        torch.testing.assert_close(avg[key], expected)
    assert int(avg["1.num_batches_tracked"]) == 3
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEma(model, 0.5)
    restored.load_state_dict(ema.state_dict())  # AveragedModel's layout: module.<key> and n_averaged
    assert restored.updates == 3 and set(ema.state_dict()) == {f"module.{k}" for k in avg} | {"n_averaged"}


def _no_host_sync(monkeypatch):
    """Every way a tensor's value reaches Python (each a device -> host sync on CUDA) raises."""

    def refuse(name):
        def fail(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")

        return fail

    for name in ("item", "cpu", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def test_a_training_step_with_an_ema_reads_nothing_back_from_the_device(shapes_root, tmp_path, monkeypatch):
    """torch's AveragedModel copied n_averaged to the device and tested bool(n_averaged == 0) every update."""
    from fasttrain.engine import _add_ema
    from fasttrain.runtime import Runtime, runtime_for
    from fasttrain.tasks import make_task

    monkeypatch.setattr(Runtime, "optimizer_kwargs", lambda self: {"fused": True})  # as on CUDA: no step.item()
    cfg = load_config("quickstart", ["model.num_outputs=3", "runtime.device=cpu", "train.ema_decay=0.999"])
    task = make_task(cfg, runtime_for(cfg), None)
    state = task.build_state()
    _add_ema(state, "model", cfg.train.ema_decay)
    batches = [task.synthetic_batch(4, task.input_spec()) for _ in range(3)]
    before = {k: v.clone() for k, v in state.ema["model"].module.state_dict().items()}
    with monkeypatch.context() as m:
        _no_host_sync(m)
        for batch in batches:
            task.train_step(state, batch)
    after = state.ema["model"].module.state_dict()
    assert state.ema["model"].updates == 3
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_best_pt_comes_from_whichever_weights_validated_better():
    rec = {"val_acc": 0.99, "val_ema_acc": 0.25, "val_loss": 0.1, "val_ema_loss": 0.05, "train_loss": 0.2}
    assert best_candidate(rec, "val_acc", "max", ema=True) == (0.99, "raw")
    assert best_candidate(rec, "val_loss", "min", ema=True) == (0.05, "ema")
    assert best_candidate(rec, "val_ema_acc", "max", ema=True) == (0.25, "ema")  # asked for the average alone
    assert best_candidate(rec, "train_loss", "min", ema=True) == (0.2, "raw")
    assert best_candidate(rec, "val_acc", "max", ema=False) == (0.99, None)
    assert best_candidate({"train_loss": 1.0}, "val_acc", "max", ema=True) == (None, None)  # not evaluated


def test_a_run_says_which_weights_best_pt_holds_and_predict_follows(shapes_root, tmp_path, caplog):
    cfg = load_config(
        "quickstart",
        [
            f"data.root={shapes_root}",
            f"train.runs_dir={tmp_path}",
            "train.epochs=2",
            "train.max_steps=3",
            "data.workers=0",
            "data.loader=torch",
            "train.ema_decay=0.9998",
            "train.best_metric=val_loss",
        ],
    )
    with caplog.at_level("INFO", logger="fasttrain"):
        result = train(cfg, progress=False)
    for r in result.history:
        assert r["weights"] == ("ema" if r["val_ema_loss"] < r["val_loss"] else "raw")
    best = [r for r in result.history if r["best"]][-1]
    assert result.best_value == min(best["val_loss"], best["val_ema_loss"])
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert ckpt["weights"] == best["weights"] and ckpt["best_value"] == result.best_value
    said = "averaged (EMA)" if best["weights"] == "ema" else "raw"
    assert f"best.pt: the {said} weights" in caplog.text
    assert f"({best['weights']} weights)" in caplog.text  # the run's last line


@pytest.mark.gpu
def test_ema_update_on_cuda_makes_no_host_sync():
    """What the CPU test above shows by structure, torch's own sync detector confirms on a GPU."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).cuda()
    ema = ModelEma(model, 0.9998)
    model(torch.randn(2, 3, 8, 8, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.updates == 3


@pytest.mark.slow  # the whole quickstart (about a minute on two cores)
def test_quickstart_with_the_readmes_ema_decay_ends_with_a_useful_average(tmp_path, monkeypatch):
    """Issue 23: with train.ema_decay=0.9998 the quickstart ended at val_acc 0.99, val_ema_acc 0.25, and predict
    used the average (5 of 20 right)."""
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = load_config("quickstart", [f"train.runs_dir={tmp_path / 'runs'}", "train.ema_decay=0.9998"])
    result = train(cfg, progress=False)
    final = result.final
    assert final["val_acc"] >= 0.85 and final["val_ema_acc"] >= 0.85, final
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    best = max(max(r["val_acc"], r["val_ema_acc"]) for r in result.history)
    assert ckpt["best_value"] == best and ckpt["weights"] in ("ema", "raw")


def test_ema_follows_a_parameter_whose_data_was_replaced():
    """The tensor lists are built once: they must hold the Parameter objects, so ``param.data = ...`` (a move,
    channels_last) is still what the average follows."""
    model = torch.nn.Linear(2, 2)
    ema = ModelEma(model, 0.5)
    ema.update(model)
    first = model.weight.detach().clone()
    model.weight.data = torch.full((2, 2), 4.0)
    ema.update(model)
    d = ema_decay_at(0.5, 1)
    torch.testing.assert_close(ema.module.weight, d * first + (1 - d) * 4.0)


def test_a_weight_the_model_uses_twice_is_averaged_once():
    """A tied weight appears under two names in state_dict: it was moved towards the model twice per update."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    tied, single = torch.nn.Sequential(lin, lin), torch.nn.Sequential(lin)
    a, b = ModelEma(tied, decay=0.5), ModelEma(single, decay=0.5)
    for _ in range(3):
        a.update(tied)
        b.update(single)
        with torch.no_grad():
            lin.weight.add_(1.0)
    torch.testing.assert_close(a.module[0].weight, b.module[0].weight)
    assert a.module[0].weight is a.module[1].weight  # deepcopy kept the tie
