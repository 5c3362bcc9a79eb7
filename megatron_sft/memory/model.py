"""Per-GPU (or per-process) memory of a megatron-sft training step, term by term.

Why: a layout chosen from weights and optimizer state alone runs out of memory after the job has queued
(activations are the larger half at 16k tokens), and one that over-provisions wastes GPUs. Each term below is
a function with its formula; :func:`estimate` adds them for one pipeline stage and takes the peak over the
phases of a step. Notation (per rank):

    t = s * b tokens of one micro-batch (s = row length, b = micro-batch), h hidden, a heads, g KV heads,
    d head dim (q = a*d, kv = g*d), f FFN size, V padded vocabulary, L_s layers on the stage,
    T = TP, N = 1/T with sequence parallelism else 1, e = activation bytes (2 bf16, 4 fp32),
    w = parameter bytes, P = parameters on the rank, DP = data-parallel ranks.

Static: weights P*w, main grads P*4 (megatron-core DDP keeps fp32 grad buffers), distributed-optimizer state
P*(12 bf16: fp32 master + 2 Adam moments; 8 fp32: the moments, the master is the weight itself) / DP; with
materialised attention megatron-core's global score buffer a*s^2*b*e/T (allocated, but never written on CPU).

Activations of one layer for one micro-batch (what autograd saves, checked tensor by tensor against megatron-
core's local spec on CPU):
    t*e*[N*(norms) + (attention + mlp)/T] + scores/T
  norms     2 * 3h torch RMSNorm (input, normalised, output) | 2 * 2h fused TE/Apex norm (input, output)
  attention none: q, k, v as the kernel keeps them + the output projection's input q
            (materialised: k and v repeated to q each, or with g == a the fused qkv output kept through v;
            flash: q + 2kv); selective: what the checkpoint keeps (materialised: q + kv + the qkv output
            q + 2kv, through the view v; flash: q + 2kv) + q
  mlp       SwiGLU unfused 5f (fc1 output 2f, x_linear + offset f, silu f, fc2 input f) | fused 3f | GeLU 2f
  scores    materialised only: a*s^2*b*(softmax bytes + a cast copy when it differs from e)
  dropout   p > 0 only (the project trains with 0): masks 2h bytes (N) and a*s^2*b*(1 + e)
  full recompute keeps only the layer input: t*h*e*N, and re-materialises one layer during its backward.
With GPT's choices (fused LayerNorm, MHA keeping q, k, v, GeLU with f = 4h, bf16 softmax, dropout) this is
Korthikanti et al. 2022's 34*s*b*h + 5*a*s^2*b bytes per layer (sbh(10 + 24/T) + 5as^2b/T without SP,
34sbh/T + 5as^2b/T with SP): :func:`korthikanti_layer_bytes`, tested equal.

Pipeline: 1F1B keeps min(PP, M) micro-batches in flight on the first stage (one on the last), the
interleaved schedule that times (1 + (PP - 1) / (PP * v)) (Korthikanti et al., sec. 4.2.3).

Output and loss: unfused, one fp32 [t, V/T] buffer from forward to backward (and a [t, V/T] copy in the input
dtype for bf16), and its backward allocates the [V/T, h] weight gradient; with tied embeddings (PP = 1) autograd
holds that gradient until the embedding's arrives at the end of the backward, V*h*w/T through the layers'
backward and the embedding's. Fused (model.fused_output_loss), only a chunk of c = model.loss_chunk_tokens
tokens at a time (fp32 [c, V/T] plus its input-dtype copy for bf16); its weight gradient goes straight into
the DDP buffer: nothing is held for a tied weight, and an untied one gets megatron-core's uninitialised
[V/T, h] stand-in once the chunks are gone (never resident on CPU).

Mixture of experts (E experts of gated FFN width F, top-k, EP = expert-parallel size, expert TP = T): the
router E*h per layer (replicated), (E/EP)*3*h*F/T expert parameters per layer, their optimizer state sharded
over the expert-data-parallel group DP/EP; per micro-batch each MoE layer keeps the router's fp32 logits and
probabilities 2*t*E*4/N, the dispatched tokens and the experts' output 2*t*k*h*e, and the SwiGLU terms of
t*k tokens of width F (/T): :func:`moe_activation_bytes` (balanced routing; an imbalance adds to it).

Peak = static + max(output backward, layer backward, embedding backward, optimizer step), each with what is
held at that moment (:func:`_stage_estimate`; ``Estimate.phases``). Checked against measurement on CPU
(benchmarks/memory_bench.py, README); the MoE terms only against hand-computed cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

GIB = 2**30
Recompute = Literal["none", "selective", "full"]
Attention = Literal["materialized", "flash"]


class MemoryModelError(ValueError):
    """A layout the model cannot describe (the message names the setting)."""


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the memory depends on."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int  # padded vocabulary (multiple of 128)
    tied_embeddings: bool
    head_dim: Optional[int] = None
    qkv_bias: bool = True
    gated: bool = True  # SwiGLU (fc1 is 2f wide) vs GeLU
    # mixture of experts (0: dense): experts per layer, experts per token, each expert's (gated) FFN width; every
    # layer's MLP is then the MoE layer (ffn unused)
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q(self) -> int:
        return self.heads * self.d

    @property
    def kv(self) -> int:
        return self.kv_heads * self.d

    @classmethod
    def from_spec(cls, spec) -> "ModelShape":
        """From a recipes ModelSpec (the HF config numbers); the vocabulary padded as the converter pads it."""
        vocab = -(-spec.vocab // 128) * 128
        return cls(spec.layers, spec.hidden, spec.ffn_hidden, spec.heads, spec.kv_heads, vocab, spec.tied_embeddings,
                   head_dim=getattr(spec, "head_dim", 0) or spec.hidden // spec.heads, qkv_bias=spec.family == "qwen2",
                   num_experts=spec.num_experts, moe_topk=spec.moe_topk, moe_ffn=spec.moe_ffn)

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        """From a checkpoint's ModelArgs (model_args.json)."""
        return cls(args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                   args.num_query_groups, args.padded_vocab_size or args.vocab_size, args.tie_word_embeddings,
                   head_dim=args.kv_channels, qkv_bias=args.qkv_bias,
                   num_experts=args.num_moe_experts, moe_topk=args.moe_router_topk, moe_ffn=args.moe_ffn_hidden_size)


