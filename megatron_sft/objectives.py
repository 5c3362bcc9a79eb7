"""Probability-based SFT objectives f(p) and their gradient weights.

Every objective is a per-token function f(p) of the target-token probability p, non-increasing in p.
Its gradient with respect to the logits is

    d f(p) / d z = w(p) * (softmax(z) - onehot(y)),   w(p) = -f'(p) * p,

so the weight on the target logit is W_f(p) = w(p) * (1 - p) (the paper's W_f). The vocab-parallel loss
(:mod:`megatron_sft.loss`) only needs ``value(log p)`` and ``weight(log p)`` from an objective, which is
why every objective here is written in terms of log p: it is what the all-reduces deliver and it is
numerically stable where p underflows.

Some objectives also *select* tokens: thresholded ones keep tokens with p above / below q, percentile
ones keep the top / bottom k% of the batch's tokens by p. Selection is a stop-gradient mask.

Spec strings (``parse_objective``) accept readable names and the reference implementation's keys;
``megatron-sft objectives`` prints the table below with each objective's W_f peak.
"""

from __future__ import annotations

import dataclasses

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

Tensor = torch.Tensor
Selection = Literal["none", "above", "below", "top_percent", "bottom_percent"]

# Floor for 1 - p where an objective divides by it or takes its log: log(1 - p) is flat (and its weight 0)
# for p > 1 - 1e-6, which bounds log(1 - p) below by log(1e-6) instead of -inf at p == 1.
ONE_MINUS_P_EPS = 1e-6
_LOG_EPS = math.log(ONE_MINUS_P_EPS)


@dataclass(frozen=True)
class Base:
    """A base function f(p) and its gradient weight w(p) = -f'(p) p.

    Both take (log p, log(1 - p)); the loss computes each without cancellation (1 - p as the sum of the
    other tokens' probabilities), so objectives near p -> 1 such as log(1 - p) stay accurate in fp32.
    """

    key: str
    formula: str
    value: Callable[[Tensor, Tensor], Tensor]
    weight: Callable[[Tensor, Tensor], Tensor]


def _nll() -> Base:
    return Base("nll", "-log p", lambda lp, l1mp: -lp, lambda lp, l1mp: torch.ones_like(lp))


def _neg_p() -> Base:
    return Base("neg_p", "1 - p", lambda lp, l1mp: l1mp.exp(), lambda lp, l1mp: lp.exp())


def _family(alpha: float) -> Base:
    # f = (1 - p^a)/a ; f' = -p^(a-1) ; w = p^a
    return Base(
        f"family:{alpha:g}",
        f"(1 - p^{alpha:g}) / {alpha:g}",
        lambda lp, l1mp: -torch.expm1(alpha * lp) / alpha,
        lambda lp, l1mp: torch.exp(alpha * lp),
    )


def _log1mp() -> Base:
    # f = log(1 - p) ; f' = -1/(1-p) ; w = p / (1 - p), 0 where the floor is active (f is flat there).
    def value(lp: Tensor, l1mp: Tensor) -> Tensor:
        return l1mp.clamp_min(_LOG_EPS)

    def weight(lp: Tensor, l1mp: Tensor) -> Tensor:
        return torch.where(l1mp > _LOG_EPS, torch.exp(lp - l1mp.clamp_min(_LOG_EPS)), torch.zeros_like(lp))

    return Base("log1mp", "log(1 - p)", value, weight)


def _mix(m: float) -> Base:
    # f = (1 - m)(-log p) + m (1 - p): NLL at m = 0, -p at m = 1 ; w = (1 - m) + m p
    return Base(
        f"mix:{m:g}",
        f"{1 - m:g} (-log p) + {m:g} (1 - p)",
        lambda lp, l1mp: -(1 - m) * lp + m * l1mp.exp(),
        lambda lp, l1mp: (1 - m) + m * lp.exp(),
    )


def _dft() -> Base:
    # Dynamic fine-tuning: f = -sg(p) log p ; the gradient treats p as a constant, w = p.
    return Base("dft", "-sg(p) log p", lambda lp, l1mp: -lp.exp() * lp, lambda lp, l1mp: lp.exp())


