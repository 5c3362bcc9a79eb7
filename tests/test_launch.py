"""The local multi-process harness: N gloo workers on loopback, results back in rank order, errors surfaced."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_sft.launch import run_local_workers


def _sum_of_ranks() -> dict:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value, "backend": dist.get_backend()}


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 4])
def test_workers_all_reduce_and_return_in_rank_order(world_size):
    results = run_local_workers(_sum_of_ranks, world_size)
    assert [r["rank"] for r in results] == list(range(world_size))
    expected = world_size * (world_size + 1) / 2
    assert all(r["world"] == world_size and float(r["sum"]) == expected and r["backend"] == "gloo" for r in results)


def test_worker_exception_is_reported_with_traceback():
    with pytest.raises(RuntimeError, match="deliberate failure on rank 1") as raised:
        run_local_workers(_fail_on_rank_one, 2, timeout_s=120)
    assert "rank 1 failed first" in str(raised.value) and str(raised.value).count("Traceback") == 1


def test_expected_worker_exception_is_raised_as_it_is():
    """An error the caller expects (e.g. bad input) comes back as itself, to be shown as one line."""
    with pytest.raises(ValueError, match="^deliberate failure on rank 1$"):
        run_local_workers(_fail_on_rank_one, 2, timeout_s=120, expected_errors=(ValueError,))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_workers_run_with_the_threads_asked_for():
    """``threads``: the continuum runs its workers on one thread each; by default the cores are shared out."""
    import os

    assert run_local_workers(_torch_threads, 1, threads=1) == [1]
    assert run_local_workers(_torch_threads, 2) == [max(1, (os.cpu_count() or 1) // 2)] * 2


def _caller_state() -> tuple:
    import os

    print(f"worker-output-marker rank {dist.get_rank()}", flush=True)
    return os.environ.get("MEGATRON_SFT_LAUNCH_PROBE"), os.getcwd()


def test_workers_take_the_callers_environment_directory_and_output(tmp_path, monkeypatch, capfd):
    """Without CUDA the workers fork from a preloaded forkserver started by an earlier call; they must still see
    what the caller has now (environment, working directory) and write where its output goes, as spawned ones do."""
    from megatron_sft.launch import worker_start_method

    run_local_workers(_sum_of_ranks, 1)  # the forkserver, where used, is running before the changes below
    monkeypatch.setenv("MEGATRON_SFT_LAUNCH_PROBE", "set-after-the-server-started")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert run_local_workers(_caller_state, 2) == [("set-after-the-server-started", str(tmp_path))] * 2
    out = capfd.readouterr().out
    assert "worker-output-marker rank 0" in out and "worker-output-marker rank 1" in out
    assert worker_start_method() == ("spawn" if torch.cuda.is_available() else "forkserver")