@dataclass(frozen=True)
class Layout:
    """How the step runs on one rank. Defaults: the GPU path (bf16, Transformer Engine: flash attention, fused norms)."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    expert: int = 1  # expert-parallel size (MoE): each rank holds num_experts / expert experts
    virtual: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    seq: int = 2048  # tokens per row (packed rows are data.max_length long)
    micro_batch: int = 1
    num_microbatches: int = 1  # per step on this rank: global batch / (micro_batch * DP)
    recompute: Recompute = "none"
    attention: Attention = "flash"
    precision: Literal["bf16", "fp32"] = "bf16"
    fused_norm: bool = True  # TE/Apex norms keep input + output; torch's RMSNorm also keeps the normalised input
    fused_swiglu: bool = False  # megatron's bias_activation_fusion (off in megatron-sft)
    softmax_fp32: bool = True  # materialised attention: softmax in fp32 (megatron's attention_softmax_in_fp32)
    dropout: float = 0.0  # hidden and attention dropout (0 in megatron-sft)
    distributed_optimizer: bool = True
    fused_adam: bool = True  # TE/Apex FusedAdam: no step temporaries; torch's single-tensor Adam on CPU has them
    fused_output_loss: bool = True
    loss_chunk_tokens: int = 512
    with_optimizer: bool = True  # False: forward/backward only (no optimizer state, no step)
    # measured as resident pages (CPU RSS) rather than allocated bytes (CUDA allocator): an allocation that is
    # never written (megatron's attention-score buffer on CPU, see static_terms) then costs nothing
    resident_only: bool = False

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch

    @property
    def e(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def sp_divisor(self) -> int:
        return self.tensor if self.sequence_parallel and self.tensor > 1 else 1

    def name(self) -> str:
        vp = f"x{self.virtual}" if self.virtual else ""
        sp = "+SP" if self.sequence_parallel and self.tensor > 1 else ""
        ep = f" EP{self.expert}" if self.expert > 1 else ""
        return f"TP{self.tensor}{sp} PP{self.pipeline}{vp} DP{self.data}{ep} mb{self.micro_batch} recompute={self.recompute}"


def cpu_layout(**kwargs) -> Layout:
    """The CPU path: fp32, megatron-core's local spec (materialised scores, torch RMSNorm), torch Adam."""
    defaults = dict(attention="materialized", precision="fp32", fused_norm=False, fused_adam=False, resident_only=True)
    return Layout(**{**defaults, **kwargs})


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    formula: str
    phase: str = "static"  # static | activations | transient (only at its phase's moment)


