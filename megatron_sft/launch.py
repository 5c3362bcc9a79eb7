"""Run a function on N local processes joined in one gloo/nccl group on loopback.

Used by the tests (so parallel tests are plain pytest tests), the benchmarks and ``megatron-sft selftest``.
Each worker gets ``RANK/WORLD_SIZE/MASTER_ADDR=127.0.0.1`` like under torchrun, runs ``fn(*args)`` and
hands its (picklable, tensors allowed) result back through a file; a worker's exception is re-raised in
the parent with the worker's traceback.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_sft.parallel import SINGLE_PROCESS_MARK, free_port


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, threads: int) -> None:
    os.environ.pop(SINGLE_PROCESS_MARK, None)  # inherited from a parent that ran single-process work first
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        from megatron_sft.parallel import init_distributed

        init_distributed()
        result = fn(*args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:  # noqa: BLE001
                pass
            dist.destroy_process_group()


def run_local_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes; returns the per-rank results in rank order."""
    threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="megatron_sft_workers_") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, fn, args, threads),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        errors: list[str] = []
        try:
            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} local workers did not finish within {timeout_s:.0f}s")
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException as exc:
            errors.append(str(exc))
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} wrote no result")
                continue
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                errors.append(f"rank {rank} failed:\n{record['error']}")
            else:
                results.append(record["result"])
        if errors:
            raise RuntimeError("local workers failed:\n" + "\n".join(errors))
        return results
