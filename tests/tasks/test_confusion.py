"""A classifier's per-class accuracy and confusion matrix: confusion.json and confusion.png for best.pt's weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tinyrun import tiny_cfg

from fasttrain.engine import train
from fasttrain.tasks.confusion import confusion_report


def test_confusion_report_reads_rows_as_true_classes():
    m = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
    r = confusion_report(m, ["a", "b", "c"], split="val", weights="w")
    assert r["per_class_accuracy"] == {"a": 0.75, "b": None, "c": pytest.approx(4 / 6, abs=1e-6)}
    assert r["accuracy"] == 0.7 and r["samples"] == 10 and r["matrix"][2] == [2, 0, 4]


def test_a_classifier_run_writes_its_confusion_matrix_for_best_pt(shapes_root, tmp_path, caplog):
    def spoil_final(state, record):  # after the last checkpoint: only best.pt's weights score as logged
        if record["epoch"] == 2:
            with torch.no_grad():
                for p in state.modules["model"].parameters():
                    p.zero_()

    with caplog.at_level("INFO", logger="fasttrain"):
        result = train(tiny_cfg(shapes_root, tmp_path, epochs=2, max_steps=8), progress=False, on_epoch_end=spoil_final)
    report = json.loads((result.run_dir / "confusion.json").read_text())
    best = max(result.history, key=lambda r: r["val_acc"])
    assert report["classes"] == ["circle", "square", "triangle"] and report["split"] == "val"
    assert report["weights"].startswith(f"best.pt, epoch {best['epoch']}")
    m = torch.tensor(report["matrix"])
    assert m.sum(1).tolist() == [20, 20, 20]  # rows: the val images of each true class
    assert report["accuracy"] == pytest.approx(best["val_acc"], abs=1e-6)
    for i, name in enumerate(report["classes"]):
        assert report["per_class_accuracy"][name] == pytest.approx(float(m[i, i]) / 20, abs=1e-6)
    with Image.open(result.run_dir / "confusion.png") as png:
        assert png.format == "PNG" and png.size[0] > 200
    assert "per-class val accuracy (best.pt, epoch" in caplog.text


def test_the_confusion_matrix_uses_the_average_when_best_pt_holds_it(shapes_root, tmp_path, monkeypatch):
    import fasttrain.engine as engine

    real_evaluate, raw_accs = engine.evaluate, []

    def raw_scores_nothing(task, state, loader, *, ema=False):  # best.pt must then hold the average
        metrics = real_evaluate(task, state, loader, ema=ema)
        if not ema:
            raw_accs.append(metrics["acc"])
            metrics = {**metrics, "acc": 0.0}
        return metrics

    monkeypatch.setattr(engine, "evaluate", raw_scores_nothing)
    # fp32: the set-up (raw and averaged weights that score differently) was found in fp32, not in the CPU's bf16.
    cfg = tiny_cfg(shapes_root, tmp_path, "train.ema_decay=0.9", "runtime.precision=fp32", epochs=3, max_steps=24)
    result = train(cfg, progress=False)
    record = max(result.history, key=lambda r: r["val_ema_acc"])  # best.pt's epoch (raw scores 0 throughout)
    epoch = result.history.index(record)
    assert record["weights"] == "ema" and record["val_ema_acc"] != raw_accs[epoch]  # the set-up: they differ
    report = json.loads((result.run_dir / "confusion.json").read_text())
    assert report["weights"].endswith(", EMA")
    assert report["accuracy"] == pytest.approx(record["val_ema_acc"], abs=1e-6)


def test_a_rank_without_validation_batches_reduces_zeros_on_the_others_device(monkeypatch):
    """A streamed val split with fewer shards than ranks leaves some ranks no batches: their zeros must sit on
    the device the other ranks' counts are on (a CPU tensor in an NCCL all-reduce raises, and the others wait)."""
    import contextlib

    import torch.distributed as dist

    from fasttrain import distributed
    from fasttrain.tasks.confusion import confusion_matrix

    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=1, world_size=2))
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    with contextlib.suppress(NotImplementedError, RuntimeError):  # a meta tensor cannot come back to the CPU
        confusion_matrix(lambda x: x, [], 3, contextlib.nullcontext, device="meta")
    assert seen == [torch.device("meta")]


@pytest.mark.parametrize("n", [2, 120])
def test_confusion_json_reads_back_as_the_report_with_a_line_per_matrix_row(tmp_path, n):
    from fasttrain.tasks.confusion import write_confusion

    g = torch.Generator().manual_seed(n)
    m = torch.randint(0, 50, (n, n), generator=g)
    report = confusion_report(m, [f'class {i}, "quoted"' for i in range(n)], split="val", weights="best.pt")
    js, png = write_confusion(tmp_path, report)
    text = js.read_text()
    assert json.loads(text) == report
    assert len(text.splitlines()) < 3 * n + 40  # rows on one line each (indented whole: n * n lines)
    with Image.open(png) as im:
        assert im.width > 100 and im.height > 100