@dataclass
class Estimate:
    """The terms of one rank (the worst pipeline stage) and the peak."""

    layout: Layout
    stage: str
    terms: list[Term] = field(default_factory=list)
    peak_phase: str = ""
    peak: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # static + each moment's bytes

    def fits(self, budget_bytes: float) -> bool:
        return self.peak <= budget_bytes


# ---------------------------------------------------------------------------------------------- parameters


def expert_parameters(m: ModelShape) -> int:
    """One expert (a gated MLP without bias): 2*F*h (fc1) + F*h (fc2) = 3*h*F, F = moe_ffn; 0 for a dense model."""
    return 3 * m.hidden * m.moe_ffn if m.is_moe else 0


def layer_parameters(m: ModelShape) -> int:
    """One transformer layer: h*(q + 2kv) [+ q + 2kv bias] + q*h + 2h (norms) + the MLP: (2f or f)*h + f*h dense;
    MoE: the router E*h + E experts of 3*h*F."""
    qkv = m.hidden * (m.q + 2 * m.kv) + (m.q + 2 * m.kv if m.qkv_bias else 0)
    if m.is_moe:
        mlp = m.num_experts * m.hidden + m.num_experts * expert_parameters(m)
    else:
        mlp = (3 if m.gated else 2) * m.ffn * m.hidden
    return qkv + m.q * m.hidden + mlp + 2 * m.hidden


def stage_expert_parameters(m: ModelShape, lay: Layout) -> float:
    """Expert parameters on one rank: (L/PP) layers x (E/EP) local experts x 3*h*F / T (megatron's expert tensor
    parallelism defaults to TP)."""
    return m.layers / lay.pipeline * m.num_experts / lay.expert * expert_parameters(m) / lay.tensor


def tied_on_stage(m: ModelShape, stage: str) -> bool:
    """The output layer's weight is this stage's input embedding too (tied embeddings, PP = 1)."""
    return m.tied_embeddings and stage == "only"


def stage_parameters(m: ModelShape, lay: Layout, stage: str) -> float:
    """Parameters on one rank of a stage: (L/PP) layers / T (MoE: the router E*h whole, the experts as
    :func:`stage_expert_parameters`), + V*h/T embedding on the first stage, + V*h/T output layer and h final norm
    on the last (tied embeddings share the first stage's copy only when PP = 1)."""
    if m.is_moe:
        dense = layer_parameters(m) - m.num_experts * (m.hidden + expert_parameters(m))
        params = m.layers / lay.pipeline * (dense / lay.tensor + m.num_experts * m.hidden) + stage_expert_parameters(m, lay)
    else:
        params = m.layers / lay.pipeline * layer_parameters(m) / lay.tensor
    if stage in ("first", "only"):
        params += m.vocab * m.hidden / lay.tensor
    if stage in ("last", "only"):
        params += m.hidden
        if not tied_on_stage(m, stage):
            params += m.vocab * m.hidden / lay.tensor
    return params


def expert_data_parallel(lay: Layout) -> float:
    """megatron-core's expert-data-parallel size: world / (ETP * EP * PP) = DP * T / (EP * ETP) = DP / EP (ETP = T)."""
    return lay.data / lay.expert


def attention_buffer_bytes(m: ModelShape, lay: Layout) -> float:
    """megatron-core's global memory buffer that DotProductAttention (materialised attention) requests for its
    score matmul, a*s^2*b*e/T, allocated at the first forward and kept. torch.baddbmm(buffer, ..., beta=0)
    returns a new tensor and never writes it, so on CPU its pages are never resident (0 with resident_only);
    the CUDA allocator counts it."""
    if lay.attention != "materialized" or lay.resident_only:
        return 0.0
    return m.heads * lay.seq**2 * lay.micro_batch * lay.e / lay.tensor


