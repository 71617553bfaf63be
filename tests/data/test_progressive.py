"""Progressive resizing: the size rule (a pure function of the epoch), its settings, every backend following it
(the torch loader per sample, the cache on the device, DALI per batch through one pipeline), evaluation at its
own size, and a run that resumes at the size of its epoch with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinyrun import mixed_images, reflect_shifts

from fasttrain.config import Config, ConfigError, DataConfig, RuntimeConfig, TrainConfig, apply_overrides
from fasttrain.data.base import InputSpec, LoaderRequest
from fasttrain.data.dali import dali_status
from fasttrain.data.loaders import make_loader
from fasttrain.data.progressive import TrainSizes, progressive_size, train_sizes
from fasttrain.data.samples import Samples
from fasttrain.data.sources import Split

needs_dali = pytest.mark.skipif(not dali_status()[0], reason=dali_status()[1])
BACKENDS = ["torch", "cache", pytest.param("dali", marks=needs_dali)]


# -- the rule ------------------------------------------------------------------------------------------------


def test_ffcv_rn50_16_epochs_ramp():
    """FFCV's rn50_16_epochs.yaml: 160 px to epoch 11, 192 from 13, rounded to 32 between."""
    sizes = [progressive_size(e, 160, 192, 11, 13, 32) for e in range(16)]
    assert sizes == [160] * 12 + [192] * 4  # epoch 12 is halfway (176 px): halves round up


def test_sizes_grow_linearly_on_the_step_and_stay_within_the_range():
    sizes = [progressive_size(e, 64, 128, 0, 8, 16) for e in range(10)]
    assert sizes == [64, 80, 80, 96, 96, 112, 112, 128, 128, 128]
    assert all(s % 16 == 0 for s in sizes)
    assert sizes == sorted(sizes)
    # a range whose ends are not multiples of the step: the rounded sizes stay inside it
    odd = [progressive_size(e, 100, 130, 0, 4, 32) for e in range(5)]
    assert odd[0] == 100 and odd[-1] == 130 and all(100 <= s <= 130 for s in odd)


def test_an_empty_ramp_jumps_at_its_epoch():
    assert [progressive_size(e, 64, 128, 3, 3, 32) for e in range(5)] == [64, 64, 64, 128, 128]


def test_the_ramp_spans_the_run_unless_given_and_distinct_sizes_bound_the_recompiles():
    cfg = apply_overrides(Config(), ["data.progressive=[64, 128]", "train.epochs=5"])
    sizes = train_sizes(cfg)
    assert (sizes.start, sizes.end) == (0.0, 4.0)
    assert [sizes.size(e) for e in range(5)] == [64, 96, 96, 128, 128]
    assert sizes.distinct() == [64, 96, 128] and sizes.largest == 128
    given = train_sizes(apply_overrides(cfg, ["data.progressive_epochs=[1, 2]"]))
    assert [given.size(e) for e in range(5)] == [64, 64, 128, 128, 128]
    off = train_sizes(Config(data=DataConfig(image_size=48)))
    assert not off.progressive and off.distinct() == [48] and off.size(7) == 48


@pytest.mark.parametrize(
    "setting, message",
    [
        ("data.progressive=[128, 64]", r"data\.progressive: must be \[\] \(off\) or \[min, max\]"),
        ("data.progressive=[64]", r"data\.progressive: must be"),
        ("data.progressive_epochs=[2, 1]", r"data\.progressive_epochs: must be \[\] \(the whole run\)"),
        ("data.progressive_step=0", r"data\.progressive_step: must be >= 1"),
        ("data.eval_size=4", r"data\.eval_size: must be 0 or >= 8"),
    ],
)
def test_bad_settings_name_their_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), ["data.progressive=[64, 128]", setting])


def test_epochs_without_sizes_and_other_tasks_are_refused():
    with pytest.raises(ConfigError, match=r"data\.progressive_epochs: does nothing without data\.progressive"):
        apply_overrides(Config(), ["data.progressive_epochs=[1, 2]"])
    with pytest.raises(ConfigError, match=r"data\.progressive: resizes classification"):
        apply_overrides(Config(), ["data.progressive=[64, 128]", "task.name=regress"])
    with pytest.raises(ConfigError, match=r"data\.eval_size: sets a classifier's evaluation crop"):
        apply_overrides(Config(), ["data.eval_size=64", "task.name=pix2pix"])


def test_a_resume_may_not_change_the_sizes(tmp_path):
    from fasttrain.checkpoint import check_resume_config

    a = apply_overrides(Config(), ["data.progressive=[64, 128]"])
    for change in ("data.progressive=[64, 160]", "data.progressive_epochs=[1, 3]", "data.eval_size=160"):
        with pytest.raises(ConfigError, match=change.split("=")[0].replace(".", r"\.")):
            check_resume_config(a, apply_overrides(a, [change]), tmp_path)


