"""Training checkpoints: model, optimizer, LR schedule, sampler and RNG, written atomically.

    OUTPUT/checkpoints/step_0000100/   a megatron-sft checkpoint (model_args.json, model/, tokenizer/) that
                                       `convert mcore-to-hf` and `train model.checkpoint=` accept as is, plus
                                       optimizer/ (megatron-core dist checkpoint, resharding-capable format),
                                       trainer_state.json (step, sampler, scheduler) and rng/rank*.pt
    OUTPUT/checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written to a hidden temporary directory, its ``manifest.json`` (every file's size and CRC-32,
see checkpoint_integrity.py) last, then renamed into place, and ``latest`` is replaced atomically after that,
so a crash at any moment leaves ``latest`` naming a loadable checkpoint. Only the newest ``keep_last`` are
kept. A save that does not fit is refused or cleaned up (save_guard.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_sft.model.checkpoint import (
    MODEL_ARGS_FILE, MODEL_DIR, TOKENIZER_DIR, copy_tokenizer_files, fresh_temporary_sibling, replace_directory,
    temporary_sibling,
)
from megatron_sft.parallel import barrier
from megatron_sft.train.checkpoint_integrity import write_manifest
from megatron_sft.model.checkpoint import chunks_sharded_state_dict
from megatron_sft.train.model_setup import TrainingModel, gather_parameters
from megatron_sft.train.save_guard import NoSpaceError, check_free_space, checkpoint_bytes, guarded_write

OPTIMIZER_DIR = "optimizer"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
LATEST = "latest"
# the distributed optimizer's state in a layout-independent form (reloads at another TP/PP/DP)
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_checkpoint(
    model: TrainingModel,
    checkpoints_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    tokenizer_src: Optional[str | Path],
    save_optimizer: bool = True,
    keep_last: int = 2,
) -> Path:
    """Collective. Returns the final directory. A manifest (sizes, CRC-32s) is written last, before the
    atomic ``latest`` update; a save that does not fit raises :class:`NoSpaceError` with ``latest`` kept."""
    gather_parameters(model)  # parallel.overlap_param_gather: the last step's weights, not the step before's
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    tmp = temporary_sibling(final)
    known = checkpoint_bytes(_latest_or_none(root))  # the previous checkpoint's size: this one's, near enough
    needed = known or _estimated_bytes(model, save_optimizer)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        check_free_space(root, known)
        fresh_temporary_sibling(final)
        for sub in (MODEL_DIR, OPTIMIZER_DIR, RNG_DIR):
            (tmp / sub).mkdir()

    def write_rank0_files() -> None:
        _write_rank0_files(model, tmp, step, trainer_state, tokenizer_src, save_optimizer)

    _agree_on_failure(_attempt(lambda: guarded_write(prepare, tmp, root, needed)) if _rank() == 0 else None, tmp)
    _agree_on_failure(_attempt(lambda: guarded_write(lambda: _write_shards(model, tmp, save_optimizer), tmp, root, needed)), tmp)
    _agree_on_failure(_attempt(lambda: guarded_write(write_rank0_files, tmp, root, needed)) if _rank() == 0 else None, tmp)
    write_manifest(tmp)
    barrier()
    if _rank() == 0:
        replace_directory(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last, keep=final.name)
    barrier()
    return final


def _estimated_bytes(model: TrainingModel, save_optimizer: bool) -> int:
    """Collective. About what a save writes: the weights in their dtype plus, with the optimizer, fp32 main
    parameters and two Adam moments (12 bytes per parameter); used in the no-space message of a first save."""
    from megatron.core import parallel_state as ps

    params = [p for module in model.modules for p in module.parameters()]
    total = torch.tensor([float(sum(p.numel() * p.element_size() for p in params)), float(sum(p.numel() for p in params))],
                         dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= ps.get_data_parallel_world_size()  # data-parallel replicas hold the same weights
    weights, count = total.tolist()
    return int(weights + (12 * count if save_optimizer else 0))


def _latest_or_none(root: Path) -> Optional[Path]:
    try:
        return latest_checkpoint(root)
    except FileNotFoundError:
        return None


class CheckpointWriteError(RuntimeError):
    """Raised on the ranks whose own part of a save succeeded when another rank's failed."""

    secondary = True  # the launcher reports the failing rank's own error instead


def _attempt(action: Callable[[], None]) -> Optional[BaseException]:
    try:
        action()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - handed to _agree_on_failure (CheckpointException is one)
        return err
    return None


