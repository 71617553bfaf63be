"""Remote shards streamed against downloaded first (``data.stream = on | off``): the time from discovery to the
first training batch, and the torch loader's throughput after it, over Imagenette's 224 px JPEGs packed into 16 MB
shards and served over HTTP on 127.0.0.1, throttled to ``FASTTRAIN_BENCH_STREAM_MBPS`` (default 40 MB/s, a
remote bucket's order of magnitude; 0 = unthrottled).

Data: ``imagenette224.tar`` from ``$FASTTRAIN_SHARED_DATA`` or ``../shared/data``, extracted and packed once into
the benchmark cache (skipped when absent). ``extra_info``: ``first_batch_s``, ``images_per_s`` (over
``STREAM_BATCHES`` batches after the first), ``stream``; ``workload`` pairs the two rows.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from benchutil import cache_root, find_tar

pytestmark = pytest.mark.benchmark(group="stream")

STREAM_BATCH = 64
STREAM_BATCHES = {"cpu": 30, "gpu": 200}
MBPS = float(os.environ.get("FASTTRAIN_BENCH_STREAM_MBPS", "40"))


@pytest.fixture(scope="session")
def imagenette_shards(pytestconfig) -> Path:
    """Imagenette packed into 16 MB shards, once."""
    from fasttrain.config import DataConfig
    from fasttrain.data.pack import pack

    tar_path = find_tar("imagenette224.tar")
    if tar_path is None:
        pytest.skip("imagenette224.tar not found in ../shared/data")
    dest = cache_root(pytestconfig) / "imagenette224-shards-16mb"
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".imagenette.", dir=dest.parent))
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        pack(DataConfig(root=str(tmp / "imagenette224")), dest, shard_bytes=16 * 10**6)
        shutil.rmtree(tmp)
    return dest


@pytest.fixture(scope="session")
def shard_url(imagenette_shards):
    """The shards over HTTP on 127.0.0.1, each response paced to ``MBPS``."""
    rate = MBPS * 1e6

    class Paced(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, outputfile):
            start, sent = time.perf_counter(), 0
            while chunk := source.read(1 << 18):
                try:
                    outputfile.write(chunk)
                except OSError:  # the loader stopped reading (the round ended mid-shard)
                    return
                sent += len(chunk)
                ahead = sent / rate - (time.perf_counter() - start) if rate else 0
                if ahead > 0:
                    time.sleep(ahead)

    handler = functools.partial(Paced, directory=str(imagenette_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", ["on", "off"])
def test_stream_first_batch_and_throughput(benchmark, size, shard_url, tmp_path, monkeypatch, stream):
    from fasttrain.config import Config, DataConfig, RuntimeConfig
    from fasttrain.data import files
    from fasttrain.data.base import InputSpec, LoaderRequest
    from fasttrain.data.loaders import make_loader
    from fasttrain.data.samples import Samples
    from fasttrain.data.sources import discover

    spec = InputSpec(torch.device("cpu"), torch.float32, False, (0.5,) * 3, (0.25,) * 3)
    batches = STREAM_BATCHES[size.name]
    rounds = iter(range(100))
    figures: list[tuple[float, float]] = []

    def once() -> None:
        monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / f"cache-{next(rounds)}"))  # every round downloads
        files._INDEXES.clear()
        start = time.perf_counter()
        src = discover(DataConfig(root=shard_url, stream=stream))
        cfg = Config(data=DataConfig(image_size=160, workers=1, stream=stream), runtime=RuntimeConfig(seed=0))
        request = LoaderRequest(Samples(src.train, "class"), train=True, batch_size=STREAM_BATCH)
        loader = make_loader("torch", request, cfg, spec)
        try:
            it = iter(loader)
            next(it)
            first = time.perf_counter() - start
            t = time.perf_counter()
            for _ in range(batches):
                next(it)
            figures.append((first, batches * STREAM_BATCH / (time.perf_counter() - t)))
        finally:
            loader.close()

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)
    firsts, rates = sorted(f for f, _ in figures), sorted(r for _, r in figures)
    benchmark.extra_info.update(
        stream=stream,
        first_batch_s=firsts[len(firsts) // 2],
        images_per_s=rates[len(rates) // 2],
        mbps=MBPS,
        workload=f"imagenette-stream-b{STREAM_BATCH}",
    )
