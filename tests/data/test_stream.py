"""Streaming remote shards (``data.stream``): served over HTTP on 127.0.0.1, each shard is read once per pass,
sequentially, never stored; processes and workers read disjoint shards; the shuffle buffer is seeded; a bad or
missing member is named ``url:member`` and skipped; a resumed epoch replays the uninterrupted one's batches."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import Config, ConfigError, DataConfig, RuntimeConfig
from fasttrain.data.base import Batch, InputSpec, LoaderRequest
from fasttrain.data.files import IN_HAND, INDEX_SUFFIX, is_remote_address, open_regular
from fasttrain.data.loaders import make_loader
from fasttrain.data.pack import pack
from fasttrain.data.samples import Samples
from fasttrain.data.shards import open_url
from fasttrain.data.sources import discover
from fasttrain.data.stream import ShardStream, ghost_batches, is_streamed, shuffled
from fasttrain.data.torch_loader import StreamTorchLoader, _NamedSkips, collate_skip
from tests.data.test_shards import serve

SPEC = InputSpec(torch.device("cpu"), torch.float32, False, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 noise images of mixed sizes packed into 16 shards of 2 to 4 samples (no validation split)."""
    base = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(7)
    for i in range(48):
        d = base / "files" / ("a" if i % 3 else "b")
        d.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(8, 24))
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    pack(DataConfig(root=str(base / "files"), val_fraction=0), base / "shards", shard_bytes=7000)
    assert len(list((base / "shards").glob("*.tar"))) >= 8
    return base / "shards"


