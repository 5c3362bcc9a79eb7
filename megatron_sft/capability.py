"""The one capability rule: a base model's mean token p on the training data -> region and objective.

The paper's diagnostic is the base model's mean probability of the target tokens. Where it is high the model
already knows the data and prior-leaning objectives (-p) win; where it is low NLL wins; in between neither
dominates. ``megatron-sft probe``, ``megatron-sft demo``, the continuum and the recipes (examples/, sbatch)
all ask this module, so the same mean p always gets the same advice.

- model-strong (MS), mean p >= 0.65: -p; the paper's math setting (mean p ~0.8, up to +16 points);
- model-weak (MW), mean p < 0.25: NLL; the paper's figfont puzzles (mean p ~0.01);
- model-intermediate (MI) in between: adaptive_mix (medical, mean p ~0.5, where neither dominates).

Two rules place a mean p, and the probe states both: ``midpoint`` (the default; boundaries midway between
the paper's measured settings 0.01, 0.5 and 0.8: MS from 0.65, MW below 0.25) and ``paper`` (the paper's
own: mean p above 0.5 -> prior-leaning, below 0.1 -> NLL).
"""

from __future__ import annotations

from dataclasses import dataclass

MW_BELOW = 0.25
MS_FROM = 0.65

STRONG, INTERMEDIATE, WEAK = "model-strong", "model-intermediate", "model-weak"
OBJECTIVES = {STRONG: "neg_p", INTERMEDIATE: "adaptive_mix", WEAK: "nll"}
ABBREVIATIONS = {STRONG: "MS", INTERMEDIATE: "MI", WEAK: "MW"}
# what to compare the region's objective with (the paper's contrast there): never the objective itself
ALTERNATIVES = {STRONG: "nll", INTERMEDIATE: "nll", WEAK: "neg_p"}


class CapabilityError(ValueError):
    """A region name or mean p the rule cannot place."""


@dataclass(frozen=True)
class Rule:
    """Where the continuum's regions begin: MW below ``weak_below``, MS from ``strong_from`` (or strictly
    above it when not ``strong_inclusive``)."""

    name: str
    weak_below: float
    strong_from: float
    strong_inclusive: bool
    source: str

    @property
    def text(self) -> str:
        ge = ">=" if self.strong_inclusive else ">"
        return f"{self.name}: MS at mean p {ge} {self.strong_from}, MW below {self.weak_below} ({self.source})"


RULES = {
    "midpoint": Rule("midpoint", MW_BELOW, MS_FROM, True, "ours, midway between the paper's measured settings"),
    "paper": Rule("paper", 0.1, 0.5, False, "the paper's own: above 0.5 prior-leaning, below 0.1 NLL"),
}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise CapabilityError(f"unknown capability rule {name!r}; rules: {', '.join(RULES)}")
    return RULES[name]


@dataclass(frozen=True)
class Advice:
    region: str  # model-strong | model-intermediate | model-weak
    objective: str  # the objective spec the rule recommends there
    reasoning: str

    @property
    def label(self) -> str:
        """``model-strong (MS)``, as the probe prints it."""
        return f"{self.region} ({ABBREVIATIONS[self.region]})"

    def line(self, mean_p: float) -> str:
        """One line for a console: the mean p, its region and the objective."""
        return f"mean p {mean_p:.3f}: {self.label}, recommended objective {self.objective}"


def region_of(mean_p: float, rule: str = "midpoint") -> str:
    """The continuum region of a mean token p (midpoint rule: ``MS_FROM`` belongs to MS, ``MW_BELOW`` to MI)."""
    r = get_rule(rule)
    if not 0.0 <= mean_p <= 1.0:
        raise CapabilityError(f"mean token p must be in [0, 1], got {mean_p}")
    if mean_p > r.strong_from or (r.strong_inclusive and mean_p == r.strong_from):
        return STRONG
    return WEAK if mean_p < r.weak_below else INTERMEDIATE


def advise(mean_p: float, rule: str = "midpoint") -> Advice:
    """The advice of a rule (``midpoint`` or ``paper``) for a base model's mean token p on the training data."""
    r = get_rule(rule)
    region = region_of(mean_p, rule)
    ms, mw = f"{'>=' if r.strong_inclusive else '>'} {r.strong_from}", r.weak_below
    if region == STRONG:
        why = (f"mean p {mean_p:.3f} {ms}: the base model already predicts most target tokens, so the "
               "low-p tokens NLL concentrates on are mostly noise or alternatives it should not be pushed to; "
               "prior-leaning -p (or family:alpha with alpha >= 1, or neg_p_above:q) beat NLL in the paper's "
               "math setting (mean p ~0.8)")
    elif region == WEAK:
        why = (f"mean p {mean_p:.3f} < {mw}: the base model has little prior for these targets; -p's "
               "gradient weight p is near zero on most tokens and learns slowly, while NLL weights every token "
               "and wins, as on the paper's figfont puzzles (mean p ~0.01)")
    else:
        why = (f"{mw} <= mean p {mean_p:.3f}, not {ms}: in the paper's medical setting (mean p ~0.5) "
               "neither NLL nor -p dominates; compare both, or let adaptive_mix (or adaptive_alpha) move from NLL "
               "towards -p as the running mean p rises")
    return Advice(region, OBJECTIVES[region], f"{why} [rule {r.name}]")


def region_objective(region: str) -> str:
    """The objective the rule recommends for a region named without a measurement (a recipe's paper region)."""
    if region not in OBJECTIVES:
        raise CapabilityError(f"unknown capability region {region!r}; regions: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[region]


def rule_text() -> str:
    """The rule in one sentence, for --help texts and file headers."""
    return (f"{STRONG} (mean p >= {MS_FROM}) -> {OBJECTIVES[STRONG]}, {WEAK} (< {MW_BELOW}) -> {OBJECTIVES[WEAK]}, "
            f"in between -> {OBJECTIVES[INTERMEDIATE]}")
