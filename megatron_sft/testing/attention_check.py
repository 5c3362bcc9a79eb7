"""Attention backends against the local spec: same weights, same batch, logits and every gradient compared.

Module level so that spawned workers (``run_local_workers``) can import it. Each case builds the model twice
on this rank's TP x PP place, the ``local`` backend (megatron-core's ``DotProductAttention``, the reference)
and the backend under test with the local model's weights copied in, runs one forward/backward through
megatron-core's pipeline schedule and returns the relative errors of this rank's logits shard and of each of
its parameters' gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

# two rows of 16 tokens (divisible by TP=2 for SP): three sequences + padding, and two sequences
PACKED_SEQUENCE_IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 3 + [-1], [0] * 9 + [1] * 7])
UNPACKED_SEQUENCE_IDS = torch.tensor([[0] * 16, [0] * 13 + [-1] * 3])


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (absolute when the reference is all zeros)."""
    diff = (value.double() - reference.double()).norm()
    scale = reference.double().norm()
    return float(diff / scale) if scale > 0 else float(diff)


def _batch(vocab_size: int, packed: bool, seed: int) -> dict[str, torch.Tensor]:
    ids = (PACKED_SEQUENCE_IDS if packed else UNPACKED_SEQUENCE_IDS).clone()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, ids.shape, generator=generator)
    labels = torch.randint(0, vocab_size, ids.shape, generator=generator)
    positions = torch.arange(ids.size(1)).unsqueeze(0).expand_as(ids).contiguous()
    return {"tokens": tokens, "labels": labels, "position_ids": positions, "sequence_ids": ids,
            "loss_mask": (ids >= 0).float()}


def _forward_backward(model, batch: dict[str, torch.Tensor], use_thd: bool) -> Optional[torch.Tensor]:
    """One micro-batch through megatron-core's schedule; this rank's logits shard on the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sft.model.attention import attention_inputs

    device = next(model.parameters()).device
    flat, mask, packed = attention_inputs({k: v.to(device) for k, v in batch.items()}, use_thd)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        data = next(data_iterator)
        output = chunk(data["tokens"], data["position_ids"], mask, packed_seq_params=packed)

        def loss_func(logits: torch.Tensor):
            collected.append(logits.detach().reshape(batch["tokens"].shape + logits.shape[-1:]).clone())
            losses = vocab_parallel_cross_entropy(logits.float(), data["labels"])
            return (losses * data["loss_mask"]).sum() / data["loss_mask"].sum(), {}

        return output, loss_func

    rows, length = flat["tokens"].shape
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([flat]), model=[model],
                                num_microbatches=1, seq_length=length, micro_batch_size=rows, forward_only=False)
    return collected[0].float().cpu() if ps.is_pipeline_last_stage() else None


@contextmanager
def packed_mask_dropped(drop: bool) -> Iterator[None]:
    """Negative control: the torch backend with the packed rows' block mask thrown away (plain causal)."""
    from megatron_sft.model.torch_attention import TorchSDPAttention

    original = TorchSDPAttention._sbhd
    if drop:
        TorchSDPAttention._sbhd = lambda self, q, k, v, mask, mask_type: original(self, q, k, v, None, mask_type)
    try:
        yield
    finally:
        TorchSDPAttention._sbhd = original


def _sequence_parallel_total(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Under SP a norm weight's gradient is partial on each TP rank (its slice of the tokens; THD slices the
    flattened row, not each row): the sum over TP, what ``finalize_model_grads`` would apply, is compared."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not getattr(param, "sequence_parallel", False):
        return grad
    total = grad.clone()
    dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    return total


