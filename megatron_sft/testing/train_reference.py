"""An independent reference for one trainer step: the HF model in float64 with plain autograd.

The trainer's first step (dumped with ``MEGATRON_SFT_DUMP_GRADS``, see :mod:`megatron_sft.train.grad_dump`)
is recomputed here without any of the trainer's model, loss or reduction code: every sequence the trainer
put into a micro-batch (found by its token ids among the independently formatted examples, which give
its response mask) runs alone through ``transformers``' model in float64; f(p) and the token selection
come from the float64 formulas of :mod:`megatron_sft.selfcheck.reference_loss`; the loss is normalised over the
global batch or per micro-batch as the README specifies, and ``backward()`` gives every HF parameter's
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sft.selfcheck.reference_loss import (
    parse_reference,
    reference_selection,
    reference_value,
)


@dataclass
class TokenTerms:
    """Per-token float64 quantities of the global batch, with the micro-batch / sequence each belongs to."""

    logp: torch.Tensor  # differentiable, [n]
    micro_batch: torch.Tensor  # [n] global micro-batch index (DP rank major)
    sequence: torch.Tensor  # [n] global sequence index


def _float64_rmsnorm(hf_model) -> None:
    """transformers' RMSNorm upcasts to float32 (and back); with a float64 model it must stay float64,
    or the reference's norms are only fp32-accurate."""
    for module in hf_model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            eps = getattr(module, "variance_epsilon", None) or module.eps

            def forward(x, module=module, eps=eps):
                return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

            module.forward = forward


def sequences_of(micro_batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The token ids of every sequence in a collated micro-batch (row-major, packing order)."""
    out = []
    for tokens, ids in zip(micro_batch["tokens"], micro_batch["sequence_ids"]):
        for s in range(int(ids.max()) + 1):
            out.append(tokens[ids == s].tolist())
    return out


def token_terms(hf_model, examples: dict[tuple, list[int]], micro_batches: list[list[dict]]) -> TokenTerms:
    """log p (float64, with graph) of every trained token of every sequence the trainer used, in order."""
    logps, mbs, seqs = [], [], []
    mb_index = seq_index = 0
    for rank_batches in micro_batches:
        for mb in rank_batches:
            for ids in sequences_of(mb):
                target_mask = examples.get(tuple(ids))
                assert target_mask is not None, f"trainer sequence {ids[:12]}... is not one of the data's examples"
                x = torch.tensor([ids])
                logp_all = hf_model(x).logits[0, :-1].double().log_softmax(-1)
                logp = logp_all.gather(1, x[0, 1:, None]).squeeze(1)
                trained = torch.tensor(target_mask[1:], dtype=torch.bool)
                logps.append(logp[trained])
                mbs.append(torch.full((int(trained.sum()),), mb_index))
                seqs.append(torch.full((int(trained.sum()),), seq_index))
                seq_index += 1
            mb_index += 1
    return TokenTerms(torch.cat(logps), torch.cat(mbs), torch.cat(seqs))


def reference_loss_value(terms: TokenTerms, spec: str, normalization: str, reduction: str = "token_mean",
                         denominator: str = "selected") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, selected mask): f(p) over the global batch's tokens, normalised as the README specifies.

    Selection (thresholds, percentiles) is a stop-gradient mask; percentiles over the whole global batch."""
    base, arg, kind, threshold = parse_reference(spec)
    p = terms.logp.detach().exp()
    valid = torch.ones_like(p, dtype=torch.bool)
    selected = reference_selection(kind, threshold, p, valid)
    values = torch.where(selected, reference_value(base, arg, terms.logp), torch.zeros_like(p))
    counted = selected if denominator == "selected" else valid
    if reduction == "sequence_mean":  # each sequence's mean, then sequences are the units counted
        per_seq_n = torch.zeros(int(terms.sequence.max()) + 1, dtype=torch.float64).index_add_(0, terms.sequence, counted.double())
        values = values / per_seq_n[terms.sequence].clamp_min(1)
        units = (per_seq_n > 0).double()
        unit_mb = torch.zeros_like(per_seq_n).index_reduce_(0, terms.sequence, terms.micro_batch.double(), "amax", include_self=False)
        unit_index = unit_mb.long()
    else:
        units, unit_index = counted.double(), terms.micro_batch
    if normalization == "global":
        return values.sum() / units.sum().clamp_min(1), selected
    n_mb = int(terms.micro_batch.max()) + 1
    numerators = torch.zeros(n_mb, dtype=torch.float64).index_add(0, terms.micro_batch, values)
    denominators = torch.zeros(n_mb, dtype=torch.float64).index_add_(0, unit_index, units)
    return (numerators / denominators.clamp_min(1)).mean(), selected


def reference_step(hf_dir: str | Path, data: str | Path, dump: dict, spec: str, normalization: str,
                   data_config, reduction: str = "token_mean") -> dict:
    """Loss, per-HF-parameter gradients and the token p's of the trainer's first step, in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.data.formatting import Formatter
    from megatron_sft.data.sources import read_rows

    formatter = Formatter(AutoTokenizer.from_pretrained(str(hf_dir)), data_config)
    examples = {}
    for row in read_rows(str(data)):
        example = formatter(row)
        examples[tuple(example.input_ids)] = example.target_mask
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64, attn_implementation="eager")
    model.eval()
    _float64_rmsnorm(model)
    terms = token_terms(model, examples, dump["micro_batches"])
    loss, selected = reference_loss_value(terms, spec, normalization, reduction)
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()}
    return {"loss": float(loss), "grads": grads, "p": terms.logp.detach().exp(), "selected": selected}


def reference_trainer_loop(hf_dir: str | Path, data: str | Path, dump: dict, spec: str, data_config) -> dict:
    """The reference trainer's step (``_compute_loss_and_backward`` + ``training_step``) in plain float64
    PyTorch on the trainer's micro-batches: on each DP rank, every micro-batch's token mean
    sum(f(p) * mask) / (sum(mask) + 1e-8) is backpropagated on its own (its gradient accumulates undivided),
    the logged loss is their mean; the ranks' gradients are averaged (FSDP's all-reduce). Fixed f(p) only:
    the reference selects percentiles per micro-batch, which is not what this project does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.data.formatting import Formatter
    from megatron_sft.data.sources import read_rows

    base, arg, kind, _ = parse_reference(spec)
    assert kind == "none", "reference_trainer_loop covers fixed f(p) objectives"
    formatter = Formatter(AutoTokenizer.from_pretrained(str(hf_dir)), data_config)
    examples = {tuple(e.input_ids): e.target_mask for e in map(formatter, read_rows(str(data)))}
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64, attn_implementation="eager")
    model.eval()
    _float64_rmsnorm(model)
    logged = []
    for rank_batches in dump["micro_batches"]:
        rank_loss = 0.0
        for micro_batch in rank_batches:
            logp = token_terms(model, examples, [[micro_batch]]).logp
            loss = reference_value(base, arg, logp).sum() / (logp.numel() + 1e-8)
            loss.backward()
            rank_loss += float(loss.detach()) / len(rank_batches)
        logged.append(rank_loss)
    dp = len(dump["micro_batches"])
    grads = {name: param.grad.detach().clone() / dp for name, param in model.named_parameters()}
    return {"loss": sum(logged) / dp, "grads": grads}


