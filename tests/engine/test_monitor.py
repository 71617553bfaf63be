"""Early stopping, top-k checkpoints and the test split on best.pt (fasttrain.monitor)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tinyrun import tiny_cfg

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import ConfigError
from fasttrain.engine import train
from fasttrain.monitor import EarlyStopping, TopK


def events(run_dir, name):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


# -- early stopping ----------------------------------------------------------------------------------------------
def test_early_stopping_counts_evaluations_without_improvement():
    es = EarlyStopping("val_loss", "min", patience=2, min_delta=0.1)
    assert not es.update({"epoch": 1, "val_loss": 1.0})
    assert not es.update({"epoch": 2, "val_loss": 0.95})  # better, but not by more than min_delta
    assert not es.update({"epoch": 3, "train_loss": 0.1})  # not evaluated: does not count
    assert not es.update({"epoch": 4, "val_loss": 0.5})  # a real improvement resets the count
    assert not es.update({"epoch": 5, "val_loss": float("nan")})
    assert es.update({"epoch": 6, "val_loss": 0.45})
    assert "val_loss has not improved by more than 0.1 for 2 evaluations (best 0.5 at epoch 4" in es.reason
    assert not EarlyStopping("val_acc", "max", patience=0).update({"epoch": 1, "val_acc": 0.1})


def test_a_run_stops_early_and_says_why(shapes_root, tmp_path, caplog):
    # val_acc cannot rise by more than 1: after the first evaluation every one counts against it
    cfg = tiny_cfg(shapes_root, tmp_path, "train.early_stop_patience=2", "train.early_stop_min_delta=1.0", epochs=10)
    with caplog.at_level("INFO", logger="fasttrain"):
        result = train(cfg, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.stopped_early.startswith("early stop after epoch 3: val_acc has not improved by more than 1")
    assert result.stopped_early in caplog.text
    assert result.stopped_early in (result.run_dir / "train.log").read_text()
    assert [e["epoch"] for e in events(result.run_dir, "early_stop")] == [3]
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert last["state"]["epoch"] == 3 and last["monitors"]["early_stop"]["wait"] == 2


def test_early_stopping_resumes_its_count(shapes_root, tmp_path):
    """Killed after epoch 2 (one evaluation without improvement), the resumed run stops after epoch 3, as the
    uninterrupted one does; resumed once more, a stopped run trains nothing unless patience grows."""

    def kill_after_2(state, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    cfg = tiny_cfg(shapes_root, tmp_path, "train.early_stop_patience=2", "train.early_stop_min_delta=1.0", epochs=10)
    with pytest.raises(KeyboardInterrupt) as e:
        train(cfg, progress=False, on_epoch_end=kill_after_2)
    run = e.value.run_dir
    result = train(resume=run, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.stopped_early
    again = train(resume=run, progress=False)
    assert len(again.history) == 3 and again.stopped_early == result.stopped_early
    more = train(resume=run, overrides=["train.early_stop_patience=3"], progress=False)
    assert [r["epoch"] for r in more.history] == [1, 2, 3, 4]


def test_early_stopping_on_a_missing_metric_is_refused(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.early_stop_metric: 'val_accuracy' is not a metric"):
        train(tiny_cfg(shapes_root, tmp_path, "train.early_stop_patience=1", "train.early_stop_metric=val_accuracy"))
    assert not any(tmp_path.iterdir())  # refused before a run folder exists


# -- top-k -------------------------------------------------------------------------------------------------------
def test_top_k_keeps_the_best_and_deletes_only_its_own(tmp_path):
    (tmp_path / "epoch=1-val_loss=0.5000.pt").write_text("the user's")
    top = TopK(tmp_path, "val_loss", "min", k=2)
    for epoch, value in [(1, 0.5), (2, 0.4), (3, 0.6), (4, 0.3)]:
        if top.wants(value):
            name = top.name_for(epoch, value)
            (tmp_path / name).write_text("ours")
            top.add(name, epoch, value)
    assert [e["file"] for e in top.kept] == ["epoch=4-val_loss=0.3000.pt", "epoch=2-val_loss=0.4000.pt"]
    # epoch 1's name was taken by a user's file: ours went to -v2 and was deleted, theirs is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=1-val_loss=0.5000.pt",
        "epoch=2-val_loss=0.4000.pt",
        "epoch=4-val_loss=0.3000.pt",
    ]
    assert (tmp_path / "epoch=1-val_loss=0.5000.pt").read_text() == "the user's"
    again = TopK(tmp_path, "val_loss", "min", k=1)  # a resume with a smaller k prunes its own files only
    again.load_state_dict(top.state_dict())
    assert [e["file"] for e in again.kept] == ["epoch=4-val_loss=0.3000.pt"]
    assert not (tmp_path / "epoch=2-val_loss=0.4000.pt").exists()


def test_a_run_keeps_its_top_k_checkpoints(shapes_root, tmp_path):
    cfg = tiny_cfg(shapes_root, tmp_path, "train.save_top_k=2", "train.best_metric=val_loss", epochs=4)
    result = train(cfg, progress=False)
    ranked = sorted(result.history, key=lambda r: r["val_loss"])[:2]
    want = {f"epoch={r['epoch']}-val_loss={r['val_loss']:.4f}.pt" for r in ranked}
    ckpts = result.run_dir / "checkpoints"
    assert {p.name for p in ckpts.glob("epoch=*.pt")} == want
    for r in ranked:
        saved = load_checkpoint(ckpts / f"epoch={r['epoch']}-val_loss={r['val_loss']:.4f}.pt")
        assert saved["state"]["epoch"] == r["epoch"]
    assert {e["file"] for e in load_checkpoint(ckpts / "last.pt")["monitors"]["top_k"]["kept"]} == want


# -- the test split on best.pt -------------------------------------------------------------------------------------
def test_the_test_split_is_evaluated_with_best_pt(shapes_root, tmp_path, caplog):
    """test/ holds the val images: the test metrics are the best epoch's validation metrics, although the final
    weights (zeroed after the last checkpoint) would score otherwise."""
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    shutil.copytree(root / "val", root / "test")

    def spoil_final(state, record):
        if record["epoch"] == 3:
            with torch.no_grad():
                for p in state.modules["model"].parameters():
                    p.zero_()

    cfg = tiny_cfg(root, tmp_path / "runs", "train.best_metric=val_loss", epochs=3)
    with caplog.at_level("INFO", logger="fasttrain"):
        result = train(cfg, progress=False, on_epoch_end=spoil_final)
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.test_metrics["test_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert result.test_metrics["test_acc"] == pytest.approx(best["val_acc"])
    assert result.test_weights.startswith(f"best.pt, epoch {best['epoch']}, val_loss")
    assert f"test ({result.test_weights})" in caplog.text
    (event,) = events(result.run_dir, "test")
    assert event["weights"] == result.test_weights and event["test_loss"] == result.test_metrics["test_loss"]


def test_settings_that_would_do_nothing_are_refused(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.early_stop_min_delta: does nothing without train\.early_stop_pat"):
        tiny_cfg(shapes_root, tmp_path, "train.early_stop_min_delta=0.01")
    no_val = ("data.val_dir=none", "data.val_fraction=0")
    for setting in ("train.save_top_k=2", "train.early_stop_patience=2"):
        key = setting.split("=")[0].replace("patience", "metric")
        with pytest.raises(ConfigError, match=rf"{key}: val_acc needs a validation split, and the data has none"):
            train(tiny_cfg(shapes_root, tmp_path, *no_val, setting), progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stale", [False, True])
def test_a_rank_that_does_not_see_rank_0s_best_pt_evaluates_rank_0s_weights(tmp_path, monkeypatch, stale):
    """A runs folder each node has for itself: rank 1 has no best.pt (or an older one, another epoch); rank 0
    decides and sends its weights, so the ranks never evaluate different weights."""
    from types import SimpleNamespace

    from fasttrain import distributed as D
    from fasttrain.monitor import use_best

    module = torch.nn.Linear(2, 2)
    best = {"modules": {"model": {k: torch.full_like(v, 7.0) for k, v in module.state_dict().items()}}}
    if stale:
        old = {"epoch": 1, "step": 4, "modules": {"model": module.state_dict()}}
        torch.save({"state": old}, tmp_path / "best.pt")
    monkeypatch.setattr(D, "current", lambda: D.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(D, "barrier", lambda: None)
    sent = iter([(3, 12, "val_loss 0.5"), best])
    monkeypatch.setattr(D, "broadcast_object", lambda obj, src=0: next(sent))
    monkeypatch.setattr(D, "all_gather_object", lambda ok: [True, ok])
    monkeypatch.setattr("fasttrain.checkpoint.load_checkpoint", lambda p, map_location=None: torch.load(p))
    task = SimpleNamespace(runtime=SimpleNamespace(device="cpu"))
    state = SimpleNamespace(modules={"model": module}, ema={}, epoch=5)
    ckpts = SimpleNamespace(dir=tmp_path, best_value=None, best_metric="val_loss")  # rank 1 keeps no best value
    assert use_best(task, state, ckpts) == "best.pt, epoch 3, val_loss 0.5"  # type: ignore[arg-type]
    assert torch.equal(module.weight, torch.full((2, 2), 7.0))
