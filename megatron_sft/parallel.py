"""Process-group and megatron-core parallel-state set-up shared by the trainer, tools and tests."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft.cpu_shims import apply_cpu_shims, default_backend


SINGLE_PROCESS_MARK = "MEGATRON_SFT_SINGLE_PROCESS"  # RANK etc. were set by us, not by a launcher


def under_launcher() -> bool:
    """Whether torchrun or Slurm started this process as one rank of a job."""
    if "RANK" in os.environ and SINGLE_PROCESS_MARK not in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def init_distributed(backend: Optional[str] = None) -> tuple[int, int]:
    """Initialise torch.distributed from the torchrun/Slurm environment; returns (rank, world size)."""
    apply_cpu_shims()
    if not dist.is_initialized():
        if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
            _rendezvous_from_slurm()
        if "RANK" not in os.environ:  # single process: a one-rank group on loopback
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", **{SINGLE_PROCESS_MARK: "1"})
        dist.init_process_group(backend=backend or default_backend())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _rendezvous_from_slurm() -> None:
    """torchrun-style variables from an `srun` task (one task per GPU); MASTER_ADDR/PORT come from the job script."""
    if int(os.environ.get("SLURM_NTASKS", "1")) == 1:
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"running as Slurm task {os.environ['SLURM_PROCID']} of {os.environ['SLURM_NTASKS']} but {missing} are not "
            "set; export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and a MASTER_PORT in the "
            "job script (see slurm/)"
        )
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
    )


def init_model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    seed: int = 1234,
    expert_parallel: int = 1,
) -> None:
    """megatron-core parallel state (TP x PP x DP, experts split over ``expert_parallel`` of the TP x DP ranks of
    a stage) plus its model-parallel RNG streams."""
    from megatron.core import parallel_state, tensor_parallel as mc_tp

    _, world = init_distributed()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({tensor_parallel}) x "
            f"pipeline_parallel ({pipeline_parallel}); launch a multiple of TP*PP processes"
        )
    if expert_parallel < 1 or world % (tensor_parallel * pipeline_parallel * expert_parallel):
        raise ValueError(
            f"world size {world} is not divisible by parallel.expert ({expert_parallel}) x tensor_parallel "
            f"({tensor_parallel}) x pipeline_parallel ({pipeline_parallel}); launch a multiple of EP*TP*PP processes "
            "(the experts of a stage are split over EP of its TP x DP ranks)"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
    )
    mc_tp.model_parallel_cuda_manual_seed(seed)


def current_device() -> torch.device:
    """Where this rank's tensors live: its CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    """A barrier over all ranks (nothing in a single process without a group)."""
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
