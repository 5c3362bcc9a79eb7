"""Run a function on N local processes joined in one gloo/nccl group on loopback.

Used by the tests (so parallel tests are plain pytest tests), the benchmarks and ``megatron-sft selftest``.
Each worker gets ``RANK/WORLD_SIZE/MASTER_ADDR=127.0.0.1`` like under torchrun, runs ``fn(*args)`` and
hands its (picklable, tensors allowed) result back through a file; a worker's exception is re-raised in
the parent with the worker's traceback.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
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


def _forward_signals(pids: list[int]) -> Callable[[], None]:
    """Pass SIGTERM / SIGUSR1 on to the workers (they checkpoint and exit, as under Slurm); returns an undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def forward(signum, _frame):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


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
        restore = _forward_signals([proc.pid for proc in ctx.processes])
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
            restore()
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