def static_terms(m: ModelShape, lay: Layout, stage: str) -> list[Term]:
    """Weights P*w, fp32 main grads P*4, optimizer state P*(12 | 8)/DP (8 when the weights are fp32 themselves);
    MoE: the expert parameters Pe's state over the expert-data-parallel group, (P - Pe)*s/DP + Pe*s/EDP; the
    materialised attention's score buffer (:func:`attention_buffer_bytes`)."""
    p = stage_parameters(m, lay, stage)
    w = lay.e
    state = 12 if lay.precision == "bf16" else 8
    terms = [Term("weights", p * w, f"P * {w}"), Term("main grads (fp32)", p * 4, "P * 4")]
    if lay.with_optimizer:
        if not lay.distributed_optimizer:
            terms.append(Term("optimizer state", p * state, f"P * {state}"))
        elif m.is_moe:
            pe = stage_expert_parameters(m, lay)
            terms.append(Term("optimizer state", (p - pe) * state / lay.data + pe * state / expert_data_parallel(lay),
                              f"(P - Pe) * {state} / DP + Pe * {state} / (DP/EP)"))
        else:
            terms.append(Term("optimizer state", p * state / lay.data, f"P * {state} / DP"))
    if attention_buffer_bytes(m, lay):
        terms.append(Term("attention score buffer (megatron)", attention_buffer_bytes(m, lay), "a*s^2*b*e/T"))
    return terms


# ---------------------------------------------------------------------------------------------- activations


def _attention_elements(m: ModelShape, lay: Layout) -> float:
    """Per token, before /T: q, k, v as kept + the output projection's input (see the module doc)."""
    if lay.recompute == "selective":
        kept = m.q + m.kv + (m.q + 2 * m.kv) if lay.attention == "materialized" else m.q + 2 * m.kv
    elif lay.attention == "flash":
        kept = m.q + 2 * m.kv
    elif m.kv_heads < m.heads:
        kept = 3 * m.q  # k and v repeated to the query heads
    else:
        kept = 2 * m.q + (m.q + 2 * m.kv)  # q, k and the fused qkv output, kept alive through the view v
    return kept + m.q


def _mlp_elements(m: ModelShape, lay: Layout, ffn: Optional[int] = None) -> float:
    ffn = m.ffn if ffn is None else ffn
    if not m.gated:
        return 2 * ffn
    return 3 * ffn if lay.fused_swiglu else 5 * ffn


def moe_activation_bytes(m: ModelShape, lay: Layout) -> float:
    """Saved by one MoE layer for one micro-batch (balanced routing: each rank's experts get t*k tokens, k = topk,
    whatever EP; the dispatch gathers the SP shards over the expert TP group):
        router logits + probabilities fp32 2*t*E*4/N + the routing map t*E/N (bool)
        + the dispatched tokens (the experts' fc1 input) t*k*h*e + the experts' output kept for the
          probability-weighted unpermute t*k*h*e
        + the experts' SwiGLU as the dense term for t*k tokens of width F: t*k*(5F | 3F fused)*e/T."""
    if not m.is_moe:
        return 0.0
    t, e, n, k = lay.tokens, lay.e, lay.sp_divisor, m.moe_topk
    router = t * m.num_experts * (2 * 4 + 1) / n
    dispatched = 2 * t * k * m.hidden * e
    return router + dispatched + t * k * _mlp_elements(m, lay, m.moe_ffn) * e / lay.tensor


def _norm_elements(m: ModelShape, lay: Layout) -> float:
    return 2 * (2 if lay.fused_norm else 3) * m.hidden


def attention_scores_bytes(m: ModelShape, lay: Layout) -> float:
    """a*s^2*b*(softmax bytes + cast copy) / T, plus a*s^2*b*(1 + e) / T with attention dropout; 0 for flash
    attention or when the core attention is recomputed."""
    if lay.attention == "flash" or lay.recompute != "none":
        return 0.0
    softmax = 4 if lay.softmax_fp32 else lay.e
    per = softmax + (lay.e if softmax != lay.e else 0) + ((1 + lay.e) if lay.dropout > 0 else 0)
    return m.heads * lay.seq**2 * lay.micro_batch * per / lay.tensor