# -- every backend follows it -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    return mixed_images(tmp_path_factory.mktemp("progressive"), 12, seed=3, sides=(30, 60))


def _cfg(*extra: str) -> Config:
    base = Config(
        data=DataConfig(image_size=24, workers=0, dali_threads=1, crop_scale_min=0.3),
        runtime=RuntimeConfig(seed=2),
        train=TrainConfig(epochs=3),
    )
    return apply_overrides(base, ["data.progressive=[16, 32]", "data.progressive_step=8", *extra])


def _loader(backend: str, cfg: Config, files, *, train: bool):
    mean, std = cfg.data.norm_mean_std()
    spec = InputSpec(torch.device("cpu"), torch.float32, False, tuple(mean), tuple(std))
    split = Split("train" if train else "val", list(files), list(range(len(files))))
    return make_loader(backend, LoaderRequest(Samples(split, "class"), train, 4), cfg, spec)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rrc", [True, False])
def test_each_epoch_trains_at_its_size_and_evaluation_at_its_own(files, backend, rrc):
    cfg = _cfg(f"data.random_resized_crop={str(rrc).lower()}", "data.eval_size=40")
    loader = _loader(backend, cfg, files, train=True)
    try:
        seen = []
        for e in (0, 1, 2, 1):  # back to a smaller size too: the size is the epoch's, not a state
            loader.set_epoch(e)
            shapes = {tuple(b.inputs.shape[1:]) for b in loader}
            seen.append(shapes)
        assert seen == [{(3, 16, 16)}, {(3, 24, 24)}, {(3, 32, 32)}, {(3, 24, 24)}]
        if backend == "dali":
            assert loader.builds == 1  # the size arrives with each batch: no pipeline rebuilt per size
    finally:
        loader.close()
    val = _loader(backend, cfg, files, train=False)
    try:
        assert {tuple(b.inputs.shape[1:]) for b in val} == {(3, 40, 40)}
    finally:
        val.close()


@pytest.mark.parametrize("backend", ["torch", "cache"])
def test_a_shifted_epoch_is_shifted_at_its_own_size(files, backend):
    """data.translate under progressive resizing: each epoch's images at its size, shifted by whole pixels there
    (the cache resizes its canvas first), so an epoch at the largest size is the fixed-size shift."""
    cfg = _cfg("data.random_resized_crop=false", "data.translate=3")
    loader = _loader(backend, cfg, files, train=True)
    still = _loader(backend, apply_overrides(cfg, ["data.translate=0", "data.hflip=false"]), files, train=True)
    try:
        for e, side in ((0, 16), (2, 32), (1, 24)):
            loader.set_epoch(e)
            still.set_epoch(e)
            shifted, plain = torch.cat([b.inputs for b in loader]), torch.cat([b.inputs for b in still])
            assert shifted.shape[1:] == (3, side, side)
            assert all(reflect_shifts(x, p, 3) for x, p in zip(shifted, plain))  # whole pixels at this size
        loader.set_epoch(2)
        big = torch.cat([b.inputs for b in loader])
    finally:
        loader.close()
        still.close()
    fixed = apply_overrides(cfg, ["data.progressive=[]", "data.image_size=32"])
    ref = _loader(backend, fixed, files, train=True)
    try:
        ref.set_epoch(2)
        assert torch.allclose(torch.cat([b.inputs for b in ref]), big, atol=1e-5)
    finally:
        ref.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_at_a_size_is_the_same_whatever_ran_before(files, backend):
    """A resumed run builds fresh loaders and starts at its epoch: its batches are those of a straight run."""
    cfg = _cfg()
    a = _loader(backend, cfg, files, train=True)
    b = _loader(backend, cfg, files, train=True)
    try:
        for e in (0, 1):
            a.set_epoch(e)
            list(a)
        a.set_epoch(2)
        b.set_epoch(2)
        xa, xb = torch.cat([x.inputs for x in a]), torch.cat([x.inputs for x in b])
        assert xa.shape[-1] == 32 and torch.equal(xa, xb)
    finally:
        a.close()
        b.close()


def test_torch_loader_at_the_largest_size_is_the_fixed_size_run(files):
    """The per-sample transform at an epoch's size is the fixed-size transform of that size: same crops."""
    prog = _loader("torch", _cfg(), files, train=True)
    fixed = _loader("torch", apply_overrides(_cfg(), ["data.progressive=[]", "data.image_size=32"]), files, train=True)
    for ld in (prog, fixed):
        ld.set_epoch(2)
    assert torch.equal(torch.cat([b.inputs for b in prog]), torch.cat([b.inputs for b in fixed]))


