"""``megatron-sft objectives``: the objective registry as a table (and a plot of W_f(p))."""

from __future__ import annotations

import argparse
import json

from megatron_sft.objectives import VALID_FORMS, ObjectiveSpecError, adaptive_specs, example_specs, parse_objective


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "objectives",
        help="list the f(p) objectives with their formula, W_f peak and prior-leaning/averse class",
        description="List objectives (spec strings accepted by --objective) with their formula and where the "
        "target-logit gradient weight W_f(p) = -f'(p) p (1 - p) peaks and where its mass sits (centroid, "
        "the mean p under W_f: >= 0.5 is prior-leaning, < 0.5 prior-averse).\n\n" + VALID_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("specs", nargs="*", help="objective specs to describe (default: one of every form)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="also write a plot of W_f(p) for these objectives to PNG")
    parser.set_defaults(run=run)


def describe(spec: str) -> dict:
    obj = parse_objective(spec)
    if obj.is_adaptive:  # no fixed W_f: it moves with the running mean p
        return {"spec": spec, "name": spec, "formula": obj.formula, "prior": obj.prior, "weight_peak": None,
                "weight_centroid": None}
    return {"spec": spec, "name": obj.name, "formula": obj.formula, "prior": obj.prior, "weight_peak": round(obj.weight_peak(), 4),
            "weight_centroid": None if obj.needs_batch_statistics else round(obj.weight_centroid(), 4)}


def plot_weights(specs: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    p = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in specs:
        obj = parse_objective(spec)
        if obj.needs_batch_statistics or obj.is_adaptive:
            continue  # depends on the batch / the running mean p, not on p alone
        w = obj.gradient_weight_curve(p)
        ax.plot(p.numpy(), (w / w.max().clamp_min(1e-12)).numpy(), label=f"{spec} ({obj.prior})")
    ax.set_xlabel("p (target-token probability)")
    ax.set_ylabel("W_f(p) / max W_f")
    ax.set_title("Gradient weight on the target logit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    specs = args.specs or example_specs() + adaptive_specs()
    try:
        rows = [describe(s) for s in specs]
    except ObjectiveSpecError as err:
        print(err)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["spec"]) for r in rows)
        print(f"{'spec':{width}}  {'prior':13}  {'W_f peak':>8}  {'centroid':>8}  formula")
        for r in rows:
            moving = r["weight_peak"] is None
            centroid = ("m" if moving else "batch") if r["weight_centroid"] is None else f"{r['weight_centroid']:.3f}"
            peak = f"{'m':>8}" if moving else f"{r['weight_peak']:8.3f}"
            print(f"{r['spec']:{width}}  {r['prior']:13}  {peak}  {centroid:>8}  {r['formula']}")
    if args.plot:
        plot_weights(specs, args.plot)
        print(f"wrote {args.plot}")
    return 0