def layer_activation_bytes(m: ModelShape, lay: Layout, recompute: Optional[Recompute] = None) -> float:
    """Saved by one layer for one micro-batch: t*e*[N*norms + (attention + mlp)/T] + N*t*2h dropout-mask bytes
    + scores (MoE: the mlp term is :func:`moe_activation_bytes`); full recompute: t*h*e*N (the layer input only)."""
    lay = lay if recompute is None else replace(lay, recompute=recompute)
    t, e, n = lay.tokens, lay.e, lay.sp_divisor
    if lay.recompute == "full":
        return t * m.hidden * e / n
    masks = 2 * m.hidden if lay.dropout > 0 else 0
    replicated = (_norm_elements(m, lay) * e + masks) / n
    sharded = (_attention_elements(m, lay) + (0 if m.is_moe else _mlp_elements(m, lay))) * e / lay.tensor
    return t * (replicated + sharded) + attention_scores_bytes(m, lay) + moe_activation_bytes(m, lay)


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, tensor: int = 1, sequence_parallel: bool = False,
                            recompute: Recompute = "none") -> float:
    """Korthikanti et al. 2022, per layer (16-bit, GPT): sbh(10 + 24/T) + 5as^2b/T; with SP 34sbh/T + 5as^2b/T;
    selective drops the 5as^2b/T term; full keeps 2sbh (/T with SP)."""
    if recompute == "full":
        return 2 * s * b * h / (tensor if sequence_parallel else 1)
    linear = 34 * s * b * h / tensor if sequence_parallel else s * b * h * (10 + 24 / tensor)
    return linear + (5 * a * s * s * b / tensor if recompute == "none" else 0)


def layer_backward_workspace(m: ModelShape, lay: Layout) -> float:
    """Temporaries of one layer's backward, the larger of its two halves: MLP (runs first) 4f*t*e + its fc1
    weight gradient 2f*h*w (MoE 4F*t*k*e + 2F*h*e), / T; attention 2*a*s^2*b*e [grads of probs and scores,
    materialised only] + 3*q*t*e, / T, less the layer's MLP activations, which its backward has freed by then
    (measured on CPU: without that the layer phase came out 0.1-0.3 GiB high). With full recompute plus the
    layer's re-materialised activations, with selective the recomputed probabilities."""
    t, e = lay.tokens, lay.e
    scores = 2 * m.heads * lay.seq**2 * lay.micro_batch * e if lay.attention == "materialized" else 0
    if m.is_moe:  # all t*k dispatched tokens at once (grouped GEMM) and one expert's fc1 weight gradient
        mlp = 4 * m.moe_ffn * t * m.moe_topk * e + 2 * m.moe_ffn * m.hidden * e
        mlp_saved = moe_activation_bytes(m, lay)
    else:
        mlp = 4 * m.ffn * t * e + (2 if m.gated else 1) * m.ffn * m.hidden * e
        mlp_saved = t * _mlp_elements(m, lay) * e / lay.tensor
    attention = (scores + 3 * m.q * t * e) / lay.tensor - mlp_saved
    workspace = max(attention, mlp / lay.tensor)
    if lay.recompute == "selective":  # the recomputed core attention's probabilities
        workspace += attention_scores_bytes(m, replace(lay, recompute="none"))
    if lay.recompute == "full":
        workspace += layer_activation_bytes(m, lay, recompute="none")
    return workspace


# ---------------------------------------------------------------------------------------------- stage extras


def inputs_bytes(m: ModelShape, lay: Layout) -> float:
    """Per micro-batch: token ids, labels, positions, loss mask, sequence ids (5 * 8 bytes per token) and, for
    materialised attention, the packed block-diagonal [b, 1, s, s] bool mask (b*s^2 bytes)."""
    mask = lay.micro_batch * lay.seq**2 if lay.attention == "materialized" else 0
    return 5 * 8 * lay.tokens + mask


def output_saved_bytes(m: ModelShape, lay: Layout) -> float:
    """Kept from forward to backward on the last stage, per micro-batch: the final norm (t*h*e*N, plus the
    normalised input for torch's norm), the output layer's input (t*h*e: gathered over SP by the fused loss, /T
    otherwise), and the loss: fused ~24 bytes per token; unfused the fp32 [t, V/T] buffer t*V/T*4."""
    t, e, n = lay.tokens, lay.e, lay.sp_divisor
    final_norm = (1 if lay.fused_norm else 2) * t * m.hidden * e / n
    if lay.fused_output_loss:
        return final_norm + t * m.hidden * e + 24 * t
    return final_norm + t * m.hidden * e / n + t * m.vocab / lay.tensor * 4