def _focal(gamma: float) -> Base:
    # f = -(1-p)^g log p ; w = -f'(p) p = (1-p)^g - g (1-p)^(g-1) p log p
    def value(lp: Tensor, l1mp: Tensor) -> Tensor:
        return -torch.exp(gamma * l1mp) * lp

    def weight(lp: Tensor, l1mp: Tensor) -> Tensor:
        if gamma == 0:
            return torch.ones_like(lp)
        l1mp = l1mp.clamp_min(-80.0)  # (1-p)^(g-1) for g < 1 at p == 1: finite, multiplied by p log p = 0
        return torch.exp(gamma * l1mp) - gamma * torch.exp((gamma - 1) * l1mp) * lp.exp() * lp

    return Base(f"focal:{gamma:g}", f"-(1 - p)^{gamma:g} log p", value, weight)


ADAPTIVE_ALPHA_RANGE = (0.01, 10.0)  # family alpha at the NLL end (alpha -> 0 is NLL) and at the -p^10 end


@dataclass(frozen=True)
class AdaptiveSchedule:
    """The paper's capability rule as a schedule: the objective follows the running mean token p, m.

    s(m) = clip((m - low) / (high - low), 0, 1) places m between the model-weak end (m <= low: NLL-like)
    and the model-strong end (m >= high: prior-leaning). ``alpha`` resolves to the family f_alpha with
    alpha = 0.01^(1-s) * 10^s (log-linear from ~NLL to p^10); ``mix`` resolves to the per-token mixture
    (1 - s)(-log p) + s (1 - p). The defaults 0.2 / 0.8 bracket the paper's medical (~0.5) between its
    figfont (~0.01) and math (~0.8) measurements.
    """

    kind: Literal["alpha", "mix"]
    low: float = 0.2
    high: float = 0.8

    def position(self, mean_p: float) -> float:
        return min(max((mean_p - self.low) / (self.high - self.low), 0.0), 1.0)

    def parameter(self, mean_p: float) -> float:
        """alpha of the family, or the mixture weight of -p, at running mean p ``mean_p``."""
        s = self.position(mean_p)
        if self.kind == "mix":
            return s
        a_min, a_max = ADAPTIVE_ALPHA_RANGE
        return math.exp((1 - s) * math.log(a_min) + s * math.log(a_max))

    def resolve(self, mean_p: float) -> "Objective":
        value = self.parameter(mean_p)
        base = _family(value) if self.kind == "alpha" else _mix(value)
        return Objective(base.key, base)

    @property
    def formula(self) -> str:
        s = f"s = clip((m - {self.low:g}) / ({self.high - self.low:g}), 0, 1), m = running mean p"
        if self.kind == "alpha":
            return f"(1 - p^a)/a, a = 0.01^(1-s) 10^s, {s}"
        return f"(1 - s)(-log p) + s (1 - p), {s}"


