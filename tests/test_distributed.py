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
