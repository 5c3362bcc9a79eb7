"""Silence the warnings megatron-core and torch print on every rank that say nothing about the user's run.

Kept to a list of known messages, so that a new warning still shows. Most are printed while megatron-core
is imported, before any of our code runs in a spawned worker, so :func:`quiet_library_warnings` with
``child_processes=True`` also puts them into ``PYTHONWARNINGS``: every process started afterwards (``--nproc``
workers, the HF export) filters them from its first line.
"""

from __future__ import annotations

import os
import warnings

_KNOWN = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`load_state_dict` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`torch.distributed._all_gather_base` is deprecated",
    "`torch.distributed._reduce_scatter_base` is deprecated",
    # megatron-core's TP linear layers, once per process, about a CUDA scheduling setting
    "When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
    "When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
)


def quiet_library_warnings(child_processes: bool = False) -> None:
    """Ignore the known messages in this process (and, with ``child_processes``, in every process it starts)."""
    for message in _KNOWN:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    if child_processes:
        # PYTHONWARNINGS entries match the start of a message literally; they are comma-separated
        entries = [f"ignore:{message}" for message in _KNOWN if "," not in message and ":" not in message]
        existing = os.environ.get("PYTHONWARNINGS", "")
        missing = [e for e in entries if e not in existing.split(",")]
        os.environ["PYTHONWARNINGS"] = ",".join(([existing] if existing else []) + missing)