@dataclass(frozen=True)
class Objective:
    """A base f(p) and an optional token selection (stop-gradient); or an adaptive schedule that the
    trainer resolves to a concrete objective every step (:meth:`at`)."""

    spec: str
    base: Base
    selection: Selection = "none"
    threshold: float = 0.0  # q for above/below, k (percent) for top/bottom_percent
    description: str = field(default="", compare=False)
    adaptive: Optional[AdaptiveSchedule] = None

    @property
    def is_adaptive(self) -> bool:
        return self.adaptive is not None

    def at(self, mean_p: float) -> "Objective":
        """The concrete objective of an adaptive one at running mean p ``mean_p`` (itself otherwise)."""
        return self.adaptive.resolve(mean_p) if self.adaptive is not None else self

    @property
    def name(self) -> str:
        return self.base.key if self.selection == "none" else f"{self.base.key}[{self.selection}={self.threshold:g}]"

    @property
    def formula(self) -> str:
        if self.adaptive is not None:
            return self.adaptive.formula
        f = self.base.formula
        return {
            "none": f,
            "above": f"({f}) * 1[p >= {self.threshold:g}]",
            "below": f"({f}) * 1[p <= {self.threshold:g}]",
            "top_percent": f"({f}) on the top {self.threshold:g}% of tokens by p",
            "bottom_percent": f"({f}) on the bottom {self.threshold:g}% of tokens by p",
        }[self.selection]

    @property
    def needs_batch_statistics(self) -> bool:
        """Percentile selections depend on the p of every token in the batch (an all-gather)."""
        return self.selection in ("top_percent", "bottom_percent")

    def value(self, logp: Tensor, log1mp: Tensor) -> Tensor:
        """f(p) from log p and log(1 - p)."""
        self._check_resolved()
        return self.base.value(logp, log1mp)

    def weight(self, logp: Tensor, log1mp: Tensor) -> Tensor:
        """w(p) = -f'(p) p: the factor on (softmax - onehot) in the logit gradient."""
        self._check_resolved()
        return self.base.weight(logp, log1mp)

    def _check_resolved(self) -> None:
        if self.adaptive is not None:
            raise RuntimeError(f"{self.spec} is adaptive: resolve it with .at(mean_p) before computing a loss")

    def select(self, p: Tensor, valid: Tensor, group: Optional[torch.distributed.ProcessGroup] = None) -> Tensor:
        """Boolean mask of the valid tokens this objective trains on.

        ``group``: process group whose ranks hold the other parts of the batch (data parallel); the
        percentile is taken over the valid tokens of all of them.
        """
        if self.selection == "none":
            return valid
        if self.selection == "above":
            return valid & (p >= self.threshold)
        if self.selection == "below":
            return valid & (p <= self.threshold)
        cutoff = self.percentile_cutoff(gather_valid(p[valid], group))
        if cutoff is None:
            return valid
        return valid & (p >= cutoff) if self.selection == "top_percent" else valid & (p <= cutoff)

    def percentile_cutoff(self, all_p: Tensor) -> Optional[Tensor]:
        """The p of the last token kept by a top/bottom k% selection over ``all_p`` (None if empty)."""
        n = all_p.numel()
        if n == 0:
            return None
        keep_count = min(max(1, math.ceil(self.threshold / 100.0 * n)), n)
        largest = self.selection == "top_percent"
        return torch.topk(all_p, keep_count, largest=largest, sorted=True).values[-1]

    def with_fixed_cutoff(self, cutoff: float) -> "Objective":
        """A percentile objective frozen to a p threshold measured beforehand (over a whole global batch)."""
        if not self.needs_batch_statistics:
            return self
        selection = "above" if self.selection == "top_percent" else "below"
        return dataclasses.replace(self, selection=selection, threshold=cutoff)

    # --- analysis -------------------------------------------------------------------------------
    def gradient_weight_curve(self, p: Tensor) -> Tensor:
        """W_f(p) = w(p) (1 - p) on a grid of p, with thresholds applied (percentiles: unselected)."""
        w = self.weight(torch.log(p), torch.log1p(-p)) * (1 - p)
        if self.selection == "above":
            w = torch.where(p >= self.threshold, w, torch.zeros_like(w))
        elif self.selection == "below":
            w = torch.where(p <= self.threshold, w, torch.zeros_like(w))
        return w

    def weight_peak(self) -> float:
        """Where W_f(p) peaks on (0, 1): the paper's prior-leaning / prior-averse diagnostic."""
        grid = torch.linspace(1e-4, 1 - 1e-4, 9999, dtype=torch.float64)
        return float(grid[torch.argmax(self.gradient_weight_curve(grid))])

    def weight_centroid(self) -> float:
        """Mean p under W_f: where on (0, 1) the objective puts its gradient mass."""
        grid = torch.linspace(1e-4, 1 - 1e-4, 9999, dtype=torch.float64)
        w = self.gradient_weight_curve(grid)
        return float((grid * w).sum() / w.sum())

    @property
    def prior(self) -> str:
        """'prior-leaning' when W_f's mass sits at p >= 0.5 (centroid), else 'prior-averse'.

        The centroid rather than the peak decides because thresholds move the peak onto the threshold
        itself: -log p * 1[p >= 0.3] peaks at 0.3 but trains only on likely tokens. For the family
        (1 - p^a)/a the centroid is (a+1)/(a+3), so a >= 1 is leaning and a < 1 averse (a -> 0 is NLL).
        Percentile selections keep high-p (top) or low-p (bottom) tokens, which decides their lean.
        """
        if self.adaptive is not None:
            return "adaptive"
        if self.selection == "top_percent":
            return "prior-leaning"
        if self.selection == "bottom_percent":
            return "prior-averse"
        return "prior-leaning" if self.weight_centroid() >= 0.5 - 1e-6 else "prior-averse"


