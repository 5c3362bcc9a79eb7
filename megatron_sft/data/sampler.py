"""Deterministic, data-parallel-sharded, resumable order of training rows.

Epoch e visits the rows in ``randperm(n, seed + e)``, ``global_batch`` rows per step; data-parallel rank r
takes the r-th contiguous slice of each step's rows. The position is just (epoch, step), so a resumed run
continues with exactly the rows the uninterrupted run would have used. When n is not a multiple of the
global batch, the last step of an epoch is filled with rows from the start of the same epoch's order (they
are seen twice that epoch; ``repeated_per_epoch`` says how many) - no row is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplerState:
    epoch: int = 0
    step: int = 0  # steps already taken in this epoch


class ShardedSampler:
    def __init__(self, num_rows: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {dp_size}")
        if num_rows <= 0:
            raise ValueError("the data set has no rows")
        self.num_rows, self.global_batch = num_rows, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.state = SamplerState()

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_rows // self.global_batch)

    @property
    def repeated_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch - self.num_rows

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        fill = self.repeated_per_epoch
        return torch.cat([order, order[:fill].repeat(-(-fill // self.num_rows))[:fill]]) if fill else order

    def step_rows(self, epoch: int, step: int) -> list[int]:
        """This rank's row indices for (epoch, step)."""
        rows = self._order(epoch)[step * self.global_batch : (step + 1) * self.global_batch]
        local = self.global_batch // self.dp_size
        return rows[self.dp_rank * local : (self.dp_rank + 1) * local].tolist()

    def next_step(self) -> tuple[int, int, list[int]]:
        """(epoch, step, rows) for the next step, advancing the state."""
        if self.state.step >= self.steps_per_epoch:
            self.state = SamplerState(self.state.epoch + 1, 0)
        epoch, step = self.state.epoch, self.state.step
        self.state = SamplerState(epoch, step + 1)
        return epoch, step, self.step_rows(epoch, step)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "step": self.state.step, "num_rows": self.num_rows,
                "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rows", "global_batch", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}; resume with the same data and batch settings"
                )
        self.state = SamplerState(state["epoch"], state["step"])
