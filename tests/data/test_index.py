"""The dataset index: the same source as discovery for every format, reused while the files are unchanged and
rebuilt when they change, verdicts equal to the pre-check's, compact, never written over a user's file, and
shared from rank 0 under torchrun."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import badfiles
import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import ConfigError, DataConfig
from fasttrain.data import checks, index, sources
from fasttrain.data.checks import precheck
from fasttrain.data.index import INDEX_DIR, DatasetIndex, IndexedPaths, indexed_source, listing, load_or_build
from fasttrain.data.sources import discover
from fasttrain.data.synthetic import make_drawing_dataset, make_paired_dataset, make_shapes_dataset


def tree(root: Path, classes: int = 3, per_class: int = 5, size: int = 8) -> Path:
    for c in range(classes):
        d = root / "train" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size + i, size), (40 * c, 10 * i, 90)).save(d / f"img_{i:03d}.jpg", quality=80)
    return root


def same_source(a, b) -> None:
    assert (a.root, a.format, a.class_names, a.target_names, a.skipped) == (
        b.root,
        b.format,
        b.class_names,
        b.target_names,
        b.skipped,
    )
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.name == y.name and list(x.paths) == list(y.paths) and list(x.targets) == list(y.targets)


def counting_checks(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = index.check_files_stat

    def counted(paths, *a, **k):
        calls.append(len(paths))
        return real(paths, *a, **k)

    monkeypatch.setattr(index, "check_files_stat", counted)
    return calls


@pytest.fixture
def shapes(tmp_path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes", train_per_class=6, val_per_class=2, size=16)


# -- the same source as discovery -------------------------------------------------------------------------------


def _manifest_root(root: Path) -> Path:
    for i in range(6):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (i * 30, 0, 0)).save(root / "img" / f"{i}.png")
    rows = "".join(f"img/{i}.png,{i * 1.5},{'val' if i == 5 else 'train'}\n" for i in range(6))
    (root / "labels.csv").write_text("path,score,split\n" + rows + "img/missing.png,1,train\n")
    return root


@pytest.mark.parametrize(
    "fmt,make",
    [
        ("folder", lambda r: make_shapes_dataset(r, train_per_class=5, val_per_class=2, size=16)),
        ("folder", lambda r: tree(r)),  # no val/: a seeded hold-out
        ("manifest", _manifest_root),
        ("drawing", lambda r: make_drawing_dataset(r, sessions=4, steps=3, size=(20, 16))),
        ("paired", lambda r: make_paired_dataset(r, n=8, size=16)),
        ("paired", lambda r: make_paired_dataset(r, n=8, size=16, layout="side_by_side")),
    ],
)
def test_the_index_gives_the_source_discovery_gives_for_every_format(tmp_path, fmt, make):
    root = make(tmp_path / "data")
    data = DataConfig(root=str(root), format=fmt)
    built = load_or_build(data)
    assert not built.reused
    same_source(built.index.source(), discover(data))
    reused = load_or_build(data)
    assert reused.reused and reused.path == built.path
    same_source(reused.index.source(), discover(data))
    assert isinstance(reused.index.source().train.paths, IndexedPaths)


def test_indexed_paths_behave_like_the_list_they_stand_for(shapes):
    data = DataConfig(root=str(shapes))
    plain = discover(data).train.paths
    paths = load_or_build(data).index.source().train.paths
    assert len(paths) == len(plain) and paths == plain and list(paths) == plain
    assert paths[0] == plain[0] and paths[-1] == plain[-1] and paths[3:7] == plain[3:7]
    assert paths.take([5, 1, 1]) == [plain[5], plain[1], plain[1]]
    assert pickle.loads(pickle.dumps(paths)) == plain  # DataLoader workers started by spawn get a copy
    split = load_or_build(data).index.source().train
    sub = split.subset([2, 0])
    assert isinstance(sub.paths, IndexedPaths) and sub.paths == [plain[2], plain[0]]
    assert sub.targets == [split.targets[2], split.targets[0]]


# -- current or stale -------------------------------------------------------------------------------------------


def test_a_current_index_is_reused_without_checking_a_file(shapes, monkeypatch):
    data = DataConfig(root=str(shapes))
    load_or_build(data)
    calls = counting_checks(monkeypatch)
    again = load_or_build(data)
    assert again.reused and calls == []


def test_a_node_keeps_only_the_files_it_holds_of_rank_0s_index(shapes):
    """Another node's copy of the data, missing two files of one class: the source it trains on leaves them out
    (one listing per folder), so its fingerprint differs from rank 0's where the files are missing."""
    idx = load_or_build(DataConfig(root=str(shapes))).index
    full = idx.source(shapes)
    gone = sorted(p for p in full.train.paths if "/circle/" in p)[:2]
    for p in gone:
        os.unlink(p)
    here = index._on_this_node(idx.source(shapes))
    assert sorted(set(full.train.paths) - set(here.train.paths)) == gone
    assert len(here.train) == len(full.train) - 2 and list(here.val.paths) == list(full.val.paths)