def gather_valid(values: Tensor, group: Optional[torch.distributed.ProcessGroup]) -> Tensor:
    """All-gather a 1-D tensor of per-rank varying length over ``group`` (identity without one)."""
    if group is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return values
    world = torch.distributed.get_world_size(group)
    count = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count, group=group)
    max_count = int(max(c.item() for c in counts))
    padded = torch.zeros(max_count, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)])


# ------------------------------------------------------------------------------------------------
# The table of objective forms: parsing, the valid-forms text, aliases, reference keys and the
# examples of `megatron-sft objectives` and the tests are all generated from OBJECTIVE_FORMS.
# ------------------------------------------------------------------------------------------------

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


@dataclass(frozen=True)
class Argument:
    """One numeric argument of a form: its name, the rule it must satisfy (shown in errors) and its default
    (None: required)."""

    name: str
    rule: str
    check: Callable[[float], bool]
    default: Optional[float] = None
    label: str = ""  # how errors name it, when more than its name helps


@dataclass(frozen=True)
class ObjectiveForm:
    """One row of the objective table. ``build(spec, *arguments)`` returns the Objective; ``aliases`` are
    whole-spec synonyms, ``reference_key`` the reference implementation's ``Key-<x>`` name of this form."""

    name: str
    arguments: tuple[Argument, ...]
    build: Callable[..., "Objective"]
    doc: str
    examples: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    reference_key: Optional[str] = None
    joint_check: Optional[Callable[..., Optional[str]]] = None  # an error text when the arguments disagree

    @property
    def usage(self) -> str:
        if not self.arguments:
            return self.name
        text = ":".join(f"<{a.name}>" for a in self.arguments)
        return f"{self.name}[:{text}]" if all(a.default is not None for a in self.arguments) else f"{self.name}:{text}"

    @property
    def adaptive(self) -> bool:
        return self.name.startswith("adaptive_")


def _plain(base: Callable[[], Base]) -> Callable[..., "Objective"]:
    return lambda spec: Objective(spec, base())


def _with_number(base: Callable[[float], Base]) -> Callable[..., "Objective"]:
    return lambda spec, x: Objective(spec, base(x))


def _selected(base: Callable[[], Base], selection: Selection) -> Callable[..., "Objective"]:
    return lambda spec, x: Objective(spec, base(), selection, x)


def _adaptive(kind: str) -> Callable[..., "Objective"]:
    def build(spec: str, low: float, high: float) -> "Objective":
        schedule = AdaptiveSchedule(kind, low, high)
        return Objective(spec, schedule.resolve(low).base, adaptive=schedule)

    return build


def _ordered(low: float, high: float) -> Optional[str]:
    return None if low < high else f"need 0 <= low < high <= 1, got low={low:g}, high={high:g}"


_PROBABILITY = ("in [0, 1]", lambda x: 0.0 <= x <= 1.0)
_BASES: dict[str, tuple[Callable[[], Base], str]] = {
    "nll": (_nll, "-log p"), "neg_p": (_neg_p, "1 - p"), "log1mp": (_log1mp, "log(1 - p)")}
