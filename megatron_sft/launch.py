"""Run a function on N local processes joined in one gloo/nccl group on loopback.

Used by the tests (so parallel tests are plain pytest tests), the benchmarks and ``megatron-sft selftest``.
Each worker gets ``RANK/WORLD_SIZE/MASTER_ADDR=127.0.0.1`` like under torchrun, runs ``fn(*args)`` and
hands its (picklable, tensors allowed) result back through a file; the first failing worker's exception is
re-raised in the parent, with the worker's traceback or, for the caller's expected errors, as it is (the
``megatron-sft train`` launcher turns those into one line).
"""

from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp

from megatron_sft.parallel import SINGLE_PROCESS_MARK, free_port


# What every worker imports anyway: the forkserver imports it once, so that a worker starts in a fraction of
# a second instead of re-importing torch, megatron-core and transformers (~4 s of CPU each, per worker).
WORKER_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state", "megatron.core.models.gpt",
                  "transformers", "megatron_sft.launch", "megatron_sft.train.entry"]


def worker_start_method() -> str:
    """``forkserver`` (preloaded with :data:`WORKER_PRELOAD`) on a machine without CUDA; ``spawn`` with CUDA,
    where a server that imported megatron-core may have initialised the driver, which a fork cannot inherit."""
    return "spawn" if torch.cuda.is_available() else "forkserver"


class _CallerState:
    """What a forkserver child would otherwise take from the server rather than from the caller: the environment,
    the working directory and stdout/stderr (duplicated into the child when pickled, so prints land where the
    caller's own output goes, e.g. a test's captured output)."""

    def __init__(self) -> None:
        self.environment, self.cwd, self.output = dict(os.environ), os.getcwd(), None

    def __getstate__(self) -> dict:
        from multiprocessing import reduction

        return {**self.__dict__, "output": [reduction.DupFd(fd) for fd in (1, 2)]}

    def install(self) -> None:
        os.environ.clear()
        os.environ.update(self.environment)
        os.chdir(self.cwd)
        for target, duplicate in zip((1, 2), self.output or ()):
            os.dup2(duplicate.detach(), target)


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, threads: int,
            catch_stop_signals: bool = False, caller: Optional[_CallerState] = None) -> None:
    from megatron_sft.library_warnings import quiet_library_warnings

    if caller is not None:
        caller.install()

    quiet_library_warnings()
    if catch_stop_signals:  # from now on a stop is recorded, not fatal; the launcher forwards it once this exists
        from megatron_sft import stop_signal

        stop_signal.install()
        open(os.path.join(out_dir, f"ready{rank}"), "w").close()
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
    except BaseException as err:  # noqa: BLE001 - reported to the parent verbatim
        torch.save({"ok": False, "error": traceback.format_exc(), "time": time.time(), "exception": _pickled(err),
                    "secondary": bool(getattr(err, "secondary", False))}, path)
        raise SystemExit(1) from None  # reported through the file; nothing printed here (the parent decides)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:  # noqa: BLE001
                pass
            dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A worker failed with an unexpected error; the message holds the first failing rank's traceback."""


def _pickled(err: BaseException) -> Optional[bytes]:
    """The exception itself, if it survives pickling (so the parent can raise it as is)."""
    try:
        data = pickle.dumps(err)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001
        return None