def test_the_cache_holds_the_canvas_at_the_largest_size(files):
    from fasttrain.data.gpu_cache import sample_bytes

    cfg = _cfg("data.eval_size=40")
    loader = _loader("cache", cfg, files, train=True)
    assert loader.images.shape[-1] == 32
    assert sample_bytes("class", cfg.data, train=True) == 3 * 32 * 32 + 8
    assert sample_bytes("class", cfg.data) == 3 * 40 * 40 + 8


def test_autotune_plans_memory_at_the_largest_size(tmp_path):
    from fasttrain.data.synthetic import make_shapes_dataset
    from fasttrain.prepare import prepare

    root = make_shapes_dataset(tmp_path / "d", train_per_class=4, val_per_class=2, size=24, shapes=("circle", "square"))
    cfg = apply_overrides(_cfg(), [f"data.root={root}", "model.name=smallcnn", "runtime.device=cpu"])
    task = prepare(cfg).task
    spec = task.input_spec()
    assert task.synthetic_batch(2, spec, train=True).inputs.shape[-1] == 32
    assert task.synthetic_batch(2, spec, train=False).inputs.shape[-1] == 24  # the evaluation crop


# -- a run -------------------------------------------------------------------------------------------------------


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from fasttrain.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.pt")["state"]["modules"]["model"]


@pytest.mark.parametrize("loader", ["torch", "cache"])
def test_a_killed_progressive_run_resumes_at_its_size_with_the_same_weights(shapes_root, tmp_path, loader):
    from fasttrain.engine import train
    from tests.tinyrun import killed_and_resumed, tiny_cfg

    extra = (
        "data.progressive=[16, 32]",
        "data.progressive_step=8",
        "data.random_resized_crop=true",
        "data.eval_size=40",
        "data.resize_size=0",
        f"data.loader={loader}",
        "model.dropout=0.2",
    )
    shapes: list[int] = []

    def record_size(state, record):
        shapes.append(record["image_size"])

    straight = train(tiny_cfg(shapes_root, tmp_path / "a", *extra, epochs=3), progress=False, on_epoch_end=record_size)
    assert shapes == [16, 24, 32]
    assert [r["image_size"] for r in straight.history] == [16, 24, 32]

    resumed = killed_and_resumed(tiny_cfg(shapes_root, tmp_path / "b", *extra, epochs=3), after_epoch=1)
    assert [r["image_size"] for r in resumed.history] == [16, 24, 32]
    wa, wb = _weights(straight.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compile_keeps_one_static_graph_per_size_beyond_dynamos_default_limit(monkeypatch):
    """Nine sizes (dynamo's recompile limit is 8): each gets its own static graph, none falls back to eager. The
    eager backend stands in for inductor (the graph count is dynamo's, whatever compiles the graphs)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from fasttrain.runtime import Runtime

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager", dynamic=kw["dynamic"]))
    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    torch._dynamo.reset()
    counters.clear()
    runtime = Runtime(RuntimeConfig(device="cpu", compile="on"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    fn = runtime.compiled(model)
    sizes = TrainSizes(16, 80, 0, 8, 8, 9).distinct()
    assert len(sizes) == 9
    runtime.allow_shapes(len(sizes))
    for s in sizes + sizes:  # a size seen again reuses its graph
        fn(torch.randn(2, 3, s, s))
    assert counters["stats"]["unique_graphs"] == 9
    torch._dynamo.reset()


@pytest.mark.parametrize("start, end", [(0, 4), (1, 2.5), (3, 3), (0, 0)])
def test_measurements_start_at_the_first_epoch_of_the_largest_size(start, end):
    """bench and autotune set their loader to this epoch: they time (and peak at) the size the run ends at."""
    sizes = TrainSizes(64, 128, start, end, 32, 6)
    first = sizes.first_largest_epoch
    assert sizes.size(first) == 128
    assert first == 0 or sizes.size(first - 1) < 128


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cache", pytest.param("dali", marks=needs_dali)])
def test_on_cuda_each_epoch_arrives_at_its_size_channels_last_in_one_pipeline(files, backend):
    """The GPU paths: the cache resamples on the device, DALI's mixed decode gets the size per batch."""
    cfg = _cfg()
    mean, std = cfg.data.norm_mean_std()
    spec = InputSpec(torch.device("cuda:0"), torch.bfloat16, True, tuple(mean), tuple(std))
    split = Split("train", list(files), list(range(len(files))))
    loader = make_loader(backend, LoaderRequest(Samples(split, "class"), True, 4), cfg, spec)
    try:
        for e, size in ((0, 16), (2, 32), (1, 24)):
            loader.set_epoch(e)
            for b in loader:
                assert b.inputs.device.type == "cuda" and b.inputs.dtype == torch.bfloat16
                assert b.inputs.shape[-2:] == (size, size)
                assert b.inputs.is_contiguous(memory_format=torch.channels_last)
        if backend == "dali":
            assert loader.builds == 1
    finally:
        loader.close()
