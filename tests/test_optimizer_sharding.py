"""Which optimizer a run builds: the distributed one only with data-parallel replicas to shard over, and on
resume the one its checkpoint's optimizer state was written by."""

from __future__ import annotations

import json

import pytest

from megatron_sft.config import ParallelConfig
from megatron_sft.train.checkpointing import STATE_FILE, saved_distributed_optimizer
from megatron_sft.train.model_setup import optimizer_sharding


def test_one_replica_has_nothing_to_shard_reduce_or_gather():
    sharding = optimizer_sharding(ParallelConfig(), replicas=1)
    assert (sharding.distributed, sharding.overlap_grad_reduce, sharding.overlap_param_gather) == (False, False, False)


def test_several_replicas_get_what_the_config_asks_for():
    assert optimizer_sharding(ParallelConfig(), replicas=2) == optimizer_sharding(ParallelConfig(), replicas=8)
    sharding = optimizer_sharding(ParallelConfig(), replicas=2)
    assert (sharding.distributed, sharding.overlap_grad_reduce, sharding.overlap_param_gather) == (True, True, True)
    plain = optimizer_sharding(ParallelConfig(distributed_optimizer=False), replicas=2)
    assert (plain.distributed, plain.overlap_grad_reduce, plain.overlap_param_gather) == (False, True, False)


@pytest.mark.parametrize("saved", [True, False])
@pytest.mark.parametrize("replicas", [1, 4])
def test_a_resumed_run_keeps_its_checkpoints_optimizer(saved, replicas):
    sharding = optimizer_sharding(ParallelConfig(distributed_optimizer=not saved), replicas, saved_distributed=saved)
    assert sharding.distributed is saved
    assert sharding.overlap_param_gather is (saved and replicas > 1)


def test_saved_flag_read_from_the_checkpoint_or_the_config_for_older_ones(tmp_path):
    assert saved_distributed_optimizer(None, True) is None
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 2, "distributed_optimizer": False}))
    assert saved_distributed_optimizer(tmp_path, True) is False
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 2}))  # written before the flag was recorded
    assert saved_distributed_optimizer(tmp_path, True) is True
    assert saved_distributed_optimizer(tmp_path, False) is False
