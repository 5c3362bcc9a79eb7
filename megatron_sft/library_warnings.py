"""Silence the warnings megatron-core and torch print on every rank that say nothing about the user's run.

Kept to a list of known messages, so that a new warning still shows.
"""

from __future__ import annotations

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
)


def quiet_library_warnings() -> None:
    for message in _KNOWN:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