_SELECTION_KEYS = {  # (base, kind) -> the reference trainer's key
    ("neg_p", "above"): "OnlyTopP", ("neg_p", "below"): "OnlyBottomP", ("nll", "above"): "OnlyTopLogP",
    ("nll", "below"): "OnlyBottomLogP", ("log1mp", "above"): "UnlikehoodTop", ("log1mp", "below"): "UnlikehoodBottom",
}
_SELECTION_EXAMPLES = {("nll", "above"): "0.3", ("nll", "below"): "0.7", ("log1mp", "above"): "0.2",
                       ("log1mp", "below"): "0.8", ("neg_p", "top"): "30", ("neg_p", "bottom"): "30",
                       ("nll", "top"): "50", ("nll", "bottom"): "20", ("log1mp", "top"): "40", ("log1mp", "bottom"): "40"}


def _selection_forms() -> list[ObjectiveForm]:
    """``<base>_above:<q>``, ``_below:<q>`` (thresholds) and ``_top:<k>``, ``_bottom:<k>`` (batch percentiles)."""
    forms = []
    for kind, selection, argument, doc in (
        ("above", "above", Argument("q", *_PROBABILITY, label="threshold q"), "({f}) * 1[p >= q]"),
        ("below", "below", Argument("q", *_PROBABILITY, label="threshold q"), "({f}) * 1[p <= q]"),
        ("top", "top_percent", Argument("k", "in (0, 100]", lambda x: 0.0 < x <= 100.0, label="percentile k"),
         "{f} on the top k% of the global batch's tokens by p"),
        ("bottom", "bottom_percent", Argument("k", "in (0, 100]", lambda x: 0.0 < x <= 100.0, label="percentile k"),
         "{f} on the bottom k% of the global batch's tokens by p"),
    ):
        for base, (builder, formula) in _BASES.items():
            name = f"{base}_{kind}"
            forms.append(ObjectiveForm(name, (argument,), _selected(builder, selection), doc.format(f=formula),
                                       (f"{name}:{_SELECTION_EXAMPLES.get((base, kind), '0.5')}",),
                                       reference_key=_SELECTION_KEYS.get((base, kind))))
    return forms


OBJECTIVE_FORMS: tuple[ObjectiveForm, ...] = (
    ObjectiveForm("nll", (), _plain(_nll), "-log p (standard SFT)", ("nll",), aliases=("original", "logp")),
    ObjectiveForm("neg_p", (), _plain(_neg_p), "1 - p (i.e. -p)", ("neg_p",), aliases=("p", "-p", "one_minus_p")),
    ObjectiveForm("family", (Argument("alpha", "> 0 (alpha -> 0 is nll)", lambda x: x > 0),), _with_number(_family),
                  "(1 - p^alpha)/alpha", ("family:0.5", "family:8"), reference_key="GeneralFamily"),
    ObjectiveForm("log1mp", (), _plain(_log1mp), "log(1 - p)", ("log1mp",)),
    ObjectiveForm("dft", (), _plain(_dft), "-sg(p) log p (dynamic fine-tuning)", ("dft",)),
    ObjectiveForm("focal", (Argument("gamma", ">= 0", lambda x: x >= 0, default=2.0),), _with_number(_focal),
                  "-(1-p)^gamma log p (default gamma 2)", ("focal:2",)),
    *_selection_forms(),
    ObjectiveForm("mix", (Argument("m", *_PROBABILITY, label="the mixture weight m"),), _with_number(_mix),
                  "(1-m)(-log p) + m (1 - p)", ("mix:0.3",)),
    ObjectiveForm("adaptive_alpha", (Argument("low", *_PROBABILITY, default=0.2), Argument("high", *_PROBABILITY, default=0.8)),
                  _adaptive("alpha"), "family alpha scheduled from the running mean p m: ~NLL (alpha 0.01) at "
                  "m <= low, p^10 at m >= high", ("adaptive_alpha",), joint_check=_ordered),
    ObjectiveForm("adaptive_mix", (Argument("low", *_PROBABILITY, default=0.2), Argument("high", *_PROBABILITY, default=0.8)),
                  _adaptive("mix"), "mix weight scheduled the same way: NLL .. -p", ("adaptive_mix",),
                  joint_check=_ordered),
)
_FORMS_BY_NAME = {form.name: form for form in OBJECTIVE_FORMS}
_ALIASES = {alias: form.name for form in OBJECTIVE_FORMS for alias in form.aliases}
_REFERENCE_KEYS = {form.reference_key: form.name for form in OBJECTIVE_FORMS if form.reference_key}