def compare_case(hf_dir: str, backend: str, packed: bool, sequence_parallel: bool, use_thd: bool = False,
                 seed: int = 0) -> dict[str, Any]:
    """``backend`` vs ``local`` on one batch at the current parallel state (set up by the caller)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_sft.model.args import ModelArgs
    from megatron_sft.model.builder import build_gpt_model, build_transformer_config

    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(hf_dir))
    config = build_transformer_config(
        args, tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(), sequence_parallel=sequence_parallel)
    stage = dict(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    torch.manual_seed(seed)
    reference = build_gpt_model(args, config, attention_backend="local", **stage)
    tested = build_gpt_model(args, config, attention_backend=backend, **stage)
    tested.load_state_dict(reference.state_dict(), strict=True)
    batch = _batch(args.vocab_size, packed, seed)
    ref_logits = _forward_backward(reference, batch, use_thd=False)
    logits = _forward_backward(tested, batch, use_thd=use_thd)
    grads = {}
    tested_params = dict(tested.named_parameters())
    for name, param in reference.named_parameters():
        other = tested_params[name].grad
        assert param.grad is not None and other is not None, f"{name}: no gradient"
        grads[name] = relative_error(_sequence_parallel_total(param, other), _sequence_parallel_total(param, param.grad))
    return {"logits": None if logits is None else relative_error(logits, ref_logits), "grads": grads,
            "backend_used": tested.attention_backend}


def equivalence_worker(hf_dirs: list[str], layouts: list[tuple[int, int, bool]], backend: str = "torch",
                       drop_packed_mask: bool = False) -> list[dict[str, Any]]:
    """Every (layout, model, packed/unpacked) case on this rank; a layout is (TP, PP, thd), SP whenever TP > 1.
    ``thd``: packed rows only, as THD ``PackedSeqParams`` (what the CUDA varlen path gets; on CPU the torch
    backend rebuilds the mask from cu_seqlens), against the local backend's block mask."""
    from megatron_sft.parallel import init_model_parallel

    results = []
    for tensor_parallel, pipeline_parallel, thd in layouts:
        init_model_parallel(tensor_parallel, pipeline_parallel)
        for hf_dir in hf_dirs:
            for packed in ((True,) if thd else (False, True)):
                with packed_mask_dropped(drop_packed_mask):
                    case = compare_case(hf_dir, backend, packed, tensor_parallel > 1, use_thd=thd)
                results.append({**case, "model": Path(hf_dir).name, "tp": tensor_parallel, "pp": pipeline_parallel,
                                "packed": packed, "thd": thd})
    return results


def packed_vs_unpacked_worker(hf_dir: str, backend: str = "torch") -> dict[str, float]:
    """One process, TP=1: the per-token cross-entropy of each sequence of a packed batch (THD when the backend
    takes it, as the trainer sends it) against the same sequence alone in its own row, and against a packed
    forward that attends across the sequences (the negative control: its error must be far larger)."""
    from transformers import AutoConfig

    from megatron_sft.model.args import ModelArgs
    from megatron_sft.model.attention_backends import packs_as_thd
    from megatron_sft.model.builder import build_gpt_model, build_transformer_config
    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(1, 1)
    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(hf_dir))
    torch.manual_seed(0)
    model = build_gpt_model(args, build_transformer_config(args), attention_backend=backend).eval()
    batch = _batch(args.vocab_size, packed=True, seed=0)
    thd = packs_as_thd(model.attention_backend)

    def token_losses(data: dict[str, torch.Tensor], use_thd: bool) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from megatron_sft.model.attention import attention_inputs

        device = next(model.parameters()).device
        flat, mask, packed = attention_inputs({k: v.to(device) for k, v in data.items()}, use_thd)
        with torch.no_grad():
            logits = model(flat["tokens"], flat["position_ids"], mask, packed_seq_params=packed)
            return vocab_parallel_cross_entropy(logits.float(), flat["labels"]).reshape(data["tokens"].shape).cpu()

    packed = token_losses(batch, thd)
    leaky = token_losses(dict(batch, sequence_ids=torch.where(batch["sequence_ids"] >= 0, 0, -1)), thd)
    error = leak = 0.0
    for row, ids in enumerate(batch["sequence_ids"]):
        for seq in ids[ids >= 0].unique().tolist():
            where = (ids == seq).nonzero().squeeze(1)
            alone = {k: v[row:row + 1, where] for k, v in batch.items()}
            alone["sequence_ids"] = torch.zeros_like(alone["sequence_ids"])
            alone["position_ids"] = torch.arange(where.numel()).unsqueeze(0)
            single = token_losses(alone, False)[0]
            error = max(error, float((packed[row, where] - single).abs().max()))
            leak = max(leak, float((leaky[row, where] - single).abs().max()))
    return {"error": error, "leak": leak, "thd": float(thd)}