def output_backward_workspace(m: ModelShape, lay: Layout, stage: str = "only") -> float:
    """Temporaries of the output layer + loss backward, the first thing the backward runs. Fused: grad_hidden
    t*h*e + the larger of one chunk, its logits c*V/T*e and their fp32 copy (bf16 only): c*V/T*(4 fp32 |
    2 + 4 bf16) (fused_output_loss's backward frees each chunk before the next is computed; the weight gradient
    goes into the DDP buffer), and for an untied weight the [V/T, h] w-byte stand-in handed to autograd after
    the chunks (0 with resident_only: never written). Unfused: the [V/T, h] weight gradient in w bytes +
    grad_hidden + for bf16 the gradient's [t, V/T] 2-byte copy."""
    t, e, v = lay.tokens, lay.e, m.vocab / lay.tensor
    if lay.fused_output_loss:
        c = min(lay.loss_chunk_tokens, t)
        chunk = c * v * (e + (4 if e != 4 else 0))
        stand_in = 0.0 if tied_on_stage(m, stage) or lay.resident_only else v * m.hidden * e
        return t * m.hidden * e + max(chunk, stand_in)
    return v * m.hidden * e + t * m.hidden * e + (t * v * 2 if e == 2 else 0)


def tied_output_gradient_bytes(m: ModelShape, lay: Layout, stage: str) -> float:
    """Tied embeddings on one stage (PP = 1): the output layer's weight gradient V*h*w/T, returned by the loss's
    backward, waits in autograd's input buffer of the shared weight until the embedding's gradient arrives at
    the end of the backward (the two are summed before the weight's grad hook hands them to the DDP buffer):
    it is held through every layer's backward and the embedding's. Untied, PP > 1, or the fused output loss
    (its gradient goes into the DDP buffer, autograd gets none): 0."""
    if not tied_on_stage(m, stage) or lay.fused_output_loss:
        return 0.0
    return m.vocab * m.hidden * lay.e / lay.tensor


def in_flight_microbatches(lay: Layout, stage: str) -> float:
    """Micro-batches whose activations a stage holds at once: 1 without pipelining and on the last stage;
    min(PP, M) on the first stage of 1F1B; times (1 + (PP - 1) / (PP * v)) with v interleaved chunks."""
    if lay.pipeline == 1 or stage == "last":
        return 1.0
    flight = min(lay.pipeline, lay.num_microbatches)
    if lay.virtual and lay.virtual > 1:
        flight *= 1 + (lay.pipeline - 1) / (lay.pipeline * lay.virtual)
    return flight


def optimizer_step_bytes(m: ModelShape, lay: Layout, stage: str) -> float:
    """Temporaries of the optimizer step: 0 with a fused Adam; torch's single-tensor Adam makes
    sqrt(v) and sqrt(v)/c of the largest parameter shard: 2 * 4 * max(V*h/T [embedding/output], 2f*h/T) / DP
    (MoE: an expert's fc1 2F*h/T over DP/EP instead of the dense fc1)."""
    if lay.fused_adam:
        return 0.0
    dp = lay.data if lay.distributed_optimizer else 1
    edp = expert_data_parallel(lay) if lay.distributed_optimizer else 1
    mlp = 2 * m.moe_ffn * m.hidden / edp if m.is_moe else (2 if m.gated else 1) * m.ffn * m.hidden / dp
    return 2 * 4 * max(mlp, m.vocab * m.hidden / dp) / lay.tensor


def _stages(lay: Layout) -> list[str]:
    return ["only"] if lay.pipeline == 1 else ["first", "last"]


def activation_terms(m: ModelShape, lay: Layout, stage: str) -> list[Term]:
    """What one stage keeps for backward: its layers and extras per micro-batch, times the micro-batches in flight."""
    flight = in_flight_microbatches(lay, stage)
    layers = m.layers / lay.pipeline
    per_layer = layer_activation_bytes(m, lay)
    scores = attention_scores_bytes(m, lay)
    f = f" x {flight:g} in flight" if flight != 1 else ""
    terms = [Term(f"layer activations ({lay.recompute})", flight * layers * (per_layer - scores),
                  f"{layers:g} layers x {_gib(per_layer - scores)} GiB{f}", "activations")]
    if scores:
        terms.append(Term("attention scores", flight * layers * scores, f"{layers:g} x a*s^2*b*bytes/T{f}", "activations"))
    terms.append(Term("inputs + attention mask", flight * inputs_bytes(m, lay), "40 bytes/token + b*s^2 mask", "activations"))
    if stage in ("last", "only"):
        kind = "fused, chunked" if lay.fused_output_loss else "fp32 [t, V/T] buffer"
        terms.append(Term(f"final norm + output/loss ({kind})", output_saved_bytes(m, lay), "see output_saved_bytes", "activations"))
    else:
        terms.append(Term("stage outputs kept for backward", flight * lay.tokens * m.hidden * lay.e / lay.sp_divisor,
                          "in flight x t*h*e*N", "activations"))
    return terms


