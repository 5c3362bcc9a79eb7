"""``megatron-sft compare``: several evaluation results side by side, as the paper's main table, and a plot."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare", help="lay several eval results (models / objectives) side by side: markdown, CSV and a plot",
        description="Read the results.json of several `megatron-sft eval` outputs and write one table in the "
        "paper's main-table layout (rows: runs; columns: benchmarks grouped by domain, each domain followed by its "
        "average), in percent, as OUT/compare.md and OUT/compare.csv, and a grouped bar chart OUT/compare.png.",
    )
    parser.add_argument("results", nargs="+", help="eval output directories (or their results.json)")
    parser.add_argument("--labels", help="comma-separated row names (default: each run's label; for an hf/ export, "
                        "its run directory)")
    parser.add_argument("--metric", default="accuracy",
                        help="metric to show: accuracy (avg@n; alpacaeval: the length-controlled win rate), pass@K, "
                        "base_accuracy (code), win_rate (alpacaeval) ... (default accuracy)")
    parser.add_argument("--out", default="compare", help="directory for compare.{md,csv,png} (default ./compare)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.evaluation.records import write_atomic
    from megatron_sft.evaluation.tables import csv_table, load_results, markdown_table, plot_runs, row_labels

    try:
        runs = [load_results(path) for path in args.results]
        labels = args.labels.split(",") if args.labels else row_labels(runs, args.results)
        if len(labels) != len(runs):
            raise ValueError(f"--labels names {len(labels)} runs, {len(runs)} results given")
        table = markdown_table(runs, labels, args.metric)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"megatron-sft compare: error: {err}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "compare.md", table)
    write_atomic(out / "compare.csv", csv_table(runs, labels, args.metric))
    plot_runs(runs, labels, out / "compare.png", args.metric)
    print(table, end="")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'} and {out / 'compare.png'}")
    return 0