@pytest.fixture
def served(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    with serve(shards) as got:
        yield got


def _cfg(**data) -> Config:
    d = dict(image_size=8, crop_scale_min=0.3, workers=0, val_fraction=0, shuffle_buffer=6) | data
    return Config(data=DataConfig(**d), runtime=RuntimeConfig(seed=5))


class _Identity(torch.utils.data.Dataset):
    """(index, epoch) -> (index, epoch) as tensors, after checking the streamed member is in hand."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        assert self.split.paths[key[0]] in IN_HAND  # the sample's own bytes, read off the stream
        return torch.tensor(key), key[0]


def _identity_loader(split, *, train, world=1, rank=0, workers=0, batch=4, buffer=6, seed=5):
    collate = _NamedSkips(lambda items: collate_skip(items, fill_to=batch if train else 0))
    stream = ShardStream(
        split,
        _Identity(split),
        open_url,
        batch_size=batch,
        train=train,
        seed=seed,
        buffer=buffer,
        num_shards=world,
        shard_id=rank,
        collate=collate,
    )
    return StreamTorchLoader(stream, SPEC, workers=workers, seed=seed, prepare=lambda b: Batch(b[0], b[1]))


def _drawn(loader, epoch=0, skip=0) -> list[list[int]]:
    loader.set_epoch(epoch)
    if skip:
        loader.skip_batches(skip)
    return [b.targets.tolist() for b in loader]


def test_a_remote_root_with_indexes_streams_and_downloads_nothing(served, tmp_path):
    url, requests = served
    src = discover(DataConfig(root=url, val_fraction=0))
    assert is_streamed(src.train) and all(is_remote_address(p) for p in src.train.paths)
    assert not [p for p in requests if p.endswith(".tar")]  # discovery read the manifest and the indexes only
    loader = _identity_loader(src.train, train=False)
    seen = sorted(i for b in _drawn(loader) for i in b)
    assert seen == list(range(len(src.train)))
    tars = [p for p in requests if p.endswith(".tar")]
    assert sorted(tars) == sorted(set(tars)) and len(tars) == len(set(p.split(".tar:")[0] for p in src.train.paths))
    assert not (tmp_path / "cache" / "shards").exists()  # nothing stored


def test_a_root_whose_first_shards_lack_an_index_streams_the_rest_and_reads_those_from_disk(
    shards, tmp_path, monkeypatch
):
    """data.stream = auto downloads a remote shard without an index and streams the others: the split mixes local
    and remote shards. Streaming was decided by the first path alone (a local first shard: every shard silently
    downloaded), and a local shard behind a remote first one was opened as a URL (a worker crash)."""
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    mixed = tmp_path / "mixed"
    shutil.copytree(shards, mixed)
    tars = sorted(p.name for p in mixed.glob("*.tar"))
    for name in (tars[0], tars[len(tars) // 2]):  # the first and a middle one: unindexed, so downloaded
        (mixed / (name + INDEX_SUFFIX)).unlink()
    with serve(mixed) as (url, requests):
        split = discover(DataConfig(root=url, val_fraction=0)).train
        local = [p for p in split.paths if not is_remote_address(p)]
        assert local and is_remote_address(split.paths[-1]) and not is_remote_address(split.paths[0])
        assert is_streamed(split)
        drawn = sorted(i for b in _drawn(_identity_loader(split, train=False)) for i in b)
        assert drawn == list(range(len(split)))
        fetched = {p.rsplit("/", 1)[-1] for p in requests if p.endswith(".tar")}
        assert fetched == set(tars)  # every shard read once: two downloaded, the others streamed


def test_the_first_batch_comes_before_the_last_shard_is_read(served):
    url, requests = served
    src = discover(DataConfig(root=url, val_fraction=0))
    it = iter(_identity_loader(src.train, train=True, buffer=2))
    next(it)
    tars = [p for p in requests if p.endswith(".tar")]
    assert 1 <= len(tars) < len({p.split(".tar:")[0] for p in src.train.paths})


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_disjoint_shards_and_evaluate_every_sample_once(served, workers):
    url, _ = served
    split = discover(DataConfig(root=url, val_fraction=0)).train
    n = len(split)
    evals = []
    for r in (0, 1):
        loader = _identity_loader(split, train=False, world=2, rank=r, workers=workers)
        batches = _drawn(loader)
        assert len(batches) == len(loader)
        evals.append(sum(batches, []))
    assert sorted(evals[0] + evals[1]) == list(range(n))
    for epoch in (0, 1):
        loaders = [_identity_loader(split, train=True, world=2, rank=r, workers=workers) for r in (0, 1)]
        runs = [_drawn(loader, epoch) for loader in loaders]
        assert [len(r) for r in runs] == [n // 8] * 2  # every rank takes samples // (batch x ranks) steps
        drawn = [Counter(i for b in r for i in b) for r in runs]
        assert not set(drawn[0]) & set(drawn[1])  # disjoint shards
        for r, loader in enumerate(loaders):
            held = sum(loader.stream.samples_per_worker(epoch, loader.workers))
            repeats = sum(c - 1 for c in drawn[r].values())
            # a sample repeats only when the rank's shards hold fewer full batches than the epoch's steps
            assert repeats <= max(0, n // 8 * 4 - held // 4 * 4) + 4 * max(1, loader.workers)


def test_the_buffer_order_is_a_function_of_seed_and_epoch():
    items = list(range(50))
    a = list(shuffled(iter(items), 8, random.Random("s")))
    assert sorted(a) == items and a != items
    assert a == list(shuffled(iter(items), 8, random.Random("s")))
    assert a != list(shuffled(iter(items), 8, random.Random("t")))
    assert list(shuffled(iter(items), 0, random.Random("s"))) == items
    assert a[0] in range(9)  # the buffer is filled first: the first out is one of the first 9 in


def test_training_order_is_seeded_and_changes_with_the_epoch(served):
    url, _ = served
    split = discover(DataConfig(root=url, val_fraction=0)).train
    a = _drawn(_identity_loader(split, train=True, seed=1), 0)
    assert a == _drawn(_identity_loader(split, train=True, seed=1), 0)
    assert a != _drawn(_identity_loader(split, train=True, seed=2), 0)
    assert a != _drawn(_identity_loader(split, train=True, seed=1), 1)


def test_ghost_batches_follow_the_dataloaders_round_robin():
    assert ghost_batches([3, 1, 2], 0) == [0, 0, 0]
    assert ghost_batches([3, 1, 2], 4) == [2, 1, 1]
    assert ghost_batches([3, 1, 2], 6) == [3, 1, 2]
    assert ghost_batches([0, 2], 1) == [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_replays_the_same_batches_bit_for_bit(served, workers):
    url, requests = served
    src = discover(DataConfig(root=url, val_fraction=0))
    cfg = _cfg(workers=workers)
    request = LoaderRequest(Samples(src.train, "class"), train=True, batch_size=4)

    def run(skip):
        loader = make_loader("torch", request, cfg, SPEC)
        assert isinstance(loader, StreamTorchLoader)
        loader.set_epoch(3)
        if skip:
            loader.skip_batches(skip)
        return [(b.inputs, b.targets) for b in loader]

    whole = run(0)
    assert len(whole) == len(src.train) // 4
    resumed = run(5)
    assert len(resumed) == len(whole) - 5
    assert all(torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(resumed, whole[5:]))


def test_a_rank_short_of_samples_starts_its_stream_over(served):
    """Three shards over two ranks: the rank with one shard holds fewer batches than the epoch's steps and takes
    the rest from its stream's start (the same samples, in the same order); the other drops its surplus."""
    url, _ = served
    split = discover(DataConfig(root=url + "train-{000000..000002}.tar", val_fraction=0)).train
    loaders = [_identity_loader(split, train=True, world=2, rank=r, batch=1) for r in (0, 1)]
    steps = len(split) // 2
    held = [sum(ld._pass_batches(0)) for ld in loaders]
    assert min(held) < steps < max(held)
    short = held.index(min(held))
    runs = [_drawn(ld) for ld in loaders]
    assert [len(r) for r in runs] == [steps, steps]
    p = held[short]
    assert runs[short][p:] == runs[short][: steps - p]
    assert len({i for b in runs[1 - short] for i in b}) == steps  # the long rank: no repeats


def test_a_bad_member_and_a_missing_one_are_named_and_skipped(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "damaged"
    shutil.copytree(shards, dest)
    index_path = dest / ("train-000001.tar" + INDEX_SUFFIX)
    index = json.loads(index_path.read_text())
    name, offset, size = next(m for m in index["members"] if m[0].endswith(".png"))
    with open(dest / "train-000001.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    index["members"].append(["999999.png", 0, 1])  # in the index, not in the tar
    index["targets"]["999999"] = 0
    index_path.write_text(json.dumps(index))
    with serve(dest) as (url, _):
        src = discover(DataConfig(root=url, val_fraction=0))
        request = LoaderRequest(Samples(src.train, "class"), train=False, batch_size=4)
        loader = make_loader("torch", request, _cfg(), SPEC)
        got = sum(len(b) for b in loader)
    bad = {p: why for p, why in loader.skipped}
    assert set(bad) == {f"{url}train-000001.tar:{name}", f"{url}train-000001.tar:999999.png"}
    assert "not in the shard's stream" in bad[f"{url}train-000001.tar:999999.png"]
    assert got == len(src.train) - 2


def test_the_cache_backend_reads_a_streamed_root_like_local_shards(served, shards):
    """The cache decodes every member once by offset: a streamed shard is downloaded whole on its first read."""
    url, _ = served
    remote = discover(DataConfig(root=url, val_fraction=0)).train
    local = discover(DataConfig(root=str(shards), val_fraction=0)).train
    assert open_regular(remote.paths[3]).read() == open_regular(local.paths[3]).read()
    out = []
    for split in (remote, local):
        loader = make_loader("cache", LoaderRequest(Samples(split, "class"), train=False, batch_size=4), _cfg(), SPEC)
        out.append([b.inputs for b in loader])
        loader.close()
    assert len(out[0]) == len(out[1]) and all(torch.equal(a, b) for a, b in zip(*out))
    # streamed evaluation on the torch loader: the listed shard order, no buffer, the same pixels
    loader = make_loader("torch", LoaderRequest(Samples(remote, "class"), train=False, batch_size=4), _cfg(), SPEC)
    assert all(torch.equal(a.inputs, b) for a, b in zip(loader, out[1]))


def test_stream_settings_are_checked_and_on_needs_an_index(served, tmp_path):
    with pytest.raises(ConfigError, match="data.stream"):
        DataConfig(stream="sometimes")
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        DataConfig(shuffle_buffer=-1)
    url, _ = served
    with pytest.raises(ConfigError, match=r"data.stream = on, but shard .*train-000000.tar has no index"):
        discover(DataConfig(root=url + "nope/train-{000000..000001}.tar", stream="on"))
    off = discover(DataConfig(root=url, stream="off", val_fraction=0))
    assert not is_streamed(off.train) and (tmp_path / "cache" / "shards").is_dir()


class Stop(Exception):
    pass


def test_a_run_killed_mid_epoch_on_a_streamed_root_resumes_to_the_uninterrupted_runs_weights(
    served, tmp_path, monkeypatch, caplog
):
    """The engine end to end: train from URLs on the torch loader (streamed), kill it inside the second epoch,
    resume from the step checkpoint; the weights equal those of the run that was never interrupted."""
    from fasttrain.checkpoint import load_checkpoint
    from fasttrain.engine import train
    from fasttrain.tasks.classify import ClassifyTask
    from tests.tinyrun import tiny_cfg

    url, _ = served
    extra = ("train.batch_size=4", "data.image_size=16", "model.dropout=0.2", "train.checkpoint_every_steps=2")

    def cfg(runs):
        return tiny_cfg(url, runs, *extra, "data.val_fraction=0.25", "data.shuffle_buffer=5", max_steps=0)

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]

    straight = train(cfg(tmp_path / "a"), progress=False)
    per_epoch = straight.history[0]["step"]
    assert not (tmp_path / "cache" / "shards").exists()  # streamed, never downloaded

    def die(self, state, batch, run_dir):
        if state.step == per_epoch + 5:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(ClassifyTask, "on_step_end", die)
        with pytest.raises(Stop):
            train(cfg(tmp_path / "b"), progress=False)
    (run,) = (tmp_path / "b").iterdir()
    saved = (per_epoch + 4) // 2 * 2  # the last step checkpoint (every 2 steps) before the kill
    position = load_checkpoint(run / "checkpoints" / "last.pt")["position"]
    assert position["epoch"] == 1 and position["micro"] == saved - per_epoch
    assert "data.shuffle_buffer = 5" in position["order"]
    shutil.copytree(run, tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        resumed = train(resume=run, progress=False)
    assert "draws another order" not in caplog.text
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    wa, wb = weights(straight.run_dir), weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # another shuffle buffer (or process or worker count) draws the rest of that epoch in another order: said
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        train(resume=tmp_path / "c", progress=False, overrides=["data.shuffle_buffer=3", "train.epochs=2"])
    assert "draws another order" in caplog.text and "data.shuffle_buffer = 3" in caplog.text


def test_auto_passes_dali_over_for_a_streamed_root(served):
    """DALI reads members by offset: on a streamed root ``auto`` does not take it (it would download every shard
    before its first step); asked by name it runs, downloading each shard on first read."""
    from fasttrain.data.base import RunSamples
    from fasttrain.data.loaders import backend

    url, _ = served
    run = RunSamples(Samples(discover(DataConfig(root=url, val_fraction=0)).train, "class"))
    ok, why = backend("dali").fits(run, _cfg(), torch.device("cuda"))
    assert not ok and "stream on the torch loader" in why
    local = RunSamples(Samples(discover(DataConfig(root=url, stream="off", val_fraction=0)).train, "class"))
    assert backend("dali").fits(local, _cfg(), torch.device("cuda"))[0]
    assert backend("torch").fits(run, _cfg(), torch.device("cuda")) == (
        True,
        "the torch loader streams the remote shards",
    )


def test_a_stream_that_breaks_off_is_read_again_past_what_it_gave(shards, tmp_path, monkeypatch):
    """Each shard's first GET is cut halfway: it is opened again and read on past the samples already given,
    so the epoch is whole and in the same order; a stream that gives nothing for RETRY_S stops, naming it."""
    from fasttrain.data import stream
    from fasttrain.data.stream import StreamPlan, read_shard

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    with serve(shards) as (url, _):
        split = discover(DataConfig(root=url, val_fraction=0)).train
        want = _drawn(_identity_loader(split, train=True))
    with serve(shards, cut=1) as (url2, requests):
        split2 = discover(DataConfig(root=url2, val_fraction=0)).train
        loader = _identity_loader(split2, train=True)
        assert _drawn(loader) == want and loader.skipped == []
        tars = [p for p in requests if p.endswith(".tar")]
        assert len(tars) == 2 * len(set(tars))
    with serve(shards, cut=1) as (url3, _):
        split3 = discover(DataConfig(root=url3, val_fraction=0)).train
        plan = StreamPlan.of(split3)
        shard = max(plan.shards, key=plan.count)
        monkeypatch.setattr(stream, "RETRY_S", 0.0)  # no patience: the cut stream is the end of it
        with pytest.raises(stream.StreamUnavailable, match=rf"^shard {re.escape(shard)}: no sample for .*broke off"):
            list(read_shard(shard, plan.wanted[shard], open_url))


def test_a_shard_that_fails_for_a_while_is_read_whole_and_one_that_is_gone_is_named_not_retried(
    shards, tmp_path, monkeypatch
):
    """An outage of a few seconds (an object store's 503 SlowDown, a refused connection) costs no sample: the
    shard is opened again with a growing pause (it used to give up after 0.6 s and name every sample missing,
    which stopped the run at max_bad_per_epoch); a 404 is not retried: its samples are named and skipped."""
    import urllib.error

    from fasttrain.data import stream
    from fasttrain.data.stream import StreamPlan, read_shard

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    pauses: list[float] = []
    monkeypatch.setattr(stream.time, "sleep", pauses.append)
    with serve(shards) as (url, _):
        split = discover(DataConfig(root=url, val_fraction=0)).train
        plan = StreamPlan.of(split)
        shard = max(plan.shards, key=plan.count)
        calls = []

        def flaky(u):
            calls.append(u)
            if len(calls) <= 4:
                raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
            return open_url(u)

        items = list(read_shard(shard, plan.wanted[shard], flaky))
        assert len(calls) == 5 and pauses == [0.5, 1.0, 2.0, 4.0]
        assert not [why for _, _, why in items if isinstance(why, str)]
        assert sorted(i for i, _, _ in items) == sorted(i for i, _ in plan.wanted[shard].values())

        def gone(u):
            calls.append(u)
            raise urllib.error.HTTPError(u, 404, "Not Found", {}, None)  # type: ignore[arg-type]

        calls.clear()
        items = list(read_shard(shard, plan.wanted[shard], gone))
        assert len(calls) == 1 and len(items) == plan.count(shard)
        assert all(where.startswith(shard + ":") and "404" in why for _, where, why in items)


def test_pairs_stream_with_their_target_member_and_a_lost_target_is_named_not_downloaded(tmp_path, monkeypatch):
    """A pair's sample is two members (``.png`` + ``.target.png``) of one key: streamed evaluation gives the
    local shards' pixels; a target the stream lacks is named and skipped, and nothing is downloaded for it."""
    from fasttrain.data.synthetic import make_paired_dataset

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    paired = make_paired_dataset(tmp_path / "p", n=10, size=16, layout="folders", seed=3)
    pack(DataConfig(root=str(paired), format="paired", val_fraction=0), tmp_path / "s", shard_bytes=6000)
    index_path = next((tmp_path / "s").glob("train-*.tar" + INDEX_SUFFIX))
    with serve(tmp_path / "s") as (url, _):
        split = discover(DataConfig(root=url, val_fraction=0)).train
        local = discover(DataConfig(root=str(tmp_path / "s"), val_fraction=0)).train
        got = []
        for s in (split, local):
            loader = make_loader("torch", LoaderRequest(Samples(s, "pair"), train=False, batch_size=4), _cfg(), SPEC)
            got.append([(b.inputs, b.targets) for b in loader])
        assert is_streamed(split) and len(got[0]) == len(got[1]) > 0
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(*got))
    # the stream lacks one target member: rewrite a shard without it (its index, fetched at discovery, lists it)
    shard = index_path.with_suffix("")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    lost = next(m.name for m, _ in members if ".target." in m.name)
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name != lost:
                tar.addfile(m, io.BytesIO(data))
    index = json.loads(index_path.read_text())
    index["size"] = shard.stat().st_size
    index_path.write_text(json.dumps(index))
    with serve(tmp_path / "s") as (url, _):
        split = discover(DataConfig(root=url, val_fraction=0)).train
        loader = make_loader("torch", LoaderRequest(Samples(split, "pair"), train=False, batch_size=4), _cfg(), SPEC)
        n = sum(len(b) for b in loader)
    assert n == len(split) - 1
    assert [p for p, _ in loader.skipped] == [f"{url}{shard.name}:{lost}"]
    assert not (tmp_path / "cache" / "shards").exists()


@pytest.mark.slow  # two torchrun jobs of two processes each
def test_two_ranks_stream_and_a_killed_rank_resumes_to_the_same_weights(served, tmp_path):
    """Under torchrun (gloo, 2 processes) each rank streams its own shards and both take the same steps (no
    hang); a job whose rank 1 is killed mid-epoch restarts, resumes and ends with the uninterrupted job's
    weights."""
    from tests.engine.test_ddp import _only_run, _sets, _torchrun, _weights

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    url, _ = served
    common = ("train.epochs=2", "train.batch_size=4", "data.val_fraction=0.25", "train.checkpoint_every_steps=2")
    straight = _torchrun(2, ["train", "-q", *_sets(url, tmp_path / "a", *common)])
    assert straight.returncode == 0, straight.stderr[-9000:]
    killed = _torchrun(
        2, ["--kill-rank", "1", "--kill-step", "7", "train", "-q", *_sets(url, tmp_path / "b", *common)], restarts=1
    )
    assert killed.returncode == 0, killed.stderr[-9000:]
    assert "resuming" in killed.stderr
    a, b = _weights(_only_run(tmp_path / "a")), _weights(_only_run(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cache" / "shards").exists()


def test_an_object_store_root_streams_through_fsspec(shards, tmp_path, monkeypatch):
    """fsspec's in-memory file system stands in for s3:// or gs://: streamed through the store's client, nothing
    downloaded, every sample once, with the local shards' pixels."""
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    bucket = f"/bucket-{tmp_path.name}"
    for f in shards.iterdir():
        fs.pipe(f"{bucket}/{f.name}", f.read_bytes())
    try:
        remote = discover(DataConfig(root=f"memory://{bucket}", val_fraction=0)).train
        local = discover(DataConfig(root=str(shards), val_fraction=0)).train
        assert is_streamed(remote)
        got = []
        for split in (remote, local):
            loader = make_loader(
                "torch", LoaderRequest(Samples(split, "class"), train=False, batch_size=4), _cfg(), SPEC
            )
            got.append([(b.inputs, b.targets) for b in loader])
        assert len(got[0]) == len(got[1]) > 0
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(*got))
        assert not (tmp_path / "cache" / "shards").exists()
    finally:
        fs.rm(bucket, recursive=True)