def transient_terms(m: ModelShape, lay: Layout, stage: str) -> list[Term]:
    """Temporaries that exist only at some moments of the step, named by ``phase`` ('+' joins several); the peak
    takes the largest moment."""
    terms = [Term("layer backward workspace", layer_backward_workspace(m, lay), "see layer_backward_workspace",
                  "layers")]
    if stage in ("last", "only"):
        terms.append(Term("output layer + loss backward", output_backward_workspace(m, lay, stage),
                          "see output_backward_workspace", "output"))
    if tied_output_gradient_bytes(m, lay, stage):
        terms.append(Term("tied output-layer gradient (held)", tied_output_gradient_bytes(m, lay, stage), "V*h*w/T",
                          "layers+embedding"))
    if stage in ("first", "only"):
        terms.append(Term("embedding gradient", m.vocab * m.hidden * lay.e / lay.tensor, "V*h*w/T", "embedding"))
    if lay.with_optimizer and not lay.fused_adam:
        terms.append(Term("optimizer step temporaries", optimizer_step_bytes(m, lay, stage), "2*4*largest shard/DP", "step"))
    return terms


def _stage_estimate(m: ModelShape, lay: Layout, stage: str) -> Estimate:
    static = static_terms(m, lay, stage)
    acts = activation_terms(m, lay, stage)
    moments = transient_terms(m, lay, stage)
    held = sum(t.bytes for t in acts)
    flight = in_flight_microbatches(lay, stage)

    def at(phase: str) -> float:
        return sum(t.bytes for t in moments if phase in t.phase.split("+"))

    phases = {
        "output backward": held + at("output"),  # the backward's first op: every activation still held
        "layer backward": held + at("layers"),
        # the embedding's backward comes last: this micro-batch's activations are gone, the others in flight stay
        "embedding": held * (flight - 1) / flight + at("embedding"),
        "step": at("step"),
    }
    phase = max(phases, key=phases.get)
    fixed = sum(t.bytes for t in static)
    return Estimate(lay, stage, static + acts + moments, phase, fixed + phases[phase],
                    {name: fixed + value for name, value in phases.items()})


def estimate(m: ModelShape, lay: Layout) -> Estimate:
    """The peak of the worst pipeline stage of ``lay`` (see the module doc), with its terms."""
    check_layout(m, lay)
    return max((_stage_estimate(m, lay, stage) for stage in _stages(lay)), key=lambda est: est.peak)


def check_layout(m: ModelShape, lay: Layout) -> None:
    """One-line errors for layouts megatron-core would refuse."""
    for what, count in (("attention heads", m.heads), ("KV heads", m.kv_heads)):
        if count % lay.tensor:
            raise MemoryModelError(f"parallel.tensor={lay.tensor} does not divide the {count} {what}")
    chunks = lay.pipeline * (lay.virtual or 1)
    if m.layers % chunks:
        raise MemoryModelError(f"parallel.pipeline={lay.pipeline} x virtual {lay.virtual or 1} does not divide {m.layers} layers")
    if lay.recompute not in ("none", "selective", "full"):
        raise MemoryModelError(f"model.recompute={lay.recompute!r}: expected none, selective or full")
    if lay.expert > 1 and not m.is_moe:
        raise MemoryModelError(f"parallel.expert={lay.expert} needs a mixture-of-experts model")
    if m.is_moe and (m.num_experts % lay.expert or lay.data % lay.expert):
        raise MemoryModelError(f"parallel.expert={lay.expert} must divide the {m.num_experts} experts and the "
                               f"{lay.data} data-parallel ranks")


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def format_estimate(est: Estimate) -> str:
    """The terms as a text table (GiB), with the peak and the phase it happens in."""
    rows = [f"{'term':44s} {'GiB':>8s}  when        formula"]
    for term in est.terms:
        rows.append(f"{term.name:44s} {_gib(term.bytes):>8s}  {term.phase:11s} {term.formula}")
    rows.append(f"{'peak (' + est.stage + ' stage, at ' + est.peak_phase + ')':44s} {_gib(est.peak):>8s}")
    return "\n".join(rows)