def test_a_confusion_figure_of_many_classes_names_none():
    from fasttrain.tasks.confusion import NAMED_UP_TO, _render

    n = NAMED_UP_TO + 10
    report = confusion_report(torch.eye(n, dtype=torch.long) * 3, [str(i) for i in range(n)], split="val", weights="w")
    image, layout = _render(report)
    assert layout.labels == [] and layout.cell * n <= image.width
    few = confusion_report(torch.eye(4, dtype=torch.long), list("abcd"), split="val", weights="w")
    assert _render(few)[1].labels == list("abcd")


def test_a_confusion_figure_without_a_name_per_class_numbers_them():
    from fasttrain.tasks.confusion import axis_labels

    report = confusion_report(torch.eye(3, dtype=torch.long), ["a", "b", "c"], split="val", weights="w")
    report["classes"] = ["a"]  # a caller's report with fewer names than classes
    assert axis_labels(report) == ["0", "1", "2"]


@pytest.mark.parametrize("n", [3, 12, 80])
def test_each_cell_of_the_figure_is_its_share_of_the_true_class_on_the_blues_ramp(n):
    """Rows normalised: a cell's colour is its count over its row's sum (an empty row white), darker for more."""
    from fasttrain.tasks.confusion import _render, blues

    g = torch.Generator().manual_seed(n)
    m = torch.randint(0, 40, (n, n), generator=g) + torch.eye(n, dtype=torch.long) * 200
    m[1] = 0  # a class with no samples
    image, layout = _render(confusion_report(m, [f"c{i}" for i in range(n)], split="val", weights="w"))
    rgb = np.asarray(image.convert("RGB"))
    shares = m.double() / m.sum(1, keepdim=True).clamp(min=1).double()
    for i, j in [(0, 0), (0, n - 1), (1, 0), (n - 1, n - 1), (n // 2, 0)]:
        y, x = layout.top + i * layout.cell, layout.left + j * layout.cell  # a corner: the counts are centred
        assert tuple(rgb[y, x]) == tuple(blues(np.array(shares[i, j].item()))), (i, j)
    assert tuple(blues(np.array(0.0))) == (247, 251, 255) and tuple(blues(np.array(1.0))) == (8, 48, 107)
    assert tuple(rgb[layout.top + layout.cell, layout.left]) == (247, 251, 255)  # the empty row
    darker = blues(np.linspace(0, 1, 11)).astype(int).sum(1)
    assert (np.diff(darker) < 0).all()


def test_names_a_bitmap_font_cannot_encode_are_drawn_replaced_not_raised(monkeypatch):
    """Pillow without FreeType has only its Latin-1 bitmap font: a class named in Chinese or Greek raised
    UnicodeEncodeError at the end of a finished run."""
    from PIL import ImageFont

    from fasttrain.tasks import confusion as C

    monkeypatch.setattr(C, "_font", lambda size: ImageFont.load_default_imagefont())
    report = confusion_report(torch.eye(3, dtype=torch.long), ["猫", "Δέλτα", "café"], split="vål", weights="w")
    image, layout = C._render(report)
    assert layout.labels == ["?", "?????", "café"] and image.width > 50


def test_a_figure_that_cannot_be_drawn_leaves_the_json_and_a_warning(tmp_path, monkeypatch, caplog):
    from fasttrain.tasks import confusion as C

    def broken(report):
        raise OSError("cannot open resource")

    monkeypatch.setattr(C, "_render", broken)
    report = confusion_report(torch.eye(2, dtype=torch.long), ["a", "b"], split="val", weights="w")
    with caplog.at_level("WARNING", logger="fasttrain"):
        js, png = C.write_confusion(tmp_path, report)
    assert png is None and not (tmp_path / "confusion.png").exists()
    assert json.loads(js.read_text()) == report and "confusion.png not drawn (OSError" in caplog.text


def test_thousands_of_classes_are_averaged_into_blocks_and_no_classes_draw_an_empty_figure():
    from fasttrain.tasks.confusion import MAX_SIDE, _render, blues

    n = MAX_SIDE + 100  # two classes a side per pixel
    image, layout = _render(confusion_report(torch.eye(n, dtype=torch.long), ["x"] * n, split="val", weights="w"))
    assert layout.classes_per_cell == 2 and layout.cell == 1 and image.height < MAX_SIDE // 2 + 200
    rgb = np.asarray(image)
    assert tuple(rgb[layout.top, layout.left]) == tuple(blues(np.array(0.5)))  # a block of 2 x 2 with 2 right
    assert tuple(rgb[layout.top, layout.left + 1]) == tuple(blues(np.array(0.0)))
    empty = {"matrix": [], "classes": [], "accuracy": None, "split": "val", "weights": "w"}
    assert _render(empty)[0].width > 0
