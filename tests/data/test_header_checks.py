"""data.header_checks: a cold dataset index built without opening a file ("read"), each file then checked by the
loader as it reads it, with the pre-check's rules and reasons, skipped as the pre-check skips (not counted by
data.max_bad_per_epoch); "start" checks every header when the index is built; "auto" picks by the file count."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import badfiles
import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain import config as config_module
from fasttrain.config import Config, ConfigError, DataConfig
from fasttrain.data import index
from fasttrain.data.base import InputSpec, LoaderRequest
from fasttrain.data.checks import BadDataError, UnusableImage, check_header, load_checked, precheck, read_checked
from fasttrain.data.decode import load_image
from fasttrain.data.index import load_or_build
from fasttrain.data.loaders import make_loader
from fasttrain.data.samples import Samples, precheck_samples
from fasttrain.data.sources import Split

NO_BOMB = {k: v for k, v in badfiles.BAD.items() if k != "bomb.png"}  # huge-header.jpg: the pixel limit, cheaply


def _dali_ok() -> bool:
    from fasttrain.data.dali import dali_status

    return dali_status()[0]


def tree(root: Path, classes: int = 3, per_class: int = 5) -> Path:
    for c in range(classes):
        d = root / "train" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8 + i, 8 + c), (40 * c, 10 * i, 90)).save(d / f"img_{i:03d}.jpg", quality=80)
    return root


def bad_tree(root: Path) -> Path:
    """Two classes of good JPEGs, one of them holding the bad corpus (the bomb aside) and its awkward good files."""
    tree(root, classes=2, per_class=4)
    badfiles.write_corpus(root / "train" / "class_1", bad=NO_BOMB)
    return root


def opened_images(monkeypatch) -> list[str]:
    """Every image file os.open is asked for (every file read in fasttrain goes through it)."""
    seen: list[str] = []
    real = os.open

    def counted(path, *a, **k):
        if Path(os.fsdecode(path)).suffix.lower() in (".jpg", ".png"):
            seen.append(os.fsdecode(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", counted)
    return seen


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))


def test_the_setting_is_validated_by_name():
    for ok in ("auto", "start", "read"):
        assert DataConfig(header_checks=ok).header_checks == ok
    with pytest.raises(ConfigError, match=r"data\.header_checks: must be one of auto, start, read, got 'later'"):
        DataConfig(header_checks="later")


def test_read_builds_a_cold_index_without_opening_a_file_and_it_is_warm_next(tmp_path, cache, monkeypatch):
    root = tree(tmp_path / "data")
    data = DataConfig(root=str(root), header_checks="read")
    opened = opened_images(monkeypatch)
    built = load_or_build(data)
    assert not built.reused and opened == []
    assert built.index.unchecked == built.index.files == 15 and built.index.bad == []
    src = built.index.source()
    pre = precheck(src.train.paths, max_pixels=data.max_image_pixels, threads=1, unchecked=True)
    assert pre.keep == list(range(len(src.train))) and set(pre.infos) == {None} and opened == []
    again = load_or_build(data)  # the fingerprint is the same: current, nothing rebuilt
    assert again.reused and again.index.unchecked == 15 and opened == []
    # asked for headers (no `unchecked=True`): every file is checked then, as a split without an index is
    checked = precheck(again.index.source().train.paths, max_pixels=data.max_image_pixels, threads=1)
    assert None not in checked.infos and len(opened) == len(src.train)


@pytest.mark.parametrize(("threshold", "expected"), [(10, "read"), (16, "start")])
def test_auto_checks_at_start_below_the_threshold_and_at_read_at_or_above(
    tmp_path, cache, monkeypatch, threshold, expected
):
    monkeypatch.setattr(config_module, "HEADER_CHECKS_AT_START_BELOW", threshold)
    root = tree(tmp_path / "data")  # 15 files
    got = load_or_build(DataConfig(root=str(root))).index
    assert got.unchecked == (15 if expected == "read" else 0)
    assert got.fingerprint == index.listing(root).fingerprint and load_or_build(DataConfig(root=str(root))).reused


def test_the_index_command_checks_every_header_unless_told_read(tmp_path, cache, monkeypatch, capsys):
    from fasttrain.cli import main

    monkeypatch.setattr(config_module, "HEADER_CHECKS_AT_START_BELOW", 10)  # auto would say read
    root = tree(tmp_path / "data")
    (root / "train" / "class_0" / "img_000.jpg").write_bytes(b"not an image")
    assert main(["index", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 bad," in out and "unchecked" not in out and "BAD" in out
    assert load_or_build(DataConfig(root=str(root))).index.unchecked == 0
    assert main(["index", str(root), "--set", "data.header_checks=read"]) == 0
    assert "15 unchecked" in capsys.readouterr().out


def test_a_start_index_serves_a_read_start_and_a_read_index_is_checked_for_a_start_start(tmp_path, cache, monkeypatch):
    root = tree(tmp_path / "data")
    start, read = DataConfig(root=str(root), header_checks="start"), DataConfig(root=str(root), header_checks="read")
    assert load_or_build(start).index.unchecked == 0
    opened = opened_images(monkeypatch)
    served = load_or_build(read)  # every verdict already there: reused, nothing opened
    assert served.reused and opened == [] and served.index.unchecked == 0
    pre = precheck(served.index.source().train.paths, max_pixels=start.max_image_pixels, threads=1, unchecked=True)
    assert None not in pre.infos and opened == []
    rebuilt = load_or_build(read, rebuild=True)
    assert rebuilt.index.unchecked == 15 and opened == []
    checked = load_or_build(start)  # a start that wants every header: the unchecked index is built again, checked
    assert not checked.reused and checked.index.unchecked == 0 and len(opened) == 15
    assert load_or_build(read).reused  # and that one serves both


def test_size_targets_still_get_every_size_at_construction(tmp_path, cache):
    root = tree(tmp_path / "data")
    data = DataConfig(root=str(root), header_checks="read", val_fraction=0.0)
    split = load_or_build(data).index.source().train
    sized = precheck_samples(Samples(split, "vector", size_targets=True), data, threads=1)
    assert [(i.width, i.height) for i in sized.infos] == [Image.open(p).size for p in split.paths]
    plain = precheck_samples(Samples(split, "class"), data, threads=1)
    assert set(plain.infos) == {None} and plain.unchecked is not None and plain.unchecked.all()


def test_a_file_judged_when_read_gets_the_verdict_and_pixels_of_the_start_check(tmp_path):
    good, bad = badfiles.write_corpus(tmp_path / "corpus", bad=NO_BOMB)
    for path in good + bad:
        info, why = check_header(path)
        try:
            got: tuple = (read_checked(path)[1], None)
        except UnusableImage as e:
            got = (None, str(e))
        assert got == (info, why), path
    for path in good:  # the same pixels as the loaders' plain decode of a pre-checked file
        assert np.array_equal(np.asarray(load_checked(path, 3)), np.asarray(load_image(path, 3))), path


def _loader(backend: str, root: Path, checks: str, *, train: bool, **data):
    cfg = Config(
        data=DataConfig(
            root=str(root),
            image_size=16,
            val_fraction=0.0,
            workers=1 if backend == "torch-workers" else 0,
            dali_threads=1,
            loader=backend.split("-")[0],
            header_checks=checks,
            **data,
        )
    )
    src = index.indexed_source(cfg.data)
    mean, std = cfg.data.norm_mean_std()
    spec = InputSpec(torch.device("cpu"), torch.float32, False, tuple(mean), tuple(std))
    request = LoaderRequest(Samples(src.train, "class"), train, 2)
    return make_loader(backend.split("-")[0], request, cfg, spec), src


BACKENDS = [
    "torch",
    "torch-workers",
    pytest.param("dali", marks=pytest.mark.skipif(not _dali_ok(), reason="DALI cannot run here")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_found_when_read_are_skipped_with_the_pre_checks_reasons_and_not_counted(tmp_path, cache, backend):
    root = bad_tree(tmp_path / "data")
    start, src = _loader(backend, root, "start", train=False, max_bad_per_epoch=1)
    expected_targets = torch.cat([b.targets for b in start]).tolist()
    expected = sorted(start.skipped)  # the pre-check's refusals, and the one file that fails to decode
    start.close()
    refused = [s for s in expected if not s[0].endswith("corrupt-deflate.png")]
    assert len(refused) >= 6 and len(expected) == len(refused) + 1
    # read: no file is refused at construction; each is judged as it is read. Only the file that passed the rules
    # and failed to decode counts: 1 allowed, where the refusals would have stopped the run. (The checked index
    # would serve a read start: it goes, and the next start builds one without checks.)
    shutil.rmtree(tmp_path / "cache" / "index")
    read, src_read = _loader(backend, root, "read", train=False, max_bad_per_epoch=1)
    assert read.skipped == [] and len(src_read.train) == len(src.train)
    assert torch.cat([b.targets for b in read]).tolist() == expected_targets
    assert sorted(read.skipped) == expected
    read.close()
    train, _ = _loader(backend, root, "read", train=True, max_bad_per_epoch=1)
    for epoch in range(2):
        train.set_epoch(epoch)
        assert all(len(b) == 2 and b.targets.tolist() for b in train)
    assert sorted(train.skipped) == expected
    train.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_that_fail_to_decode_still_count_when_unchecked(tmp_path, cache, backend):
    root = tree(tmp_path / "data", classes=1, per_class=4)
    for i in range(2):
        badfiles.write_png_corrupt_deflate(root / "train" / "class_0" / f"c{i}.png")
    loader, _ = _loader(backend, root, "read", train=False, max_bad_per_epoch=1)
    with pytest.raises(BadDataError, match=r"data.max_bad_per_epoch = 1"):
        list(loader)
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bad_files_read_gives_the_batches_of_start_bit_for_bit(tmp_path, cache, backend):
    """Same order, same crops and flips, same pixels (awkward files routed through Pillow alike), every epoch."""
    root = tree(tmp_path / "data", classes=2, per_class=4)
    badfiles.write_corpus(root / "train" / "class_1", bad={})  # transparent, CMYK, 16-bit: the Pillow route
    got = {}
    for checks in ("start", "read"):
        shutil.rmtree(tmp_path / "cache" / "index", ignore_errors=True)
        for train in (True, False):
            loader, src = _loader(backend, root, checks, train=train)
            assert load_or_build(DataConfig(root=str(root), header_checks=checks)).index.unchecked == (
                0 if checks == "start" else len(src.train)
            )
            for epoch in range(2):
                loader.set_epoch(epoch)
                got[checks, train, epoch] = [(b.inputs.clone(), b.targets.clone()) for b in loader]
            assert loader.skipped == []
            loader.close()
    for key in [k for k in got if k[0] == "start"]:
        a, b = got[key], got[("read", *key[1:])]
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(a, b)), key


@pytest.mark.parametrize("backend", ["torch", "cache", *BACKENDS[2:]])
def test_regression_vectors_skip_unchecked_bad_files_when_read_too(tmp_path, cache, backend):
    root = bad_tree(tmp_path / "data")
    skipped = {}
    for checks in ("start", "read"):
        shutil.rmtree(tmp_path / "cache" / "index", ignore_errors=True)
        cfg = Config(
            data=DataConfig(
                root=str(root), image_size=16, val_fraction=0.0, workers=0, dali_threads=1, loader=backend,
                header_checks=checks, max_bad_per_epoch=1,
            )
        )  # fmt: skip
        split = index.indexed_source(cfg.data).train
        vectors = Split(split.name, split.paths, [[float(t), 0.5] for t in split.targets])
        mean, std = cfg.data.norm_mean_std()
        spec = InputSpec(torch.device("cpu"), torch.float32, False, tuple(mean), tuple(std))
        loader = make_loader(backend, LoaderRequest(Samples(vectors, "vector"), False, 2), cfg, spec)
        targets = torch.cat([b.targets for b in loader])
        assert targets.shape[1] == 2 and len(targets) == 13  # 2 x 4 plain and 5 awkward good files
        skipped[checks] = sorted(loader.skipped)
        loader.close()
    assert skipped["read"] == skipped["start"] and len(skipped["start"]) >= 7
