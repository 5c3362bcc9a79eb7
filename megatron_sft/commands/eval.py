"""``megatron-sft eval``: benchmark an HF model (vLLM or transformers), grade, and tabulate avg@n / pass@k."""

from __future__ import annotations

import argparse
from dataclasses import MISSING


def add_parser(sub: argparse._SubParsersAction) -> None:
    from megatron_sft.evaluation.benchmarks import DOMAINS
    from megatron_sft.evaluation.runner import config_fields

    listing = "\n".join(f"  {domain:12s} {', '.join(names)}" for domain, names in DOMAINS.items())
    parser = sub.add_parser(
        "eval", help="evaluate an HF model on the paper's benchmarks (math, medical, figfont, code, AlpacaEval 2, "
        "MMLU-ProX)",
        description="Generate answers with vLLM (default on a GPU when installed; data parallel over engines, "
        "tensor parallel within one) or transformers generate (CPU fallback), grade them (math-verify on the last "
        "\\boxed{}; option letters for medical and multilingual MCQ; reasoning-gym's figlet scorer; evalplus "
        "execution for code; alpacaeval: an LLM judge (--judge-model or --judge-url) and alpaca-eval's win rates), "
        "and write OUT/results.{json,csv,md}: accuracy as avg@n over n samples, pass@k, and the mean per domain. "
        "Every generation is saved in OUT/BENCH/generations.jsonl; a rerun skips finished items. Settings come "
        "from --config YAML (keys as the flags, with _) and the flags, which win.\n\nBenchmarks (domain: names):\n"
        + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of settings (any of the flags below, e.g. temperature: 0.6)")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            shown = "" if "default" in f.metadata["help"] else f" (default {default!r})"
            parser.add_argument(flag, type=type(default), default=None, metavar=f.name.upper(),
                                help=f.metadata["help"] + shown)
    parser.set_defaults(run=run)


def build_config(args: argparse.Namespace):
    import yaml

    from megatron_sft.evaluation.runner import EvalConfig, config_fields

    values: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        known = {f.name for f in config_fields()}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {unknown}; valid: {sorted(known)}")
        values.update(loaded)
    for f in config_fields():
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = value
    if isinstance(values.get("benchmarks"), list):  # YAML may list them
        values["benchmarks"] = ",".join(str(name) for name in values["benchmarks"])
    config = EvalConfig(**values)
    for f in config_fields():
        value, default = getattr(config, f.name), f.default
        if not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
            raise ValueError(f"setting {f.name}: expected {type(default).__name__}, got {value!r}")
    return config


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_sft.evaluation.benchmarks import BenchmarkError
    from megatron_sft.evaluation.graders import GraderUnavailable
    from megatron_sft.evaluation.runner import GradingIncomplete, evaluate

    try:
        config = build_config(args)
        results = evaluate(config)
    except (BenchmarkError, GraderUnavailable, ValueError, FileNotFoundError, OSError) as err:
        print(f"megatron-sft eval: error: {err}")
        return 2
    except GradingIncomplete as err:
        print((Path(config.out) / "results.md").read_text(), end="")
        print(f"megatron-sft eval: error: {err}")
        return 3
    print((Path(config.out) / "results.md").read_text(), end="")
    print(f"wrote {config.out}/results.json, results.csv, results.md and */generations.jsonl "
          f"({results['seconds']:.0f} s)")
    return 0