def gradient_errors(trainer: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: ||g_trainer - g_ref|| / ||g_ref|| (the relative error of the whole tensor)."""
    assert trainer.keys() == reference.keys(), (sorted(set(trainer) ^ set(reference)))
    return {name: float((trainer[name].double() - ref).norm() / ref.norm().clamp_min(1e-30)) for name, ref in reference.items()}


def selection_margin(p: torch.Tensor, selected: torch.Tensor) -> float:
    """Relative p gap between the kept and the dropped tokens (inf when all or none are kept): a threshold
    or percentile case is well posed only if fp32 rounding (~1e-7) cannot move a token across it."""
    kept, dropped = p[selected], p[~selected]
    if kept.numel() == 0 or dropped.numel() == 0:
        return float("inf")
    if kept.min() >= dropped.max():  # above / top
        gap = kept.min() - dropped.max()
    else:  # below / bottom
        gap = dropped.min() - kept.max()
    return float(gap / p.max())


def counting_train_worker(config_dict: dict, resume: bool = False) -> dict:
    """``train_worker`` that also counts megatron-core's activation-checkpoint segments run on this rank
    (``CheckpointFunction``: model.recompute full or selective), so a test can see recompute is active."""
    from megatron.core.tensor_parallel import random as mc_random

    from megatron_sft.train.entry import train_worker

    calls = [0]
    forward = mc_random.CheckpointFunction.forward

    def counted(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    mc_random.CheckpointFunction.forward = staticmethod(counted)
    return {**train_worker(config_dict, resume), "recomputed_segments": calls[0]}


def run_first_step(config, nproc: int, dump_file: str | Path) -> dict:
    """Run ``megatron-sft train``'s workers on ``nproc`` local processes with the gradient dump enabled;
    the dump of the first step (see :mod:`megatron_sft.train.grad_dump`) and rank 0's recompute count."""
    import os

    from megatron_sft.launch import run_local_workers
    from megatron_sft.train.grad_dump import ENV

    previous = os.environ.get(ENV)
    os.environ[ENV] = str(dump_file)  # the spawned workers inherit it
    try:
        results = run_local_workers(counting_train_worker, nproc, config.to_dict(), False, timeout_s=600)
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
    return {**torch.load(dump_file, weights_only=False), "recomputed_segments": results[0]["recomputed_segments"]}