class _SignalForwarder:
    """Pass SIGTERM / SIGUSR1 on to the workers (they checkpoint and exit, as under Slurm). With
    ``ready_dir``, a worker gets the signal only once it can take it (its ``readyN`` file exists): one that
    is still importing would die of it."""

    def __init__(self, pids: list[int], ready_dir: Optional[str]):
        self.pids, self.ready_dir = pids, ready_dir
        self.pending: Optional[int] = None
        self.sent: set[int] = set()
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._receive) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        if ready_dir is not None:
            from megatron_sft import stop_signal

            self.pending = stop_signal.received()  # arrived before the workers existed

    def _receive(self, signum: int, _frame: object) -> None:
        self.pending, self.sent = signum, set()
        self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        for rank, pid in enumerate(self.pids):
            ready = self.ready_dir is None or os.path.exists(os.path.join(self.ready_dir, f"ready{rank}"))
            if rank not in self.sent and ready:
                try:
                    os.kill(pid, self.pending)
                except ProcessLookupError:
                    pass
                self.sent.add(rank)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _wait(processes: list, timeout_s: float, forwarder: _SignalForwarder) -> None:
    """Until every worker exited, or one failed (the others are then killed by the caller)."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [proc.exitcode for proc in processes]
        if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(processes)} local workers did not finish within {timeout_s:.0f}s")
        forwarder.flush()
        multiprocessing.connection.wait([proc.sentinel for proc in processes if proc.exitcode is None], timeout=0.5)


def _results(out_dir: str, world_size: int, expected_errors: tuple[type[BaseException], ...]) -> list[Any]:
    """Per-rank results; on failure the first failing rank's error: raised as is when it is one of
    ``expected_errors`` (a one-line error for the user), else as a RuntimeError with its traceback."""
    results, failures, missing = [], [], []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        if not os.path.exists(path):
            missing.append(f"rank {rank} wrote no result")
            continue
        try:
            record = torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - killed while writing it, after another rank failed
            missing.append(f"rank {rank} wrote an unreadable result")
            continue
        if record["ok"]:
            results.append(record["result"])
        else:
            failures.append((record.get("secondary", False), record.get("time", 0.0), rank, record))
    if failures:
        _, _, rank, record = min(failures, key=lambda f: f[:3])
        error = pickle.loads(record["exception"]) if record.get("exception") else None
        if isinstance(error, expected_errors):
            raise error
        others = f" ({len(failures) - 1} other rank(s) failed after it)" if len(failures) > 1 else ""
        raise WorkerError(f"local workers failed: rank {rank} failed first{others}:\n{record['error']}")
    if missing:
        raise WorkerError("local workers failed:\n" + "\n".join(missing))
    return results


def run_local_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600,
                      expected_errors: tuple[type[BaseException], ...] = (), catch_stop_signals: bool = False,
                      threads: Optional[int] = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes; returns the per-rank results in rank order.

    ``expected_errors``: exception types re-raised as they are (not wrapped with a traceback) when a worker
    raises one first. ``catch_stop_signals``: workers record SIGTERM / SIGUSR1 from their start (see
    stop_signal.py) and the launcher holds a signal back from a worker until it can take it. ``threads``: torch
    threads per worker (default: the CPU cores shared out over the workers).
    """
    from megatron_sft.library_warnings import quiet_library_warnings

    quiet_library_warnings(child_processes=True)  # PYTHONWARNINGS: workers filter the import-time warnings too
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    method = worker_start_method()
    if method == "forkserver":
        mp.get_context(method).set_forkserver_preload(WORKER_PRELOAD)  # takes effect when the server starts
    with tempfile.TemporaryDirectory(prefix="megatron_sft_workers_") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, fn, args, threads, catch_stop_signals,
                  _CallerState() if method == "forkserver" else None),
            nprocs=world_size,
            join=False,
            start_method=method,
        )
        forwarder = _SignalForwarder([proc.pid for proc in ctx.processes], out_dir if catch_stop_signals else None)
        try:
            _wait(ctx.processes, timeout_s, forwarder)
        finally:
            forwarder.restore()
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        return _results(out_dir, world_size, expected_errors)


def local_worker_count(nproc: Optional[int]) -> Optional[int]:
    """``--nproc`` as the number of local workers to spawn (None: run in this process). Refused under
    torchrun/Slurm, whose launcher starts the processes itself."""
    from megatron_sft.config import ConfigError
    from megatron_sft.parallel import under_launcher

    if nproc is None or nproc <= 1:
        if nproc is not None and nproc < 1:
            raise ConfigError(f"--nproc {nproc}: must be >= 1")
        return None
    if under_launcher():
        raise ConfigError("--nproc is for local runs; under torchrun/Slurm the launcher starts the processes")
    return nproc
