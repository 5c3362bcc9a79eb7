"""Workers for tests/test_moe.py: a mixture-of-experts checkpoint's logits at several TP x EP x PP layouts in one
process group, and how many tokens a capacity limit dropped (module level so spawned workers can import them)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

Case = tuple[int, int, int, Optional[float]]  # (TP, EP, PP, capacity factor or None)


def moe_logits_worker(ckpt: str, cases: list[Case], input_ids: torch.Tensor) -> Optional[dict]:
    """{case: full logits} from the ranks that hold them (None on the others), plus, under ``"dropped"``, the
    routed (token, expert) pairs the capacity limit dropped per case (0 without one)."""
    from megatron.core import parallel_state as ps

    from megatron_sft.model.checkpoint import load_model
    from megatron_sft.model.forward import forward_logits
    from megatron_sft.parallel import init_model_parallel

    found: dict = {"dropped": {}}
    for case in cases:
        tp, ep, pp, capacity = case
        init_model_parallel(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
        model, args = load_model(ckpt, params_dtype=torch.float32, moe_capacity_factor=capacity)
        counter = _count_dropped(model)
        logits = forward_logits(model, input_ids, vocab_size=args.vocab_size)
        found["dropped"][case] = counter()
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            found[case] = logits.float().cpu()
    return found


def _count_dropped(model) -> Callable[[], int]:
    """Hook every router: counts the (token, expert) pairs its top-k chose but the capacity limit removed."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    dropped = [0]
    for module in model.modules():
        if isinstance(module, TopKRouter):
            def hook(router, inputs, output, _dropped=dropped):
                logits = router.gating(inputs[0]).view(-1, router.config.num_moe_experts)
                _, chosen = moe_utils.topk_routing_with_score_function(
                    logits, router.topk, use_pre_softmax=router.config.moe_router_pre_softmax)
                _dropped[0] += int(chosen.sum() - output[1].sum())
            module.register_forward_hook(hook)
    return lambda: dropped[0]


def merged(results: list[Optional[dict]]) -> dict:
    """The per-rank dicts of :func:`moe_logits_worker` as one: logits from whichever rank held them, drop counts
    summed over all ranks (0: no rank dropped a token)."""
    out: dict = {"dropped": {}}
    for result in results:
        for key, value in (result or {}).items():
            if key == "dropped":
                for layout, count in value.items():
                    out["dropped"][layout] = out["dropped"].get(layout, 0) + count
            else:
                out.setdefault(key, value)
    return out
