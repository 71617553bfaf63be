"""torchrun's environment -> ranks; batch division; collectives are the identity for one process."""

from __future__ import annotations

import pytest
import torch

from fasttrain import distributed as D


def test_no_torchrun_environment_is_one_process():
    info = D.dist_info({})
    assert (info.rank, info.local_rank, info.world_size, info.enabled, info.is_main) == (0, 0, 1, False, True)


def test_torchrun_environment():
    env = {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "TORCHELASTIC_RUN_ID": "job7",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }
    info = D.dist_info(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (5, 1, 8, 4)
    assert info.enabled and not info.is_main and (info.run_id, info.restart) == ("job7", 2)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3 is not below"),
    ],
)
def test_malformed_environments_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        D.dist_info(env)


def test_the_global_batch_is_split_evenly_or_refused():
    assert D.per_rank_batch(256, 8) == 32
    with pytest.raises(ValueError, match="train.batch_size: 250 is not divisible by the 4 processes"):
        D.per_rank_batch(250, 4)


def test_one_process_collectives_are_the_identity():
    sums = {"loss": torch.tensor(3.0), "count": torch.tensor(4.0)}
    assert D.all_reduce_sums(sums) is sums
    assert D.broadcast_object({"run": "x"}) == {"run": "x"}
    D.barrier()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_steps_keep_the_gradients_as_bucket_views(tmp_path):
    """gradient_as_bucket_view=True makes each gradient a view into DDP's all-reduce bucket; zero_grad with
    set_to_none=True dropped the views every step (torch's note), so each backward allocated and copied again."""
    from torch.nn.parallel import DistributedDataParallel

    from fasttrain.step import optimizer_step
    from fasttrain.tasks.base import TrainState

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        state = TrainState({"model": model}, {"model": ddp}, {"model": opt}, {"model": scaler}, ddp={"model": ddp})
        where = []
        for _ in range(4):
            ddp(torch.randn(5, 4)).square().mean().backward()
            where.append([p.grad.data_ptr() for p in model.parameters()])
            optimizer_step(state, "model", grad_clip=0.0)
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # zeroed, kept
        assert where[1] == where[2] == where[3]  # the same bucket views every step (from the second on: torch's note)
    finally:
        torch.distributed.destroy_process_group()


def test_an_evaluation_shard_with_no_samples_still_joins_the_all_reduce(monkeypatch):
    """With fewer validation samples than processes a rank has no sums: it returned without the collective and
    the others waited for the 30-minute timeout. With device= every rank agrees on the keys and reduces."""
    import torch.distributed as dist

    monkeypatch.setattr(D, "current", lambda: D.DistInfo(rank=1, world_size=2, local_world_size=2))
    reduced = []

    def all_gather_object(out, obj):
        out[:] = [["correct", "count", "loss"], obj]  # rank 0 evaluated samples; this rank's keys last

    def all_reduce(t, op=None):
        reduced.append(t.clone())
        t += torch.tensor([3.0, 2.0, 0.5])  # what rank 0 adds (keys in sorted order)

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    out = D.all_reduce_sums({}, device=torch.device("cpu"))
    assert len(reduced) == 1 and reduced[0].tolist() == [0.0, 0.0, 0.0]  # took part, with zeros
    assert {k: v.item() for k, v in out.items()} == {"correct": 3.0, "count": 2.0, "loss": 0.5}
    out = D.all_reduce_sums({"loss": torch.tensor(1.0)}, device=torch.device("cpu"))  # some keys missing
    assert reduced[1].tolist() == [0.0, 0.0, 1.0] and out["loss"].item() == 1.5


def test_sync_batchnorm_keeps_timms_activations_inside_its_norm_layers():
    """timm's BatchNormAct2d is a BatchNorm2d that applies its activation in its own forward: torch's converter
    made it a plain SyncBatchNorm (the activation still attached, never called). Evaluation output (eval mode
    runs on the CPU) must not change, and the optimizer's parameter objects must stay."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        timm_layers.BatchNormAct2d(8, act_layer=torch.nn.ReLU),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.BatchNorm2d(4),
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    before, params = model(x), [id(p) for p in model.parameters()]
    synced = D.sync_batchnorm(model).eval()
    assert [type(m).__name__ for m in synced] == ["Conv2d", "SyncBatchNormAct", "Conv2d", "SyncBatchNorm"]
    assert [id(p) for p in synced.parameters()] == params
    torch.testing.assert_close(synced(x), before)


def test_sync_batchnorm_refuses_a_batchnorm_with_a_forward_of_its_own():
    from fasttrain.config import ConfigError

    class ScaledBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ConfigError, match=r"model\.sync_bn: .*ScaledBN is a BatchNorm layer with a forward"):
        D.sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), ScaledBN(4)))
    plain = D.sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))
    assert isinstance(plain[1], torch.nn.SyncBatchNorm)


def test_sync_batchnorm_leaves_synced_layers_and_converts_subclasses_without_a_forward():
    timm_layers = pytest.importorskip("timm.layers")

    class Renamed(torch.nn.BatchNorm2d):  # BatchNorm's own forward: nothing to lose
        pass

    synced_act = timm_layers.convert_sync_batchnorm(timm_layers.BatchNormAct2d(4, act_layer=torch.nn.ReLU))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), synced_act, torch.nn.SyncBatchNorm(4), Renamed(4))
    out = D.sync_batchnorm(model)
    assert out[1] is synced_act and type(out[1]).__name__ == "SyncBatchNormAct"  # its activation kept
    assert isinstance(out[2], torch.nn.SyncBatchNorm) and type(out[3]) is torch.nn.SyncBatchNorm
