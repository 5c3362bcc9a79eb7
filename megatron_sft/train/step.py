"""One optimizer step: forward/backward over the micro-batches with megatron-core's pipeline schedules.

``get_forward_backward_func`` picks no-pipelining, 1F1B or interleaved 1F1B from the parallel state. The
loss is our vocab-parallel f(p) loss; it hands megatron-core a (numerator, denominator) pair per
micro-batch. With ``objective.normalization=global`` megatron-core sums both over micro-batches and DP
ranks and divides the gradients once (``calculate_per_token_loss``), so the step's loss is the token mean
of the whole global batch, independent of how it is split over micro-batches and ranks. ``micro_batch``
averages per-micro-batch means (megatron-core divides each by its token count and by the micro-batch count);
``micro_batch_sum`` backpropagates each micro-batch's mean undivided, so a rank's gradient is their sum, as
the reference trainer's loop does (its logged loss is their mean).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft.fused_output_loss import fused_output_objective_loss, fused_output_weight
from megatron_sft.loss import LossOutput, reduce_loss, token_p_stats, vocab_parallel_objective_loss
from megatron_sft.model.attention_backends import packs_as_thd
from megatron_sft.objectives import Objective, gather_valid
from megatron_sft.parallel import current_device
from megatron_sft.model.attention import attention_inputs
from megatron_sft.config import ObjectiveConfig
from megatron_sft.train.grad_dump import dump_path, dump_step_gradients
from megatron_sft.train.model_setup import TrainingModel, grads_finite, zero_grads

# per-micro-batch statistics summed over the step: loss numerator, denominator, per-micro-batch mean
# (for micro_batch normalization), sum of p and count over response tokens, selected tokens, micro-batches
# the reference trainer's guard in sum(loss * mask) / (sum(mask) + 1e-8)
REFERENCE_DENOMINATOR_GUARD = 1e-8
_STATS = ("numerator", "denominator", "micro_mean", "sum_p", "valid", "selected", "micro_batches")


class NonFiniteError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    mean_p: float
    selected_fraction: float
    grad_norm: Optional[float]
    lr: float
    skipped: bool
    seconds: float
    tokens: int  # non-padding tokens in the global batch
    stats: dict = field(default_factory=dict)
    objective: str = ""  # the objective this step trained with (adaptive ones resolve per step)
    adaptive_parameter: Optional[float] = None  # its alpha / mixture weight, for adaptive objectives
    moe_aux_loss: Optional[float] = None  # the router's load-balancing loss (unweighted), mixture of experts only


def _clear_moe_aux_loss() -> None:
    """Forget what megatron-core's aux-loss tracker holds (e.g. from a forward-only pass of this step)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def _moe_aux_loss(num_layers: int, micro_batches: int) -> Optional[float]:
    """Collective. The step's load-balancing loss as Megatron-LM logs it (``load_balancing_loss``, before its
    coefficient): per layer summed over the micro-batches by megatron-core's tracker, reduced over PP, TP and
    DP, averaged over layers and micro-batches; None when the model computed none (dense, or coefficient 0)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker, reduce_aux_losses_tracker_across_ranks)

    name = "load_balancing_loss"
    if name not in get_moe_layer_wise_logging_tracker():
        return None
    reduce_aux_losses_tracker_across_ranks([name])
    value = float(get_moe_layer_wise_logging_tracker()[name]["values"].sum()) / (num_layers * micro_batches)
    clear_aux_losses_tracker()
    return value


class StepRunner:
    """Runs training (and forward-only evaluation) steps of one model with one objective."""

    def __init__(self, model: TrainingModel, objective: Objective, objective_cfg: ObjectiveConfig):
        self._micro_batches = 1  # of the step being run (micro_batch_sum scales each micro-batch's mean by it)
        self.model = model
        self.objective = objective
        self.cfg = objective_cfg
        self.vocab_size = model.args.vocab_size
        # packed rows as THD cu_seqlens for variable-length kernels, else a block-diagonal mask
        self.use_thd = packs_as_thd(getattr(model.modules[0], "attention_backend", "local"))
        # adaptive objectives: exponential moving average of the global batches' mean token p, updated after
        # every step; measured on the first step's batch when unset (saved in checkpoints for resume)
        self.running_mean_p: Optional[float] = None
        self._dump_gradients_to = dump_path()  # debug: MEGATRON_SFT_DUMP_GRADS (first step's gradients)

    def current_objective(self) -> Objective:
        """The objective as it stands now (an adaptive one resolved at the running mean p)."""
        if not self.objective.is_adaptive:
            return self.objective
        return self.objective.at(self.running_mean_p if self.running_mean_p is not None else 0.0)

    # ---- the forward step handed to megatron-core's schedules ------------------------------------
    def _forward_step(self, objective: Objective, sink: list, collect_p: bool = False):
        device = current_device()
        cfg = self.cfg

        def forward_step(data_iterator, chunk):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
            batch, attention_mask, packed = attention_inputs(batch, self.use_thd)
            # a mixture of experts' load-balancing loss counts real tokens only (padding differs across layouts)
            padding = {"padding_mask": batch["sequence_ids"] < 0} if self.model.args.is_moe else {}
            output = chunk(batch["tokens"], batch["position_ids"], attention_mask, packed_seq_params=packed, **padding)

            def loss_func(logits: torch.Tensor):  # the hidden states [b, s, h] with the fused output loss
                out = self._objective_loss(chunk, logits, batch, objective)
                if collect_p:
                    sink.append(out.p[out.valid].detach())
                    return logits.sum() * 0.0, torch.tensor(0, dtype=torch.int, device=device), {}
                # GPTModel returns logits as [b, s, V]: rows are dimension 0
                numerator, denominator = reduce_loss(out, cfg.reduction, cfg.denominator, batch["sequence_ids"], batch_dim=0)
                sum_p, valid = token_p_stats(out)
                sink.append(torch.stack([
                    numerator.detach(), denominator, numerator.detach() / denominator.clamp_min(1), sum_p, valid,
                    out.selected.sum().to(sum_p.dtype), torch.ones((), device=device),
                ]).double())
                if cfg.normalization == "micro_batch_sum":  # megatron-core divides by 1 and by the micro-batch count
                    mean = numerator / (denominator + REFERENCE_DENOMINATOR_GUARD)
                    return mean * self._micro_batches, torch.ones((), dtype=torch.int, device=device), {}
                return numerator, denominator.round().to(torch.int), {}

            return output, loss_func

        return forward_step

    def _objective_loss(self, chunk, output: torch.Tensor, batch: dict, objective: Objective) -> LossOutput:
        """Per-token f(p) from the last stage's output: logits, or hidden states when the output layer is fused
        with the loss (``model.fused_output_loss``)."""
        if self.model.loss_chunk_tokens:
            weight, tied_here = fused_output_weight(chunk)
            return fused_output_objective_loss(
                output, weight, batch["labels"], objective, batch["loss_mask"], vocab_size=self.vocab_size,
                chunk_tokens=self.model.loss_chunk_tokens, weight_gets_other_gradient=tied_here)
        return vocab_parallel_objective_loss(output, batch["labels"], objective, batch["loss_mask"],
                                             vocab_size=self.vocab_size)

    def _run(self, micro_batches: list[dict], forward_step, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._micro_batches = len(micro_batches)

        iterators = [iter(micro_batches) for _ in self.model.chunks]
        rows, length = micro_batches[0]["tokens"].shape
        if self.use_thd:  # attention_inputs flattens each micro-batch to one row
            rows, length = 1, rows * length
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model.chunks,
            num_microbatches=len(micro_batches),
            seq_length=length,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    # ---- percentile objectives: the cutoff over the whole global batch ---------------------------
    def _step_objective(self, micro_batches: list[dict]) -> Objective:
        """Percentiles are taken over the global batch: with several micro-batches, a forward-only pass
        measures every token's p first, and the step trains with the resulting fixed p cutoff."""
        from megatron.core import parallel_state as ps

        if self.objective.is_adaptive:
            if self.running_mean_p is None:
                self.running_mean_p = self._measure_mean_p(micro_batches)
            return self.current_objective()
        if not self.objective.needs_batch_statistics or len(micro_batches) == 1:
            return self.objective
        collected: list[torch.Tensor] = []
        self._run(micro_batches, self._forward_step(self.objective, collected, collect_p=True), forward_only=True)
        cutoff = torch.zeros(1, dtype=torch.float32, device=current_device())
        if ps.is_pipeline_last_stage():
            local = torch.cat(collected) if collected else torch.zeros(0, device=current_device())
            value = self.objective.percentile_cutoff(gather_valid(local, ps.get_data_parallel_group()))
            cutoff[0] = -1.0 if value is None else value
        # the loss runs on the last stage only; other stages do not need the cutoff
        return self.objective.with_fixed_cutoff(float(cutoff[0])) if float(cutoff[0]) >= 0 else self.objective

    def _measure_mean_p(self, micro_batches: list[dict]) -> float:
        """Mean token p over the global batch, forward only (identical on every rank)."""
        from megatron.core import parallel_state as ps

        collected: list[torch.Tensor] = []
        probe = self.objective.at(0.0)  # any resolved objective: only p is collected
        with torch.no_grad():
            self._run(micro_batches, self._forward_step(probe, collected, collect_p=True), forward_only=True)
        totals = torch.zeros(2, dtype=torch.float64, device=current_device())
        if collected and ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            p = torch.cat(collected).double()
            totals[0], totals[1] = p.sum(), p.numel()
        if dist.is_initialized():
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp_min(1.0))

    def _update_running_mean_p(self, step_mean_p: float) -> None:
        if self.objective.is_adaptive and math.isfinite(step_mean_p):
            beta = self.cfg.adaptive_ema
            previous = step_mean_p if self.running_mean_p is None else self.running_mean_p
            self.running_mean_p = beta * previous + (1.0 - beta) * step_mean_p

    # ---- a training step ---------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict], on_nonfinite: str = "halt") -> StepResult:
        model = self.model
        started = time.perf_counter()
        zero_grads(model)
        objective = self._step_objective(micro_batches)
        sink: list[torch.Tensor] = []
        moe = model.args.is_moe
        if moe:
            _clear_moe_aux_loss()
        self._run(micro_batches, self._forward_step(objective, sink), forward_only=False)
        aux_loss = _moe_aux_loss(model.args.num_layers, len(micro_batches)) if moe else None
        stats = self._reduce_stats(sink)
        loss = self._loss_value(stats)
        if self._dump_gradients_to:  # before clipping and the optimizer step
            dump_step_gradients(model, micro_batches, self._dump_gradients_to, loss=loss, objective=objective.spec)
            self._dump_gradients_to = None
        skipped, grad_norm = False, None
        if not (math.isfinite(loss) and grads_finite(model)):
            message = (f"non-finite loss ({loss}) or gradient at this step; lower optim.lr, check the data, or set "
                       "train.on_nonfinite=skip to skip such steps")
            if on_nonfinite == "halt":
                raise NonFiniteError(message)
            skipped = True
            zero_grads(model)
        else:
            success, grad_norm, _ = model.optimizer.step()
            skipped = not success
        lr = float(model.optimizer.param_groups[0]["lr"])  # the rate this step used
        model.scheduler.step(increment=1)
        tokens = int(sum(int((mb["sequence_ids"] >= 0).sum()) for mb in micro_batches))
        tokens = int(self._sum_over_dp(torch.tensor([float(tokens)], device=current_device()))[0])
        mean_p = stats["sum_p"] / max(stats["valid"], 1.0)
        parameter = self.objective.adaptive.parameter(self.running_mean_p) if self.objective.is_adaptive else None
        if not skipped:
            self._update_running_mean_p(mean_p)
        return StepResult(
            loss=loss,
            mean_p=mean_p,
            selected_fraction=stats["selected"] / max(stats["valid"], 1.0),
            grad_norm=None if grad_norm is None else float(grad_norm),
            lr=lr,
            skipped=skipped,
            seconds=time.perf_counter() - started,
            tokens=tokens,
            stats=stats,
            objective=objective.spec,
            adaptive_parameter=parameter,
            moe_aux_loss=aux_loss,
        )

    def evaluate(self, micro_batches: list[dict]) -> dict[str, float]:
        """Loss and mean p on held-out micro-batches (forward only, no gradient)."""
        from megatron_sft.train.model_setup import set_train_mode

        sink: list[torch.Tensor] = []
        set_train_mode(self.model, False)
        with torch.no_grad():
            self._run(micro_batches, self._forward_step(self.current_objective(), sink), forward_only=True)
        set_train_mode(self.model, True)
        stats = self._reduce_stats(sink)
        return {"loss": self._loss_value(stats), "mean_p": stats["sum_p"] / max(stats["valid"], 1.0)}

    # ---- statistics --------------------------------------------------------------------------------
    def _loss_value(self, stats: dict) -> float:
        """The logged loss: the global token mean, or the mean of the micro-batch means (micro_batch, and
        micro_batch_sum, whose gradient is that of their sum on each rank, as the reference trainer logs it)."""
        if self.cfg.normalization == "global":
            return stats["numerator"] / max(stats["denominator"], 1.0)
        return stats["micro_mean"] / max(stats["micro_batches"], 1.0)

    def _sum_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if dist.is_initialized():
            dist.all_reduce(values, group=ps.get_data_parallel_group())
        return values

    def _reduce_stats(self, sink: list[torch.Tensor]) -> dict[str, float]:
        """Step totals, identical on every rank: the last stage's sums, summed over DP, shared with all."""
        from megatron.core import parallel_state as ps

        totals = torch.stack(sink).sum(0) if sink else torch.zeros(len(_STATS), dtype=torch.float64, device=current_device())
        if dist.is_initialized():
            if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
                totals.zero_()
            dist.all_reduce(totals)
        return dict(zip(_STATS, totals.tolist()))
