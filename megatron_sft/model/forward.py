"""Forward-only passes through a (TP x PP sharded) GPTModel with megatron-core's pipeline schedules."""

from __future__ import annotations

from typing import Optional

import torch


def forward_logits(model, input_ids: torch.Tensor, vocab_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, V] for ``input_ids`` [b, s] on the last pipeline stage, None elsewhere.

    Runs one micro-batch through ``get_forward_backward_func`` (so PP works), then gathers the vocab shards
    over TP. ``vocab_size`` strips the vocabulary padding.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, step_model):
        ids = next(data_iterator)
        output = step_model(ids, position_ids, attention_mask=None)

        def keep_logits(logits):
            collected.append(gather_from_tensor_model_parallel_region(logits).detach())
            return logits.sum() * 0.0, {}

        return output, keep_logits

    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([input_ids]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    model.train(was_training)
    if not ps.is_pipeline_last_stage():
        return None
    logits = collected[0]
    return logits[..., :vocab_size] if vocab_size is not None else logits