@pytest.mark.parametrize("change", ["add", "remove", "touch", "rewrite"])
def test_any_change_under_the_root_makes_it_stale_and_it_is_rebuilt(shapes, change):
    data = DataConfig(root=str(shapes))
    first = load_or_build(data)
    victim = Path(discover(data).train.paths[0])
    if change == "add":
        Image.new("RGB", (9, 9)).save(victim.parent / "new.png")
    elif change == "remove":
        victim.unlink()
    elif change == "touch":
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:
        victim.write_bytes(b"not an image any more")
    again = load_or_build(data)
    assert not again.reused and again.index.fingerprint != first.index.fingerprint
    same_source(again.index.source(), discover(data))
    if change == "rewrite":
        assert [p for p, _ in again.index.bad] == [str(victim)]
    assert load_or_build(data).reused


def test_the_fingerprint_is_the_relative_listing_so_a_copy_elsewhere_matches(tmp_path):
    a = tree(tmp_path / "a")
    b = tmp_path / "b"
    os.system(f"cp -a {a} {b}")
    assert listing(a).fingerprint == listing(b).fingerprint
    (b / "train" / "class_0" / "img_000.jpg").unlink()
    assert listing(a).fingerprint != listing(b).fingerprint


def awkward_tree(root: Path) -> Path:
    """Class folders with every kind of entry: bad files, a FIFO, links, loops, a linked folder, non-image files,
    image files that discovery does not take."""
    badfiles.write_corpus(root / "train" / "a", bad={k: v for k, v in badfiles.BAD.items() if k != "bomb.png"})
    badfiles.write_link_loop(root / "train" / "a" / "loop.jpg")
    badfiles.write_folder_loop(root / "train" / "a" / "up")
    tree(root, classes=2, per_class=3)
    (root / "train" / "b").symlink_to(root / "train" / "class_0", target_is_directory=True)
    (root / "train" / "class_1" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(b"")  # outside every split: listed, never checked
    (root / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(root / "extra" / "unused.jpg")
    return root


def test_a_walk_from_the_builds_record_is_the_walk_of_the_folders(tmp_path):
    """Inside listed_once, walk_folders (what every format's discovery walks with) gives the same folders and
    entries (name, path, kind, reason, what stat says) as reading the folders, without reading them again."""
    from fasttrain.data.sources import entry_kind, listed_once, walk_folders

    root = awkward_tree(tmp_path / "data")

    def asked(call):
        try:
            return call()
        except OSError as e:  # a link loop: DirEntry raises, and so must a recorded entry
            return type(e).__name__

    def seen() -> list:
        out = []
        for d, entries in walk_folders(root):
            for e in entries:
                calls = (e.is_dir, e.is_file, e.is_symlink, lambda e=e: e.stat().st_mtime_ns)
                out.append((str(d), e.name, e.path, entry_kind(e), *(asked(c) for c in calls)))
        return out

    plain = seen()
    walk = index._Walk(str(root))
    scans: list[str] = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(os, "scandir", lambda *a: scans.append(a) or pytest.fail("a folder was read again"))
    try:
        with listed_once(walk.listed):
            again = seen()
    finally:
        monkey.undo()
    assert again == plain and scans == [] and len(plain) > 30


def test_the_builds_one_walk_gives_the_listings_fingerprint_on_an_awkward_tree(tmp_path):
    """The build takes each file's stat from its header check (or from the walk, or after the checks) instead of
    a listing of its own: the fingerprint must still be the one a later start's listing computes, on a tree with
    every kind of entry (bad files, a FIFO, links, loops, a linked folder, non-image files, image files that
    discovery does not take), and the same source as discovery must come out."""
    root = awkward_tree(tmp_path / "data")
    data = DataConfig(root=str(root), val_fraction=0.25)
    built = load_or_build(data)
    assert not built.reused and built.index.fingerprint == listing(root).fingerprint
    assert built.listing.files == listing(root).files and built.listing.folders == listing(root).folders
    same_source(built.index.source(), discover(data))
    assert load_or_build(data).reused


def test_settings_that_change_discovery_get_their_own_index(shapes):
    base = load_or_build(DataConfig(root=str(shapes)))
    other = load_or_build(DataConfig(root=str(shapes), max_samples=4))
    assert not other.reused and other.path != base.path and len(other.index.source().train) == 4
    assert load_or_build(DataConfig(root=str(shapes), image_size=64)).reused  # not a discovery setting


# -- verdicts -----------------------------------------------------------------------------------------------------


def test_verdicts_from_the_index_equal_the_pre_checks_and_no_file_is_opened(tmp_path, monkeypatch):
    root = tmp_path / "data"
    badfiles.write_corpus(root / "train" / "a", bad={k: v for k, v in badfiles.BAD.items() if k != "bomb.png"})
    badfiles.write_corpus(root / "train" / "b", bad={"truncated.jpg": badfiles.write_truncated_jpeg})
    data = DataConfig(root=str(root), val_fraction=0.0)
    plain = discover(data).train
    expected = precheck(plain.paths, max_pixels=data.max_image_pixels, threads=2)
    src = load_or_build(data).index.source()
    opened: list[str] = []
    monkeypatch.setattr(checks, "open_regular", lambda p: opened.append(str(p)))
    got = precheck(src.train.paths, max_pixels=data.max_image_pixels, threads=2)
    assert (got.keep, got.infos, got.bad) == (expected.keep, expected.infos, expected.bad) and opened == []
    assert len(got.bad) == 7 and all(why for _, why in got.bad)
    assert all(type(i.pil) is bool for i in got.infos)


def test_another_pixel_limit_checks_the_files_again(shapes, monkeypatch):
    data = DataConfig(root=str(shapes))
    paths = load_or_build(data).index.source().train.paths
    calls: list[int] = []
    real = checks._precheck
    monkeypatch.setattr(checks, "_precheck", lambda p, **k: calls.append(len(p)) or real(p, **k))
    precheck(paths, max_pixels=data.max_image_pixels, threads=1)
    assert calls == []
    precheck(paths, max_pixels=10**6, threads=1)  # judged under another limit: the index cannot answer
    assert calls == [len(paths)]


def test_check_headers_gives_check_header_s_verdicts_in_order(tmp_path):
    good, bad = badfiles.write_corpus(tmp_path / "c", bad={k: v for k, v in badfiles.BAD.items() if k != "bomb.png"})
    paths = sorted(good + bad) * 20  # enough for the threads to share
    got = checks.check_headers(paths, threads=3)
    assert [(i, w) for i, w, _ in got] == [checks.check_header(p) for p in paths]
    sizes = {p: s for p, (_, _, s) in zip(paths, got)}
    assert sizes[good[0]] == os.path.getsize(good[0])


@pytest.mark.parametrize("waiting", [False, True])
def test_threads_check_only_files_that_make_the_checks_wait(tmp_path, monkeypatch, waiting):
    """The first files are checked on the calling thread; threads take the rest only when those made it wait
    (voluntary context switches: a cold disk), and the verdicts come in order either way."""
    good, bad = badfiles.write_corpus(tmp_path / "c", bad={k: v for k, v in badfiles.BAD.items() if k != "bomb.png"})
    paths = sorted(good + bad) * 10
    monkeypatch.setattr(checks, "_PROBE", 20)
    switches = iter([0, 1000] if waiting else [5, 5])  # before and after the first files
    monkeypatch.setattr(checks, "_waits", lambda: next(switches))
    pools: list[int] = []
    real_pool = checks.ThreadPoolExecutor
    monkeypatch.setattr(
        checks, "ThreadPoolExecutor", lambda max_workers: pools.append(max_workers) or real_pool(max_workers)
    )
    got = checks.check_files_stat(paths, threads=3)
    assert [v[:3] for v in got] == [checks.check_file(p) for p in paths]
    assert pools == ([3] if waiting else [])


def test_a_large_file_is_checked_from_the_file_as_before(tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(big, quality=95)
    assert big.stat().st_size > 64 * 1024
    info, why, size = checks.check_file(big)
    assert why is None and (info.width, info.height) == (300, 300) and size == big.stat().st_size
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(big.read_bytes()[:70_000])
    assert checks.check_file(cut)[1].startswith("truncated or corrupt jpeg")


# -- where it is written ----------------------------------------------------------------------------------------


def test_training_writes_the_index_to_the_cache_and_the_command_beside_the_data(shapes, tmp_path, capsys):
    from fasttrain.cli import main

    data = DataConfig(root=str(shapes))
    built = load_or_build(data)  # what prepare does: never into the user's data folder
    assert not (shapes / INDEX_DIR).exists() and built.path is not None and not built.path.is_relative_to(shapes)
    assert main(["index", str(shapes)]) == 0
    out = capsys.readouterr().out
    assert "dataset index built" in out and str(shapes / INDEX_DIR) in out
    (beside,) = (shapes / INDEX_DIR).iterdir()
    assert load_or_build(data).path == beside  # found first by every node that sees the data
    assert main(["index", str(shapes), "--reuse", "-q"]) == 0
    assert "dataset index reused" in capsys.readouterr().out


def test_a_user_file_in_the_way_is_never_overwritten(shapes, capsys):
    from fasttrain.cli import main

    mine = shapes / INDEX_DIR
    mine.write_text("my notes")
    assert main(["index", str(shapes)]) == 0
    assert mine.read_text() == "my notes"
    assert "is not writable: the index went to the cache" in capsys.readouterr().out
    assert load_or_build(DataConfig(root=str(shapes))).reused


def test_a_damaged_index_file_is_rebuilt(shapes):
    data = DataConfig(root=str(shapes))
    path = load_or_build(data).path
    path.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ValueError, match="not a fasttrain dataset index"):
        DatasetIndex.from_bytes(path)
    again = load_or_build(data)
    assert not again.reused and again.path == path and DatasetIndex.from_bytes(path).samples == again.index.samples


def test_a_bad_layout_is_the_same_error_as_discovery(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no class folders"):
        indexed_source(DataConfig(root=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"nothing does not exist; --set data.root=FOLDER names your data"):
        indexed_source(DataConfig(root=str(tmp_path / "nothing")))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"file is not a folder; --set data.root=FOLDER"):
        indexed_source(DataConfig(root=str(tmp_path / "file")))
    with pytest.raises(ConfigError, match=r"nothing does not exist; --set data.root=FOLDER names your data"):
        discover(DataConfig(root=str(tmp_path / "nothing")))


# -- compact ------------------------------------------------------------------------------------------------------


def test_the_index_takes_under_150_bytes_per_sample(tmp_path):
    import tracemalloc

    root = tmp_path / "data"
    blob = (Path(badfiles.write_jpeg(tmp_path / "one.jpg"))).read_bytes()
    for c in range(20):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(100):
            (d / f"n{c:08d}_{i:05d}.JPEG").write_bytes(blob)  # ImageNet's names
    data = DataConfig(root=str(root))
    path = load_or_build(data).path
    tracemalloc.start()
    idx = DatasetIndex.from_bytes(path)
    src = idx.source()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert idx.nbytes / idx.samples < 150
    assert held / idx.samples < 150, held / idx.samples  # the arrays and the split's list of class indices
    assert len(src.train) + len(src.val) == 2000


# -- shared from rank 0 -------------------------------------------------------------------------------------------


class FakeJob:
    """distributed.current / decide / broadcast_object for one rank of a two-process job; rank 0's decision and
    broadcast are kept (the store's answer and the process group's bytes)."""

    sent: list = []
    decided: list = []
    waits: list = []

    def __init__(self, monkeypatch, rank: int):
        from fasttrain import distributed

        info = distributed.DistInfo(rank=rank, world_size=2, local_rank=rank)
        monkeypatch.setattr(distributed, "current", lambda: info)
        monkeypatch.setattr(distributed, "decide", self.decide)
        monkeypatch.setattr(distributed, "broadcast_object", self.broadcast)
        self.rank = rank

    def decide(self, name, fn, timeout_s=1800.0, *, long=False, progress=None):
        if self.rank == 0:
            FakeJob.decided.append(fn())
            return FakeJob.decided[-1]
        FakeJob.waits.append((timeout_s, long, progress))
        if not FakeJob.decided:
            pytest.fail("rank 1 waits for a decision rank 0 never makes")
        return FakeJob.decided[-1]

    def broadcast(self, obj, src=0):
        if self.rank == 0:
            FakeJob.sent.append(obj)
            return obj
        if not FakeJob.sent:
            pytest.fail("rank 1 waits for a broadcast rank 0 never sends (a hang until dist.timeout_s)")
        return FakeJob.sent[-1]

    @staticmethod
    def reset() -> None:
        FakeJob.sent, FakeJob.decided, FakeJob.waits = [], [], []


def test_rank_0_builds_and_the_other_ranks_receive_without_listing(shapes, monkeypatch):
    data = DataConfig(root=str(shapes))
    FakeJob.reset()
    FakeJob(monkeypatch, 0)
    first = indexed_source(data)
    FakeJob(monkeypatch, 1)
    monkeypatch.setattr(index, "listing", lambda root: pytest.fail("rank 1 walked the data"))
    monkeypatch.setattr(index, "find_source", lambda *a: pytest.fail("rank 1 discovered the data"))
    same_source(indexed_source(data), first)


def test_rank_0_s_error_is_raised_on_every_rank(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    data = DataConfig(root=str(tmp_path / "empty"))
    FakeJob.reset()
    FakeJob(monkeypatch, 0)
    with pytest.raises(ConfigError, match="holds no class folders") as first:
        indexed_source(data)
    FakeJob(monkeypatch, 1)
    with pytest.raises(ConfigError) as other:
        indexed_source(data)
    assert str(other.value) == str(first.value)


def test_rank_1_waits_for_rank_0_through_the_store_while_rank_0_beats(shapes, monkeypatch):
    """A cold listing may outlast dist.timeout_s: the other ranks wait for rank 0's word as long as rank 0 beats
    (dist.timeout_s after its last beat), and only then take the index from the broadcast (rank 0 is ready to
    send it)."""
    data = DataConfig(root=str(shapes))
    FakeJob.reset()
    FakeJob(monkeypatch, 0)
    indexed_source(data, timeout_s=7.0)
    FakeJob(monkeypatch, 1)
    indexed_source(data, timeout_s=7.0)
    assert FakeJob.waits == [(7.0, True, sources.progress)]  # while the listing and the checks move on


def test_every_file_stated_or_checked_marks_progress_not_only_each_folder(tmp_path):
    """The other ranks wait for rank 0's index while its progress count moves: one flat folder of a million
    files on a network mount is one folder (one readdir returns hundreds of names; a stat is a round trip per
    file), so the count must move per file, in the stats and the checks (a header-checked build, a listing-only
    one, and a warm start's listing)."""
    make_shapes_dataset(tmp_path / "flat", train_per_class=40, val_per_class=2, size=8)
    files = len(list((tmp_path / "flat").rglob("*.png")))
    for when in ("start", "read"):
        before = sources.progress()
        index.load_or_build(DataConfig(root=str(tmp_path / "flat")), header_checks=when, rebuild=True)
        assert sources.progress() - before >= files  # each file stat'ed or checked, not only each folder listed
    before = sources.progress()
    index.listing(tmp_path / "flat")  # a warm start's comparison
    assert sources.progress() - before >= files


_SLOW_RANK_0 = """
import os, pathlib, sys, time
from fasttrain import distributed
from fasttrain.config import DataConfig
from fasttrain.data import index, sources
# both ranks start their 2 s rendezvous together: imports under load may differ by more than 2 s
flags = pathlib.Path(sys.argv[2])
(flags / os.environ["RANK"]).touch()
while len(list(flags.iterdir())) < 2:
    time.sleep(0.01)
distributed.init("cpu", timeout_s=2.0)
def slow_listing():  # a cold listing, past the timeout: 5 s of folders listed one by one
    for _ in range(20):
        time.sleep(0.25)
        sources.note_progress()
def frozen():  # rank 0 alive (its beat thread too) but stuck in one blocking call: a hung mount
    time.sleep(6)
if distributed.current().is_main:
    build, stall = index.load_or_build, {"walking": slow_listing, "frozen": frozen}[sys.argv[3]]
    index.load_or_build = lambda *a, **k: (stall(), build(*a, **k))[1]
print("samples", len(index.indexed_source(DataConfig(root=sys.argv[1]), timeout_s=2.0).train), flush=True)
distributed.shutdown()
"""


@pytest.mark.slow  # two processes: seconds of imports each
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("rank_0", ["walking", "frozen"])
def test_a_listing_longer_than_dist_timeout_s_is_waited_for_while_it_moves(tmp_path, rank_0):
    """Two real ranks (gloo, dist.timeout_s = 2 s), rank 0's listing 5 s: rank 1 waited in the broadcast and
    timed out ("Timed out waiting 2000ms"); it now waits through the store while rank 0 beats, and both get the
    index. A rank 0 frozen for 6 s (its beat thread alive, its listing not moving) ends rank 1's wait after
    about 2 s, naming rank 0."""
    import socket
    import subprocess
    import sys

    make_shapes_dataset(tmp_path / "d", train_per_class=3, val_per_class=1, size=16)
    (tmp_path / "started").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1", FASTTRAIN_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _SLOW_RANK_0, str(tmp_path / "d"), str(tmp_path / "started"), rank_0],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in ranks]
    if rank_0 == "walking":
        assert [p.returncode for p in ranks] == [0, 0], outs
        assert all(out.strip().endswith("samples 12") for out in outs), outs
    else:
        assert ranks[1].returncode != 0 and "samples" not in outs[1], outs
        assert "TimeoutError: rank 1: rank 0 of the job gave no sign of life for 2 s (dist.timeout_s)" in outs[1]


def test_rank_0_decides_shards_for_every_rank_and_a_node_without_them_says_so(tmp_path, monkeypatch):
    """Each rank decided "shards or not" by itself: a node without the shard folder took the index path and waited
    for a broadcast rank 0 (on the shard path) never sent, until dist.timeout_s. Now rank 0's decision holds."""
    from fasttrain.data.pack import pack

    tree(tmp_path / "files")
    pack(DataConfig(root=str(tmp_path / "files")), tmp_path / "shards", shard_bytes=4096)
    data = DataConfig(root=str(tmp_path / "shards"))
    FakeJob.reset()
    FakeJob(monkeypatch, 0)
    assert indexed_source(data).format == "shards"
    (tmp_path / "shards").rename(tmp_path / "elsewhere")  # node 1 has no copy
    FakeJob(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"^data.root: .*shards is not a folder on this node$"):
        indexed_source(data)
    assert FakeJob.sent == []


# -- formats registered from outside ------------------------------------------------------------------------------


def _register(monkeypatch, discover_fn) -> None:
    import sys
    import types

    from fasttrain import registry

    module = types.ModuleType("index_test_format")
    module.discover = discover_fn
    monkeypatch.setitem(sys.modules, "index_test_format", module)
    monkeypatch.setitem(registry.TABLES["formats"], "mine", "index_test_format:discover")


def test_a_registered_format_is_indexed_and_keyed_by_every_setting(shapes, monkeypatch):
    from fasttrain.data.sources import DataSource, Split

    files = sorted(str(p) for p in (shapes / "train" / "circle").iterdir())
    _register(monkeypatch, lambda cfg, root: DataSource(root, "mine", Split("train", files, [0] * len(files)), None))
    data = DataConfig(root=str(shapes), format="mine")
    assert not load_or_build(data).reused and load_or_build(data).reused
    same_source(load_or_build(data).index.source(), discover(data))
    assert not load_or_build(DataConfig(root=str(shapes), format="mine", image_size=64)).reused  # it may read it


def test_a_source_the_index_cannot_hold_is_discovered_at_every_start(tmp_path, monkeypatch):
    from fasttrain.data.sources import DataSource, Split

    _register(monkeypatch, lambda cfg, root: DataSource(root, "mine", Split("train", ["/elsewhere/x.png"], [0]), None))
    (tmp_path / "d").mkdir()
    src = indexed_source(DataConfig(root=str(tmp_path / "d"), format="mine"))
    assert src.train.paths == ["/elsewhere/x.png"] and isinstance(src.train.paths, list)
