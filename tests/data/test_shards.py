"""Tar shards: ``fasttrain pack`` writes them (an index per shard, a manifest, a new folder), ``data.root`` reads
them (a packed folder, a brace pattern, one ``.tar``, WebDataset's own shards, ``http://`` URLs) on every backend
with the files' samples, order and augmentation, and a bad member is named ``shard.tar:member`` and skipped."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import signal
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import Config, ConfigError, DataConfig, RuntimeConfig, apply_overrides
from fasttrain.data import files as files_mod
from fasttrain.data.base import InputSpec, LoaderRequest
from fasttrain.data.dali import dali_status
from fasttrain.data.files import INDEX_SUFFIX, MANIFEST, open_regular, split_address
from fasttrain.data.formats import SIDE_BY_SIDE
from fasttrain.data.loaders import make_loader
from fasttrain.data.pack import pack, parse_size
from fasttrain.data.samples import Samples
from fasttrain.data.shards import expand_braces
from fasttrain.data.sources import discover

needs_dali = pytest.mark.skipif(not dali_status()[0], reason=dali_status()[1])
BACKENDS = ["torch", "cache", pytest.param("dali", marks=needs_dali)]


def _images(folder: Path, n: int, seed: int) -> None:
    """``n`` noise images in two class folders, JPEG and PNG alternately, of mixed sizes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / ("a" if i % 3 else "b")
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(18, 40, 2))
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"{i:02d}.{'jpg' if i % 2 else 'png'}")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """(an ImageFolder tree with a seeded hold-out, its shards: 2 KiB each, so several)."""
    base = tmp_path_factory.mktemp("packed")
    _images(base / "files", 30, seed=3)
    pack(DataConfig(root=str(base / "files")), base / "shards", shard_bytes=8192, order="source")  # files == shards
    return base / "files", base / "shards"


def _data(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **kw)


# -- pack ---------------------------------------------------------------------------------------------------------


def test_pack_writes_keyed_members_an_index_per_shard_and_a_manifest(packed):
    files, shards = packed
    manifest = json.loads((shards / MANIFEST).read_text())
    src = discover(_data(files))
    assert manifest["kind"] == "class" and manifest["classes"] == src.class_names == ["a", "b"]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": len(src.train), "val": len(src.val)}
    train = manifest["splits"]["train"]["shards"]
    assert len(train) > 1 and train[0] == "train-000000.tar"
    with tarfile.open(shards / train[0]) as tar:
        names = tar.getnames()
        members = {m.name: (m.offset_data, m.size) for m in tar}
    assert names[:2] == ["000000" + Path(src.train.paths[0]).suffix, "000000.cls"]  # a sample's files share a key
    index = json.loads((shards / (train[0] + INDEX_SUFFIX)).read_text())
    assert {n: (o, s) for n, o, s in index["members"]} == members  # offsets as tarfile reads them
    assert index["targets"]["000000"] == src.train.targets[0]
    assert sorted(p.name for p in shards.parent.iterdir()) == ["files", "shards"]  # no temporary folder left