def _valid_forms() -> str:
    lines = ["Valid objective specs (readable form | aliases, reference key):"]
    for form in OBJECTIVE_FORMS:
        others = list(form.aliases) + ([f"{form.reference_key}-" + ("-".join(f"<{a.name}>" for a in form.arguments))]
                                       if form.reference_key else [])
        rules = ", ".join(f"{a.name} {a.rule}" for a in form.arguments)
        lines.append(f"  {form.usage:30} | {', '.join(others):24} {form.doc}{f'; {rules}' if rules else ''}")
    return "\n".join(lines)


VALID_FORMS = _valid_forms()


class ObjectiveSpecError(ValueError):
    """An objective spec string that does not parse; the message lists the valid forms."""


def _fail(spec: str, why: str) -> ObjectiveSpecError:
    return ObjectiveSpecError(f"invalid objective spec {spec!r}: {why}\n{VALID_FORMS}")


def _number(spec: str, text: str) -> float:
    if not re.fullmatch(_NUM, text or ""):
        raise _fail(spec, f"{text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise _fail(spec, f"{text!r} is not finite")
    return value


def _canonical(spec: str) -> str:
    """Map reference keys ``Key-<x>`` and aliases to the readable ``name[:arg]`` form."""
    s = spec.strip()
    if s in _ALIASES:
        return _ALIASES[s]
    if "-" in s and not s.startswith("-"):
        key, arg = s.split("-", 1)
        if key in _REFERENCE_KEYS:
            return f"{_REFERENCE_KEYS[key]}:{arg}"
    return s


def canonical_spec(spec: str) -> str:
    """The registry's own spelling of a spec (reference keys such as ``p`` or ``GeneralFamily-8`` are
    aliases of ``neg_p`` and ``family:8``); raises ObjectiveSpecError like :func:`parse_objective`."""
    parse_objective(spec)
    return _canonical(spec)


def _arguments(spec: str, form: ObjectiveForm, text: Optional[str]) -> list[float]:
    """The form's arguments from the text after its name (None: no ``:``), defaults filled in, rules checked."""
    if text is None:
        if not form.arguments:
            return []
        if any(a.default is None for a in form.arguments):
            raise _fail(spec, f"{form.name!r} needs an argument, e.g. {form.examples[0]}")
        return [a.default for a in form.arguments]
    if not form.arguments:
        raise _fail(spec, f"{form.name!r} takes no argument")
    parts = text.split(":")
    if len(parts) != len(form.arguments):
        names = ":".join(f"<{a.name}>" for a in form.arguments)
        raise _fail(spec, f"{form.name} takes {names}, e.g. {form.name}:{':'.join(f'{a.default:g}' if a.default is not None else '1' for a in form.arguments)}")
    values = [_number(spec, part) for part in parts]
    for argument, value in zip(form.arguments, values):
        if not argument.check(value):
            raise _fail(spec, f"{argument.label or argument.name} must be {argument.rule}, got {value:g}")
    problem = form.joint_check(*values) if form.joint_check else None
    if problem:
        raise _fail(spec, problem)
    return values


def parse_objective(spec: str) -> Objective:
    """Parse an objective spec (see ``VALID_FORMS``); raises ObjectiveSpecError with the valid forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise _fail(str(spec), "empty spec")
    name, colon, arg = _canonical(spec).partition(":")
    form = _FORMS_BY_NAME.get(name)
    if form is None:
        raise _fail(spec, "unknown objective")
    return form.build(spec, *_arguments(spec, form, arg if colon else None))


def example_specs() -> list[str]:
    """One spec of every fixed form (the CLI table and the tests run each)."""
    return [spec for form in OBJECTIVE_FORMS if not form.adaptive for spec in form.examples]


def adaptive_specs() -> list[str]:
    """The adaptive forms (resolved per step by the trainer; not a fixed f(p))."""
    return [spec for form in OBJECTIVE_FORMS if form.adaptive for spec in form.examples]
