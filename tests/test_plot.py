"""fasttrain plot: curves from metrics.jsonl (step and epoch records), one run or several overlaid."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fasttrain.plot import plot_runs, read_curves


def _run(folder, *, acc: list[float], steps_per_epoch: int = 4, log_every: int = 2, torn: bool = False):
    folder.mkdir(parents=True)
    lines = []
    for e, a in enumerate(acc, 1):
        for s in range(log_every, steps_per_epoch + 1, log_every):
            step = (e - 1) * steps_per_epoch + s
            lines.append(
                {
                    "event": "step",
                    "epoch": e,
                    "step": step,
                    "loss": 2.0 / step,
                    "lr": 0.1 / e,
                    "samples_per_s": 100.0 + step,
                }
            )
        lines.append(
            {
                "epoch": e,
                "step": e * steps_per_epoch,
                "train_loss": 1.0 / e,
                "val_loss": 1.2 / e,
                "val_acc": a,
                "lr": 0.1 / e,
                "samples_per_s": 100.0,
                "best": a == max(acc),
            }
        )
    lines.append({"epoch": len(acc), "event": "test", "test_acc": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (folder / "metrics.jsonl").write_text(text + ('{"epoch": 9, "train_lo' if torn else ""))
    return folder


def test_records_are_split_into_steps_and_epochs_and_a_torn_line_is_skipped(tmp_path, caplog):
    run = read_curves(_run(tmp_path / "a", acc=[0.5, 0.7, 0.6], torn=True))
    assert len(run.steps) == 6 and len(run.epochs) == 3  # the test event is neither
    assert run.metric == "val_acc"
    assert run.series("val_acc") == ([4, 8, 12], [0.5, 0.7, 0.6])
    assert run.series("loss", "steps")[0] == [2, 4, 6, 8, 10, 12]
    assert "dropped its last line 11" in caplog.text


def test_one_run_draws_into_its_folder_and_several_into_a_new_file(tmp_path, monkeypatch):
    a = _run(tmp_path / "a", acc=[0.5, 0.7])
    b = _run(tmp_path / "b", acc=[0.4, 0.8, 0.9])
    png = plot_runs([a])
    assert png == a / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs-compare.png").write_text("the user's file")
    both = plot_runs([a, b])
    assert both.name == "runs-compare-2.png"  # the existing file is left alone
    assert (tmp_path / "runs-compare.png").read_text() == "the user's file"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "nothing"])


def test_the_compare_plots_legends_sit_beside_the_curves_not_over_them(tmp_path):
    from fasttrain.plot import _figure

    runs = [read_curves(_run(tmp_path / name, acc=acc)) for name, acc in (("a", [0.5, 0.7]), ("b", [0.4, 0.8]))]
    fig = _figure(runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(axes) == 4
    for ax in axes:
        legend, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= area.x1, ax.get_title()  # wholly to the right of the plotting area


def test_the_title_of_many_runs_stays_inside_the_figure(tmp_path):
    """Six runs' names joined with 'vs' ran off the figure."""
    from fasttrain.plot import _figure

    names = [f"quickstart-20261204-2336{i:02d}" for i in range(6)]
    runs = [read_curves(_run(tmp_path / n, acc=[0.5, 0.7])) for n in names]
    fig = _figure(runs)
    fig.canvas.draw()
    title = fig._suptitle
    box = title.get_window_extent(fig.canvas.get_renderer())
    assert title.get_text() == "6 runs (the legends name them)"
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1
    assert _figure(runs[:2])._suptitle.get_text() == f"{names[0]} vs {names[1]}"


def test_the_run_s_own_best_metric_is_drawn_and_a_single_point_shows(tmp_path):
    """pix2pix records val_psnr and val_l1 and stars best.pt by val_l1: the panel drew val_psnr (first in the
    list) and starred it; a one-epoch run's learning rate was a line of one point, an empty panel."""
    from fasttrain.plot import _figure

    run = _run(tmp_path / "p2p", acc=[0.5])
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "val_acc" in r:
            r["val_l1"], r["val_psnr"] = r.pop("val_acc"), 20.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if r.get("event") != "step"))
    (run / "config.toml").write_text('[train]\nbest_metric = "val_l1"\n')
    curves = read_curves(run)
    assert curves.metric == "val_l1"
    fig = _figure([curves])
    lr_axes = [ax for ax in fig.axes if ax.get_title() == "learning rate"][0]
    assert [ln.get_marker() for ln in lr_axes.get_lines()] == ["o"]
    (run / "config.toml").write_text("not toml [")
    assert read_curves(run).metric == "val_psnr"  # unreadable: the list's order
