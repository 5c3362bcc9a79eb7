"""Grading in separate worker processes, each task under a wall-clock limit.

Graders run model output (math-verify parses it with sympy, evalplus executes it), so one item can hang or
crash its process. Each worker is its own process group: a task past its limit gets the group killed
(evalplus's own child processes with it), scores 0 with the reason, and a fresh worker takes the next task.
The workers are not daemonic, because evalplus starts a process per check.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

Task = tuple[Any, ...]


def _worker_main(conn: Connection, fn: Callable[..., dict]) -> None:
    os.setsid()  # own process group, so that a kill takes the grader's children too
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, task = message
        try:
            result = fn(*task)
        except Exception as err:  # a grader bug or bad output: this item scores 0, the run goes on
            result = {"score": 0.0, "error": f"grader raised {type(err).__name__}: {err}"[:500]}
        conn.send((index, result))


class _Worker:
    def __init__(self, context: mp.context.BaseContext, fn: Callable[..., dict]):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, fn), daemon=False)
        self.process.start()
        child.close()
        self.index: Optional[int] = None
        self.deadline = 0.0

    def give(self, index: int, task: Task, timeout: float) -> None:
        self.index, self.deadline = index, time.monotonic() + timeout
        self.conn.send((index, task))

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.kill()


def grade_in_workers(fn: Callable[..., dict], tasks: Sequence[Task], workers: int, timeout: float,
                     on_result: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """``fn(*task)`` for every task in ``workers`` processes; a task over ``timeout`` seconds or whose worker
    dies gives ``{"score": 0.0, "error": ...}``. Results come back in task order."""
    results: list[Optional[dict]] = [None] * len(tasks)
    if not tasks:
        return []
    context = mp.get_context("spawn")  # the parent may hold a model and threads: do not fork it
    pending = list(range(len(tasks)))[::-1]
    pool = [_Worker(context, fn) for _ in range(max(1, min(workers, len(tasks))))]

    def finish(index: int, result: dict) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    try:
        for worker in pool:
            if pending:
                index = pending.pop()
                worker.give(index, tasks[index], timeout)
        while any(w.index is not None for w in pool):
            busy = [w for w in pool if w.index is not None]
            wait_for = max(0.05, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_for)
            for slot, worker in enumerate(pool):
                if worker.index is None:
                    continue
                if worker.conn in ready:
                    try:
                        index, result = worker.conn.recv()
                    except (EOFError, OSError):
                        index, result = worker.index, {"score": 0.0, "error": "grader process died"}
                        worker.kill()
                        worker = pool[slot] = _Worker(context, fn)
                    finish(index, result)
                elif time.monotonic() >= worker.deadline:
                    finish(worker.index, {"score": 0.0, "error": f"grading timed out after {timeout:g} s"})
                    worker.kill()
                    worker = pool[slot] = _Worker(context, fn)
                else:
                    continue
                worker.index = None
                if pending:
                    index = pending.pop()
                    worker.give(index, tasks[index], timeout)
    finally:
        for worker in pool:
            if worker.index is None:
                worker.stop()
            else:
                worker.kill()
    return [r if r is not None else {"score": 0.0, "error": "not graded"} for r in results]
