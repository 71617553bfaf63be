"""Behaviour kept as it is on purpose, and the README line that says so (each test fails if either changes)."""

from __future__ import annotations

import re
from pathlib import Path

from fasttrain.config import Config, DataConfig, apply_overrides
from fasttrain.data.sources import discover

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
PROSE = " ".join(README.split())  # sentences as one line


def test_an_empty_class_folder_is_still_an_output_and_the_readme_says_so(tmp_path):
    import badfiles

    for name in ("cat", "dog", "empty"):
        (tmp_path / name).mkdir()
    badfiles.write_jpeg(tmp_path / "cat" / "a.jpg")
    badfiles.write_jpeg(tmp_path / "dog" / "a.jpg")
    assert discover(DataConfig(root=str(tmp_path), val_fraction=0.0)).class_names == ["cat", "dog", "empty"]
    assert "An empty class folder is kept as a class (a model output no sample trains" in PROSE


def test_a_resume_may_change_the_seed_and_the_readme_says_what_that_costs():
    from fasttrain.checkpoint import check_resume_config

    saved = Config()
    check_resume_config(saved, apply_overrides(saved, ["runtime.seed=7"]), "run")  # allowed: no error
    assert "A resume may change `runtime.seed`" in PROSE and "no longer identical" in PROSE


def test_every_promise_of_bit_identical_cpu_resumes_names_the_thread_count():
    sentences = re.split(r"(?<=[.|])\s", PROSE)
    promises = [s for s in sentences if "bit-identical" in s]
    assert len(promises) >= 2 and all("thread" in s for s in promises), promises