def test_pack_refuses_an_existing_folder_and_writes_nothing_into_it(packed, tmp_path):
    files, _ = packed
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        pack(_data(files), out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_pack_cli_names_an_unreadable_file_and_skips_it(packed, tmp_path, capsys):
    from fasttrain.cli import main

    files, _ = packed
    data = tmp_path / "data"
    _images(data, 9, seed=5)
    (data / "a" / "zz.jpg").symlink_to(tmp_path / "gone.jpg")  # a broken link: discovery names it, pack skips it
    assert main(["pack", str(data), str(tmp_path / "s"), "--shard-size", "4KiB"]) == 0
    out = capsys.readouterr().out
    assert "zz.jpg" in out and "SKIPPED" in out
    assert main(["pack", str(data), str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_pack_skips_and_names_what_training_would_skip(tmp_path):
    """A truncated JPEG and random bytes named .jpg were copied into the shards without a word (check-data then
    found them by member name only): they are judged by the loaders' pre-check as they are read, named and left
    out, and the shards hold the good files alone."""
    data = tmp_path / "data"
    _images(data, 9, seed=5)
    good = sorted(data.rglob("*.jpg"))[0]
    (data / "a" / "cut.jpg").write_bytes(good.read_bytes()[:-300])
    (data / "b" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    report = pack(_data(data), tmp_path / "s")
    assert sorted(Path(f).name for f, _ in report.skipped) == ["cut.jpg", "noise.jpg"]
    assert all(why for _, why in report.skipped)
    manifest = json.loads((tmp_path / "s" / "shards.json").read_text())
    assert sorted(Path(f).name for f, _ in manifest["skipped"]) == ["cut.jpg", "noise.jpg"]
    assert sum(report.counts.values()) == 9
    from fasttrain.data.checks import check_data

    assert not check_data(str(tmp_path / "s")).bad


def test_pack_shuffles_the_training_samples_so_a_shard_holds_every_class(tmp_path):
    """Discovery lists a class's files together and pack wrote them so: a stream reads shards whole through a
    buffer, and class-sorted shards gave batches of one or two classes (val_acc 0.46 against 0.60 from files)."""
    import json

    files = tmp_path / "files"
    for c in range(4):
        (files / f"class{c}").mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (20 * i, 60 * c, 0)).save(files / f"class{c}" / f"{i:02d}.png")
    cfg = _data(files, val_fraction=0.0)
    shuffled = pack(cfg, tmp_path / "mixed", shard_bytes=32768)
    assert "training samples in shuffled (seed 0) order" in shuffled.to_text()
    assert json.loads((tmp_path / "mixed" / "shards.json").read_text())["train_order"] == "shuffled (seed 0)"
    a, b = discover(cfg), discover(_data(tmp_path / "mixed", val_fraction=0.0))
    first = next(iter(sorted({p.rsplit(":", 1)[0] for p in b.train.paths})))
    in_first = [t for p, t in zip(b.train.paths, b.train.targets) if p.startswith(first + ":")]
    assert len(set(in_first)) >= 3, in_first  # one shard, several classes
    # the same samples, byte for byte, in another order
    by_files = sorted((Path(p).read_bytes(), t) for p, t in zip(a.train.paths, a.train.targets))
    assert sorted((open_regular(p).read(), t) for p, t in zip(b.train.paths, b.train.targets)) == by_files
    again = pack(cfg, tmp_path / "again", shard_bytes=32768)  # seeded: the same order again
    assert discover(_data(tmp_path / "again", val_fraction=0.0)).train.targets == b.train.targets
    assert again.counts == shuffled.counts
    kept = pack(cfg, tmp_path / "kept", shard_bytes=32768, order="source")
    assert discover(_data(tmp_path / "kept", val_fraction=0.0)).train.targets == a.train.targets
    assert kept.order == "source"


@pytest.mark.parametrize("text, n", [("64MB", 64 * 10**6), ("1GiB", 2**30), ("4096", 4096), ("1.5k", 1500)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "12", "3 parsecs"])
def test_parse_size_names_the_flag(text):
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size(text)


def test_brace_patterns_keep_their_padding():
    assert expand_braces("a-{008..010}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar"]
    assert expand_braces("{1..2}-{0..1}") == ["1-0", "1-1", "2-0", "2-1"]
    with pytest.raises(ConfigError, match="counts down"):
        expand_braces("a-{3..1}.tar")


# -- reading ------------------------------------------------------------------------------------------------------


def test_shards_hold_the_files_samples_in_order_byte_for_byte(packed):
    files, shards = packed
    a, b = discover(_data(files)), discover(_data(shards))
    assert b.format == "shards" and b.class_names == a.class_names
    for sa, sb in ((a.train, b.train), (a.val, b.val)):
        assert sb.targets == sa.targets
        assert all(split_address(p) for p in sb.paths)
        for pa, pb in zip(sa.paths, sb.paths):
            with open(pa, "rb") as f, open_regular(pb) as g:
                assert f.read() == g.read()


def test_a_pattern_or_one_shard_is_a_training_split_with_a_hold_out(packed):
    _, shards = packed
    n = len(list(shards.glob("train-*.tar")))
    src = discover(_data(shards / f"train-{{000000..{n - 1:06d}}}.tar", val_fraction=0.25))
    full = discover(_data(shards))
    assert len(src.train) + len(src.val) == len(full.train) and src.class_names == ["a", "b"]
    one = discover(_data(shards / "train-000000.tar", val_fraction=0))
    assert one.val is None and 0 < len(one.train) < len(full.train)


def test_webdataset_shards_without_an_index_are_read_from_their_headers(tmp_path):
    """Shards from WebDataset's own tools: no .idx, no manifest; .cls members give the classes."""
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(tmp_path / f"train-{s:04d}.tar", "w") as tar:
            for k in range(5):
                img = tmp_path / "x.png"
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(img)
                tar.add(img, f"s{s}k{k}.png")
                cls = tmp_path / "x.cls"
                cls.write_text(str(k % 3))
                tar.add(cls, f"s{s}k{k}.cls")
    for p in (tmp_path / "x.png", tmp_path / "x.cls"):
        p.unlink()
    src = discover(_data(tmp_path, val_fraction=0.2))
    assert src.format == "shards" and src.class_names == ["0", "1", "2"]
    assert len(src.train) + len(src.val) == 10
    with open_regular(src.train.paths[0]) as f:
        assert Image.open(f).size == (20, 20)


def test_a_folder_dataset_with_a_stray_archive_stays_a_folder_dataset(packed, tmp_path):
    files, _ = packed
    src = discover(_data(files))
    (tmp_path / "a").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "a" / "x.png")
    (tmp_path / "backup.tar").write_bytes(b"")
    assert discover(_data(tmp_path, val_fraction=0)).format == "folder" and src.format == "folder"


def _cfg(seed: int = 4) -> Config:
    return Config(
        data=DataConfig(image_size=16, crop_scale_min=0.3, workers=0, dali_threads=1), runtime=RuntimeConfig(seed=seed)
    )


def _batches(backend: str, split, *, train: bool, epoch: int = 2, skip: int = 0):
    cfg = _cfg()
    mean, std = cfg.data.norm_mean_std()
    spec = InputSpec(torch.device("cpu"), torch.float32, False, tuple(mean), tuple(std))
    loader = make_loader(backend, LoaderRequest(Samples(split, "class"), train=train, batch_size=4), cfg, spec)
    try:
        loader.set_epoch(epoch)
        if skip:
            loader.skip_batches(skip)
        return [(b.targets.tolist(), b.inputs) for b in loader], list(loader.skipped)
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_draws_the_same_batches_from_shards_as_from_files(packed, backend):
    """Same samples, same (seed, epoch) order, same augmentation: pixels equal, and so is a resumed epoch."""
    files, shards = packed
    a, b = discover(_data(files)), discover(_data(shards))
    for train in (True, False):
        got_files, _ = _batches(backend, a.train if train else a.val, train=train)
        got_shards, _ = _batches(backend, b.train if train else b.val, train=train)
        assert len(got_shards) == len(got_files) > 0
        for (ta, xa), (tb, xb) in zip(got_files, got_shards):
            assert ta == tb and torch.equal(xa, xb)
    resumed, _ = _batches(backend, b.train, train=True, skip=2)
    whole, _ = _batches(backend, b.train, train=True)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(resumed, whole[2:]))


def _damaged_copy(shards: Path, dest: Path) -> tuple[Path, str]:
    """A copy of the packed folder whose first training shard holds a member with garbage bytes; its address."""
    import shutil

    shutil.copytree(shards, dest)
    first = dest / "train-000000.tar"
    index = json.loads((dest / ("train-000000.tar" + INDEX_SUFFIX)).read_text())
    name, offset, size = next(m for m in index["members"] if not m[0].endswith(".cls"))
    with open(first, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xd8\xff" + b"\x00" * (size - 3) if name.endswith(".jpg") else b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    return first, f"{first}:{name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_member_is_named_by_shard_and_member_and_skipped(packed, tmp_path, backend):
    _, shards = packed
    _, bad = _damaged_copy(shards, tmp_path / "damaged")
    src = discover(_data(tmp_path / "damaged"))
    assert bad in src.train.paths
    batches, skipped = _batches(backend, src.train, train=True)
    assert [p for p, _ in skipped] == [bad]
    assert sum(len(t) for t, _ in batches) == (len(src.train) // 4) * 4  # the batch was topped up


def test_a_member_the_index_lacks_or_a_shard_cut_short_is_an_error_naming_it(packed, tmp_path):
    import shutil

    _, shards = packed
    shutil.copytree(shards, tmp_path / "s")
    shard = tmp_path / "s" / "train-000000.tar"
    with pytest.raises(FileNotFoundError, match="no member 'nope.jpg'") as e:
        open_regular(f"{shard}:nope.jpg")
    assert e.value.filename == f"{shard}:nope.jpg"
    files_mod._INDEXES.pop(str(shard), None)
    last = json.loads((tmp_path / "s" / ("train-000000.tar" + INDEX_SUFFIX)).read_text())["members"][-1]
    with open(shard, "r+b") as f:
        f.truncate(last[1] + last[2] - 1)  # the last member loses its last byte
    with pytest.raises(OSError, match="cut short"):
        open_regular(f"{shard}:{last[0]}")


def test_members_of_64_kib_or_more_pass_the_precheck(tmp_path):
    """A member opens as an in-memory file (no file number): its size is taken without one, so ImageNet-size
    JPEGs (over the 64 KiB read at once) are kept, not skipped as unreadable."""
    from fasttrain.data.checks import check_file, precheck

    rng = np.random.default_rng(11)
    for i in range(6):
        d = tmp_path / "files" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((400, 400, 3)) * 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=95)
    assert min(p.stat().st_size for p in (tmp_path / "files").rglob("*.jpg")) > 64 * 1024
    pack(_data(tmp_path / "files", val_fraction=0), tmp_path / "shards")
    src = discover(_data(tmp_path / "shards", val_fraction=0))
    paths = list(src.train.paths)
    assert len(paths) == 6 and all(split_address(p) for p in paths)
    for p in paths:
        info, why, size = check_file(p)
        assert why is None and info is not None and info.width == 400
        with open_regular(p) as f:
            assert size == len(f.read())
    out = precheck(src.train.paths, max_pixels=10**8, threads=1)
    assert out.bad == [] and out.keep == list(range(6))


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/fd"), reason="needs fork and /proc")
def test_a_forked_worker_reads_through_its_parents_shard_descriptors(packed):
    """A forked DataLoader worker dropped the inherited descriptors without closing them (up to 256 leaked per
    worker) and opened each shard again; it now reads through them (pread: no shared position). The parent's lock,
    held by one of its threads at the fork, is a new one in the child (it would wait for ever)."""
    _, shards = packed
    path = discover(_data(shards)).train.paths[0]
    shard = split_address(path)[0]
    with open_regular(path) as f:
        want = f.read()

    def held(where: str) -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(where) for fd in fds)

    def in_child(hold_lock: bool) -> str:
        r, w = os.pipe()
        with files_mod._LOCK if hold_lock else contextlib.nullcontext():  # as another thread of the parent may
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    signal.alarm(5)
                    with open_regular(path) as f:
                        same = f.read() == want
                    os.write(w, f"{int(same)} {held(shard)}".encode())
                finally:
                    os._exit(0)
        os.close(w)
        with os.fdopen(r) as out:
            said = out.read()
        os.waitpid(pid, 0)
        return said

    before = held(shard)
    assert before >= 1
    assert in_child(hold_lock=False) == f"1 {before}"  # the right bytes, through the inherited descriptor
    assert in_child(hold_lock=True) == f"1 {before}"  # not stuck on a lock no thread of the child will free


def test_a_damaged_index_is_a_config_error_naming_it(packed, tmp_path):
    import shutil

    _, shards = packed
    shutil.copytree(shards, tmp_path / "s")
    idx = tmp_path / "s" / ("val-000000.tar" + INDEX_SUFFIX)
    idx.write_text("{not json")
    with pytest.raises(ConfigError, match=f"shard index {idx} is damaged"):
        discover(_data(tmp_path / "s"))


def test_vector_and_pair_datasets_pack_and_read_back(tmp_path):
    from fasttrain.data.synthetic import make_drawing_dataset, make_paired_dataset

    drawing = make_drawing_dataset(tmp_path / "drawing", sessions=3, steps=3, size=24, seed=1)
    cfg = _data(drawing, format="drawing")
    pack(cfg, tmp_path / "ds", order="source")  # read back pairwise
    a, b = discover(cfg), discover(_data(tmp_path / "ds"))
    assert b.target_names == a.target_names and b.train.targets == a.train.targets and len(b.train) > 0
    # the config that packed it points data.root at the packed folder, its data.format kept
    assert discover(_data(tmp_path / "ds", format="drawing")).train.targets == a.train.targets
    for layout in ("folders", "side_by_side"):
        paired = make_paired_dataset(tmp_path / layout, n=6, size=16, layout=layout, seed=2)
        cfg = _data(paired, format="paired")
        pack(cfg, tmp_path / f"{layout}-s", order="source")
        a, b = discover(cfg), discover(_data(tmp_path / f"{layout}-s"))
        assert len(b.train) == len(a.train) > 0
        kept = discover(_data(tmp_path / f"{layout}-s", format="paired"))  # pix2pix's config, data.root changed
        assert kept.format == "shards" and kept.train.paths == b.train.paths
        from fasttrain.tasks.pix2pix import Pix2PixTask

        Pix2PixTask(apply_overrides(Config(), ["task.name=pix2pix", "model.name=unet", "optim.name=adam"]), None, kept)
        for (pa, ta), (pb, tb) in zip(zip(a.train.paths, a.train.targets), zip(b.train.paths, b.train.targets)):
            assert open_regular(pb).read() == Path(pa).read_bytes()
            if ta == SIDE_BY_SIDE:
                assert tb == SIDE_BY_SIDE
            else:
                assert ".target." in tb and open_regular(tb).read() == Path(ta).read_bytes()


class Stop(Exception):
    pass


def test_a_killed_run_on_shards_resumes_to_the_weights_of_the_same_run_on_files(packed, tmp_path):
    from fasttrain.checkpoint import load_checkpoint
    from fasttrain.engine import train
    from tests.tinyrun import tiny_cfg

    files, shards = packed

    def cfg(root, runs):
        return tiny_cfg(root, runs, "train.batch_size=8", "data.image_size=16", "model.dropout=0.2", max_steps=0)

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]

    def kill_after_one(state, record):
        if record["epoch"] == 1:
            raise Stop

    straight = train(cfg(files, tmp_path / "a"), progress=False)
    with pytest.raises(Stop):
        train(cfg(shards, tmp_path / "b"), progress=False, on_epoch_end=kill_after_one)
    (run,) = (tmp_path / "b").iterdir()
    resumed = train(resume=run, progress=False)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    wa, wb = weights(straight.run_dir), weights(run)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- over HTTP ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(folder: Path, cut: int = 0):
    """``folder`` served by http.server on 127.0.0.1 (a thread): its URL, and the paths requested so far.
    ``cut``: the first ``cut`` requests of each ``.tar`` get half its bytes, then the connection closes."""
    paths: list[str] = []
    cuts: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            paths.append(self.path)

        def copyfile(self, source, outputfile):
            try:
                if self.path.endswith(".tar") and cuts.get(self.path, 0) < cut:
                    cuts[self.path] = cuts.get(self.path, 0) + 1
                    data = source.read()
                    outputfile.write(data[: len(data) // 2])
                    return
                super().copyfile(source, outputfile)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a streaming reader that stopped mid-shard (a training epoch's end) closed the connection

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", paths
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(packed):
    """The packed folder served over HTTP on 127.0.0.1, its URL; requests are counted."""
    with serve(packed[1]) as got:
        yield got


def test_shards_over_http_are_downloaded_whole_once_and_read_like_local_ones(packed, served, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    files, shards = packed
    url, requests = served
    local = discover(_data(shards))
    remote = discover(_data(url, stream="off"))
    assert remote.class_names == local.class_names and remote.train.targets == local.train.targets
    for pa, pb in zip(local.train.paths, remote.train.paths):
        assert open_regular(pa).read() == open_regular(pb).read()
    tars = [p for p in requests if p.endswith(".tar")]
    assert len(tars) == len(set(tars)) == len(list(shards.glob("*.tar")))  # each shard fetched whole, once
    shard, _ = split_address(remote.train.paths[0])
    assert Path(shard).is_relative_to(tmp_path / "cache" / "shards")
    assert Path(shard + INDEX_SUFFIX).read_bytes() == (shards / (Path(shard).name + INDEX_SUFFIX)).read_bytes()
    requests.clear()
    discover(_data(url + "train-000000.tar", stream="off"))  # cached: only the manifest and the index are fetched again
    assert not [p for p in requests if p.endswith(".tar")]


def test_an_unreachable_url_is_a_config_error_naming_it(served, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    url, _ = served
    with pytest.raises(ConfigError, match="nothing-here/shards.json"):
        discover(_data(url + "nothing-here/"))
    from fasttrain.prepare import resolve_data_root

    assert resolve_data_root(apply_overrides(Config(), [f"data.root={url}"])).data.root == url  # not a local path


# -- object stores (fsspec, an optional extra) --------------------------------------------------------------------


def test_an_object_store_url_is_read_through_fsspec(packed, tmp_path, monkeypatch):
    """fsspec's in-memory file system stands in for s3:// or gs://: the same samples as the local folder."""
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    _, shards = packed
    fs = fsspec.filesystem("memory")
    bucket = f"/bucket-{tmp_path.name}"
    for f in shards.iterdir():
        fs.pipe(f"{bucket}/{f.name}", f.read_bytes())
    try:
        local, remote = discover(_data(shards)), discover(_data(f"memory://{bucket}"))
        assert remote.train.targets == local.train.targets and remote.class_names == local.class_names
        assert open_regular(remote.val.paths[-1]).read() == open_regular(local.val.paths[-1]).read()
    finally:
        fs.rm(bucket, recursive=True)


def test_an_object_store_without_fsspec_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec -> ImportError
    with pytest.raises(ConfigError, match=r"s3:// needs fsspec.*fasttrain\[shards\]"):
        discover(_data("s3://bucket/train-{000000..000001}.tar"))


def test_processes_sharing_the_cache_download_each_shard_once(packed, served, tmp_path, monkeypatch):
    """Four discoveries at once (the ranks of a node): one downloads each shard, the others wait and reuse it."""
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    _, shards = packed
    url, requests = served
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(discover(_data(url, stream="off")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r.train.paths == results[0].train.paths for r in results)
    tars = [p for p in requests if p.endswith(".tar")]
    assert sorted(tars) == sorted(f"/{p.name}" for p in shards.glob("*.tar"))
