"""A data backend defined outside the package, in this test module, and registered with one line
(``registry.register("backends", ...)``): it trains a run end to end, ``data.loader = auto`` chooses it when it
says it serves the samples and fits them, and autotune's loader trials tune it through its knobs, although
neither the choice policy nor autotune's code knows its name. Nothing else in fasttrain changes for it."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from tinyrun import tiny_cfg

from fasttrain import registry
from fasttrain.config import Config, DataConfig
from fasttrain.data.base import Backend, Batch, InputSpec, LoaderRequest, RunSamples, normalize_on_device
from fasttrain.data.order import EpochSampler
from fasttrain.data.samples import Skip, dataset_for

BUILT: list[int] = []
"""data.prefetch of every loader the backend built (the knob autotune turns)."""


class RamLoader:
    """The loader contract over class samples decoded once into host memory at the evaluation geometry."""

    def __init__(self, request: LoaderRequest, cfg: Config, spec: InputSpec):
        samples = request.samples
        ds = dataset_for(samples, cfg.data, cfg.runtime.seed, train=False, deterministic=True)
        items = [ds[i] for i in range(len(ds))]
        self.skipped = [(it.path, it.reason) for it in items if isinstance(it, Skip)]
        good = [it for it in items if not isinstance(it, Skip)]
        self.images = torch.stack([x for x, _ in good])
        self.targets = torch.as_tensor([y for _, y in good])
        self.spec, self.batch_size, self.num_samples = spec, request.batch_size, len(good)
        self.sampler = EpochSampler(
            len(good),
            batch_size=request.batch_size,
            shuffle=request.train,
            seed=cfg.runtime.seed,
            drop_last=request.train,
            num_shards=request.num_shards,
            shard_id=request.shard_id,
        )
        self._start = 0

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def skip_batches(self, n: int) -> None:
        self._start = n

    def close(self) -> None:
        self.images = self.targets = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Batch]:
        order, self._start = self.sampler.indices()[self._start * self.batch_size :], 0
        for at in range(0, len(order), self.batch_size):
            idx = torch.tensor(order[at : at + self.batch_size])
            yield Batch(normalize_on_device(self.images[idx], self.spec), self.targets[idx].to(self.spec.device))


class RamBackend(Backend):
    """Serves class samples only; ``auto`` asks it first (rank above the cache's) and takes it for at most
    ``limit`` images."""

    name = "ram"
    rank = 40
    limit = 1000

    def build(self, request: LoaderRequest, cfg: Config, spec: InputSpec) -> RamLoader:
        BUILT.append(cfg.data.prefetch)
        return RamLoader(request, cfg, spec)

    def serves(self, run: RunSamples, cfg: Config, device: torch.device) -> tuple[bool, str]:
        if run.kind != "class":
            return False, f"the ram backend serves class samples, not {run.kind}"
        return True, ""

    def fits(self, run: RunSamples, cfg: Config, device: torch.device, memory_limit=None) -> tuple[bool, str]:
        ok = len(run) <= self.limit
        return ok, f"{len(run)} images {'within' if ok else 'over'} the ram backend's {self.limit}"

    def knobs(self, data: DataConfig, device_type: str) -> list[dict]:
        return [{"prefetch": data.prefetch}] + [{"prefetch": n} for n in (1, 4) if n != data.prefetch]

    def queue_depth(self, data: DataConfig) -> int:
        return data.prefetch

    def resident_bytes(self, run: RunSamples, cfg: Config) -> int:
        return 12_345 * len(run)


BACKEND = RamBackend()


@pytest.fixture
def ram(monkeypatch):
    """The backend registered for one test: one line, as a plugin would add it."""
    monkeypatch.setitem(registry.TABLES, "backends", dict(registry.TABLES["backends"]))
    registry.register("backends", "ram", f"{__name__}:BACKEND")
    BUILT.clear()
    return BACKEND


def test_auto_chooses_the_new_backend_when_it_serves_and_fits(ram, shapes_root, tmp_path, monkeypatch):
    from fasttrain.data.synthetic import make_drawing_dataset
    from fasttrain.prepare import prepare

    prep = prepare(tiny_cfg(shapes_root, tmp_path, "data.loader=auto"))
    assert prep.backend == "ram" and prep.backend_reason == "auto: 510 images within the ram backend's 1000"
    monkeypatch.setattr(ram, "limit", 100)  # the same data, too much for it: the cache, with the reason it passed
    whole = "train.max_steps=0"  # whole epochs: a run that reads each image more than once, as the cache needs
    prep = prepare(tiny_cfg(shapes_root, tmp_path, "data.loader=auto", whole))
    assert prep.backend == "cache"
    assert prep.backend_reason.startswith("auto: 510 images over the ram backend's 100; the decoded dataset fits")
    drawings = make_drawing_dataset(tmp_path / "d", sessions=2, steps=3, size=16)
    extra = ["data.format=drawing", "task.name=regress", "model.name=convnet", "data.loader=auto", whole]
    extra.append("train.batch_size=2")
    prep = prepare(tiny_cfg(drawings, tmp_path, *extra))  # vectors: not its kind
    assert prep.backend == "cache" and "the ram backend serves class samples, not vector" in prep.backend_reason


def test_the_new_backend_trains_a_run_and_resumes_it(ram, shapes_root, tmp_path):
    from fasttrain.engine import train

    result = train(tiny_cfg(shapes_root, tmp_path / "runs", "data.loader=auto"), progress=False)
    assert result.backend == "ram" and BUILT == [2, 2]  # its training and validation loaders
    assert [h["step"] for h in result.history] == [3, 6]
    assert all(math.isfinite(v) for h in result.history for k, v in h.items() if k.startswith(("val_", "train_")))
    again = train(resume=result.run_dir, overrides=["train.epochs=3"], progress=False)
    assert again.backend == "ram" and again.history[-1]["epoch"] == 3 and len(BUILT) == 4


def test_autotune_tunes_the_new_backend_through_its_knobs(ram, shapes_root, monkeypatch):
    from fasttrain.prepare import prepare
    from fasttrain.tuning import loader as L

    prep = prepare(tiny_cfg(shapes_root, "unused", "data.loader=ram", "data.prefetch=2"))
    assert L.loader_ladder("ram", prep.cfg.data) == [{"prefetch": 2}, {"prefetch": 1}, {"prefetch": 4}]
    assert L.queue_depth("ram", prep.cfg.data) == 2
    assert L.resident_bytes("ram", prep.cfg, prep) == 12_345 * 510  # what autotune holds while it probes

    def measured(model_step, e2e_step, **window):  # the real loader feeds the real step; the figures are fixed
        e2e_step()
        model_step()
        return [100.0, 100.0], [10.0, 10.0], None  # a tenth of the model-only step: no setting keeps up

    monkeypatch.setattr(L, "_measure_trial", measured)
    kw = dict(micro=32, accumulation=1, noise=0.03, warmup=1, repeats=2, repeat_s=0.05)
    r = L.tune_loader(prep.cfg, prep.runtime, prep.source, "ram", state=prep.task.build_state(), **kw)
    if r.loader is not None:
        r.loader.close()
    assert [t.setting for t in r.trials] == [{"prefetch": 2}, {"prefetch": 1}, {"prefetch": 4}]
    assert BUILT == [2, 1, 4] and r.trials[0].given and r.input_bound
    assert all(t.share == pytest.approx(0.1) for t in r.trials) and "input-bound" in r.note
    assert r.setting == {"loader": "ram", "prefetch": 2}  # all alike: the config's own is kept
