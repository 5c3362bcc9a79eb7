"""config.json of an export, written so that every reader in use gets the same RoPE and dtype.

transformers 5 writes RoPE only as ``rope_parameters``; transformers 4.4x-4.5x (still pinned by many
evaluation stacks) ignores that key and reads ``rope_theta`` / ``rope_scaling``, falling back to theta 10000
and no scaling: silently wrong logits. The export therefore writes both spellings (they never conflict: the
legacy keys are derived from ``rope_parameters``), and ``torch_dtype`` beside ``dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_sft.model.args import ModelArgs


def legacy_rope_keys(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` as transformers 4.x spells them, from transformers 5's
    ``rope_parameters`` (``rope_scaling`` is None for plain RoPE, else the scaling settings with ``rope_type``)."""
    if not rope_parameters or "rope_theta" not in rope_parameters:
        raise ValueError(f"rope_parameters {rope_parameters!r} has no rope_theta; cannot write legacy RoPE keys")
    scaling = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "type")}
    scaling.setdefault("rope_type", rope_parameters.get("type", "default"))
    return {"rope_theta": rope_parameters["rope_theta"],
            "rope_scaling": None if scaling["rope_type"] == "default" else scaling}


def write_hf_config(args: ModelArgs, dtype: torch.dtype, directory: Path) -> dict[str, Any]:
    """Save the export's config.json (transformers' own writer, then the legacy keys); returns what was written."""
    config = args.hf_config_object()
    config.architectures = [args.architecture]
    config.dtype = dtype
    config.save_pretrained(directory)
    path = directory / "config.json"
    written = json.loads(path.read_text())
    rope = written.get("rope_parameters") or args.rope_parameters
    written.update(legacy_rope_keys(rope))
    written["torch_dtype"] = str(dtype).replace("torch.", "")
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return written
