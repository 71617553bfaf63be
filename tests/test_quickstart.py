"""The README's main job: `fasttrain train` with no config, on demo data it writes itself."""

import json

import pytest


@pytest.mark.slow  # the whole quickstart, end to end (CI runs it; -m 'not slow' skips it)
def test_quickstart_writes_demo_data_and_reaches_90_percent(tmp_path, monkeypatch, capsys):
    from fasttrain.cli import main

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-q"]) == 0
    demo = tmp_path / "cache" / "demo" / "shapes-v1"
    assert sorted(p.name for p in (demo / "train").iterdir()) == ["circle", "cross", "square", "triangle"]
    assert len(list((demo / "train" / "circle").glob("*.png"))) == 300
    (run,) = (tmp_path / "runs").iterdir()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_acc"] for r in records if "event" not in r) >= 0.90
    assert "best val_acc" in capsys.readouterr().out
