"""Range checks of the numeric config keys, so that e.g. ``optim.lr=nan`` fails as one line naming the key
before any process starts (torch's "Invalid learning rate" came from every worker, as a traceback)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# key: (lowest, highest, whether the lowest is allowed); None: no bound
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "optim.lr": (0.0, None, False),
    "optim.min_lr": (0.0, None, True),
    "optim.eps": (0.0, None, False),
    "optim.weight_decay": (0.0, None, True),
    "optim.clip_grad": (0.0, None, True),
    "optim.warmup_steps": (0.0, None, True),
    "train.eval_every_steps": (0.0, None, True),
    "checkpoint.every_steps": (0.0, None, True),
    "data.max_dropped_fraction": (0.0, 1.0, True),
    "model.loss_chunk_tokens": (1.0, None, True),
    "model.moe_aux_loss_coeff": (0.0, None, True),
    "model.moe_capacity_factor": (0.0, None, False),
    "parallel.bucket_size": (1.0, None, True),
}


def _numbers(config: Any) -> dict[str, float]:
    """Every numeric value of the config by ``section.key`` (tuples such as betas as ``key[i]``)."""
    found: dict[str, float] = {}
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            key = f"{section.name}.{f.name}"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = value
            elif isinstance(value, tuple):
                found.update({f"{key}[{i}]": v for i, v in enumerate(value) if isinstance(v, (int, float))})
    return found


def check_numbers(config: Any) -> None:
    """Every number finite; the keys in ``_RANGES`` and the Adam betas within their ranges."""
    from megatron_sft.config import ConfigError

    numbers = _numbers(config)
    for key, value in numbers.items():
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}; set it in the config or as {key.split('[')[0]}=VALUE")
    for key, (low, high, low_ok) in _RANGES.items():
        value = numbers.get(key)
        if value is None:
            continue
        if low is not None and (value < low or (value == low and not low_ok)):
            raise ConfigError(f"{key} must be {'>=' if low_ok else '>'} {low:g}, got {value:g}")
        if high is not None and value > high:
            raise ConfigError(f"{key} must be <= {high:g}, got {value:g}")
    for key in ("optim.betas[0]", "optim.betas[1]"):
        if key in numbers and not 0.0 <= numbers[key] < 1.0:
            raise ConfigError(f"optim.betas must both be in [0, 1), got {config.optim.betas}")