def _agree_on_failure(failure: Optional[BaseException], tmp: Path) -> None:
    """Collective. If any rank failed, every rank raises (the failing one its own error, the others the same
    no-space line, or :class:`CheckpointWriteError`) and the partial folder is removed; else returns."""
    report = None if failure is None else (isinstance(failure, NoSpaceError), str(failure))
    reports = [report]
    if dist.is_initialized():
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
    reported = [r for r in reports if r is not None]
    if not reported:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        raise failure
    no_space, message = reported[0]
    raise NoSpaceError(message) if no_space else CheckpointWriteError(f"checkpoint save failed on another rank: {message}")


def _write_shards(model: TrainingModel, tmp: Path, save_optimizer: bool) -> None:
    """Every rank's part: the model and optimizer shards (megatron-core dist checkpoints) and its RNG."""
    from megatron.core import dist_checkpointing

    model_sd = chunks_sharded_state_dict(model.modules)
    dist_checkpointing.save(model_sd, str(tmp / MODEL_DIR))
    if save_optimizer:
        optim_sd = model.optimizer.sharded_state_dict(chunks_sharded_state_dict(model.modules), metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(optim_sd, str(tmp / OPTIMIZER_DIR))
    torch.save(rng_state(), tmp / RNG_DIR / f"rank{_rank()}.pt")


def _write_rank0_files(model: TrainingModel, tmp: Path, step: int, trainer_state: dict[str, Any],
                       tokenizer_src: Optional[str | Path], save_optimizer: bool) -> None:
    model.args.save(tmp / MODEL_ARGS_FILE)
    if tokenizer_src is not None:
        copy_tokenizer_files(Path(tokenizer_src), tmp / TOKENIZER_DIR)
    state = dict(trainer_state, step=step, scheduler=model.scheduler.state_dict(), has_optimizer=save_optimizer,
                 distributed_optimizer=model.distributed_optimizer,
                 world_size=dist.get_world_size() if dist.is_initialized() else 1)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(checkpoints_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which has no {STATE_FILE}; the checkpoint directory was altered")
    return path


@contextlib.contextmanager
def _torch_adam_step_compat():
    """megatron-core 0.16 loading a ``fully_reshardable`` distributed-optimizer state into torch's Adam
    (no Apex/TE FusedAdam) fails: it copies every per-parameter state key from the checkpoint, but the
    checkpoint leaves out torch Adam's ``step`` (restored separately, from the param groups). While loading,
    the step already set is passed through unchanged."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def with_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state.get(self.optimizer.param_groups[group_index]["params"][group_order], {})
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = with_step
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core restores torch Adam's per-parameter ``step`` as ONE tensor shared by every parameter;
    torch increments each parameter's step in place, so the shared one would advance once per parameter
    per step and skew Adam's bias correction. Give every parameter its own copy."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in wrapper.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its (lazily created) state, so megatron-core can load into it.

    megatron-core's optimizers read the Adam step from existing state before loading; without Apex/TE a new
    optimizer has none. One step with zero gradients, lr 0 and weight decay 0 creates it without changing a
    weight (the loaded values then replace it).
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = wrapper.optimizer
        if inner.state:
            continue
        saved = [(group["lr"], group.get("weight_decay", 0.0)) for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        for group, (lr, decay) in zip(inner.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, decay
            for param in group["params"]:
                param.grad = None


def saved_distributed_optimizer(path: Optional[Path], configured: bool) -> Optional[bool]:
    """Whether the checkpoint a run resumes from holds the distributed optimizer's state (None: no checkpoint).
    Checkpoints from before this was recorded were written by it exactly when ``parallel.distributed_optimizer``
    was set, at any DP."""
    if path is None:
        return None
    return bool(json.loads((Path(path) / STATE_FILE).read_text()).get("distributed_optimizer", configured))


def load_training_checkpoint(model: TrainingModel, path: str | Path) -> dict[str, Any]:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    from megatron_sft.model.checkpoint import load_weights

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if not state.get("has_optimizer", False):
        raise ValueError(f"{path} was saved without optimizer state (checkpoint.save_optimizer=false); it cannot be resumed")
    _materialize_optimizer_state(model.optimizer)
    load_weights(model.modules, path / MODEL_DIR)
    optim_sd = model.optimizer.sharded_state_dict(
        chunks_sharded_state_dict(model.modules), is_loading=True, metadata=OPTIMIZER_METADATA
    )
    loaded = dist_checkpointing.load(optim_sd, str(path / OPTIMIZER_DIR))
    with _torch_adam_step_compat():
        model.optimizer.load_state_dict(loaded)
    _unshare_adam_steps(model.optimizer)
    model.scheduler.load_state_dict(state["scheduler"])
    rng_file = path / RNG_DIR / f"rank{_rank()}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng_file.is_file() and state.get("world_size") == world:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
