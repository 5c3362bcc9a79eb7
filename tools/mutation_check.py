"""Mutation check: each named bug, planted in a copy of the repository, must make a targeted test fail.

    .venv/bin/python tools/mutation_check.py                 # every mutation (slow: ~1-2 min each on 2 cores)
    .venv/bin/python tools/mutation_check.py --only gradient_doubled percentile_swapped
    .venv/bin/python tools/mutation_check.py --list

A mutation is a one-place text replacement (the original must occur exactly once, so that a refactoring that
moves the code makes the check say so instead of silently testing nothing). For each mutation the script
copies the source tree to a temporary directory, applies it, runs its target tests there (PYTHONPATH puts the
copy first, so spawned workers import the mutated code too) and records which test failed. A mutation whose
targets all pass is SURVIVED: the tests cannot see that bug. It first checks that the targets pass unmutated
(``--no-baseline`` skips that). Prints the table mutation -> failing test; exit 1 if any survived.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ["megatron_sft", "tests", "tools", "examples", "slurm", "evaluation", "pyproject.toml", "setup.py", "README.md", "constraints.txt"]
REF = "tests/test_train_reference.py::test_first_step_matches_float64_hf"


def ref(case: str) -> str:
    return f"{REF}[{case}]"


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    targets: list[str]
    why: str = ""


MUTATIONS = [
    Mutation("gradient_doubled", "megatron_sft/train/step.py",
             "return numerator, denominator.round().to(torch.int), {}",
             "return numerator * 2, denominator.round().to(torch.int), {}",
             [ref("one-nll-global-token_mean-none")], "every gradient x2, the logged loss unchanged"),
    Mutation("micro_batch_sum_averaged", "megatron_sft/train/step.py",
             "return mean * self._micro_batches, torch.ones((), dtype=torch.int, device=device), {}",
             "return mean, torch.ones((), dtype=torch.int, device=device), {}",
             ["tests/test_train_reference.py::test_micro_batch_sum_is_the_reference_trainers_step[one-neg_p]"],
             "micro_batch_sum averages the micro-batch means: the reference trainer's gradient / n_micro"),
    Mutation("percentile_swapped", "megatron_sft/objectives.py",
             'selection = "above" if self.selection == "top_percent" else "below"',
             'selection = "below" if self.selection == "top_percent" else "above"',
             [ref("one-neg_p_top:50-global-token_mean-none")], "top k% trains on the bottom (gradient accumulation)"),
    Mutation("percentile_per_micro_batch", "megatron_sft/train/step.py",
             "if not self.objective.needs_batch_statistics or len(micro_batches) == 1:",
             "if True:",
             [ref("one-neg_p_top:50-global-token_mean-none")], "no forward-only pass: the k% of each micro-batch"),
    Mutation("denominator_off_by_one_per_micro_batch", "megatron_sft/train/step.py",
             "return numerator, denominator.round().to(torch.int), {}",
             "return numerator, (denominator.round() + 1).to(torch.int), {}",
             [ref("one-nll-global-token_mean-none")], "global normalization: 1/(N + 4) instead of 1/N (1.5%)"),
    Mutation("logged_loss_off_by_one_micro_batch", "megatron_sft/train/step.py",
             'return stats["micro_mean"] / max(stats["micro_batches"], 1.0)',
             'return stats["micro_mean"] / max(stats["micro_batches"] + 1, 1.0)',
             [ref("one-neg_p-micro_batch-token_mean-none")], "the loss reported for micro_batch normalization"),
    Mutation("packed_boundary_ignored", "megatron_sft/model/attention.py",
             "return batch, (block_causal_mask(sequence_ids) if is_packed(sequence_ids) else None), None",
             "return batch, None, None",
             [ref("one-nll-global-token_mean-none")], "packed sequences attend to each other"),
    Mutation("rope_positions_reversed", "megatron_sft/model/builder.py",
             "    inv_freq = args.rope_inv_freq()\n",
             "    model.rotary_pos_emb.inv_freq = -model.rotary_pos_emb.inv_freq\n    inv_freq = args.rope_inv_freq()\n",
             [ref("one-nll-global-token_mean-none")], "rotation by -angle: attention sees positions mirrored"),
    Mutation("q_bias_dropped", "megatron_sft/convert/mapping.py",
             "        return _fuse_qkv(args, *parts)\n",
             "        return _fuse_qkv(args, *([parts[0] * 0, *parts[1:]] if parts[0].dim() == 1 else parts))\n",
             [ref("one-nll-global-token_mean-none")], "conversion loses the q bias"),
    Mutation("loss_on_prompt_tokens", "megatron_sft/data/collate.py",
             "loss_mask[:, :-1] = (target[:, 1:].bool() & same_sequence).float()",
             "loss_mask[:, :-1] = same_sequence.float()",
             [ref("one-nll-global-token_mean-none")], "prompt tokens trained on"),
    Mutation("sequence_mean_wrong_axis", "megatron_sft/train/step.py",
             'batch["sequence_ids"], batch_dim=0)', 'batch["sequence_ids"], batch_dim=-1)',
             [ref("one-mix:0.3-global-sequence_mean-none")], "sequences keyed by position, not by row"),
    Mutation("sp_norm_grads_not_reduced", "megatron_sft/model/builder.py",
             "param.sequence_parallel = config.sequence_parallel", "param.sequence_parallel = False",
             [ref("tp2_sp-neg_p_below:0.004-micro_batch-token_mean-selective")],
             "under SP each TP rank keeps its partial norm-weight gradient"),
    Mutation("log1mp_by_cancellation", "megatron_sft/loss.py",
             "torch.where(p < 0.5, torch.log1p(-p),", "torch.where(p < 0.0, torch.log1p(-p),",
             ["tests/test_objectives.py::test_log1mp_is_accurate_per_token_at_small_and_large_p"],
             "log(1-p) as a difference of logs: 5e-4 relative per token at p ~ 0.004 (averages out in a step)"),
    Mutation("recompute_rng_shim_removed", "megatron_sft/cpu_shims.py",
             "    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state().clone()\n", "",
             [ref("one-family:0.5-global-token_mean-full")], "checkpointed backward asks for the CUDA RNG state"),
    Mutation("thd_sequence_ids_not_offset", "megatron_sft/model/attention.py",
             "torch.where(sequence_ids >= 0, sequence_ids + offset, -1)", "sequence_ids",
             ["tests/test_attention_inputs.py"], "THD: sequences of different rows share an id"),
    Mutation("w_f_without_1_minus_p", "megatron_sft/objectives.py",
             "w = self.weight(torch.log(p), torch.log1p(-p)) * (1 - p)", "w = self.weight(torch.log(p), torch.log1p(-p))",
             ["tests/test_cli_options.py::test_objectives_plot_draws_w_f_of_each_objective"], "plots w(p), not W_f(p)"),
    Mutation("print_ignores_overrides", "megatron_sft/commands/train.py",
             "config = load_config(config_path, overrides)", "config = load_config(config_path, [] if args.print_key else overrides)",
             ["tests/test_cli_options.py::test_train_print_shows_resolved_values_and_refuses_unknown_keys"],
             "--print shows the YAML value, not the resolved one"),
    Mutation("regrade_scores_everything_right", "megatron_sft/evaluation/runner.py",
             "        self._grade(records, bench, grading)\n        rewrite_records(path, records)\n",
             "        self._grade(records, bench, grading)\n        [s.update(score=1.0) for r in records for s in r['samples']]\n"
             "        rewrite_records(path, records)\n",
             ["tests/test_eval.py::test_pipeline_resume_regrade_and_compare"], "--regrade scores every sample 1.0"),
    Mutation("export_skipped", "megatron_sft/train/trainer.py",
             "if not loop.stopped and cfg.checkpoint.export_hf and loop.saved is not None:", "if False:",
             ["tests/test_train.py::test_model_only_checkpoint_and_hf_export_hold_the_trained_weights"], "no OUTPUT/hf"),
    Mutation("export_of_initial_weights", "megatron_sft/train/trainer.py",
             "exported = export_hf(loop.saved, out / \"hf\", main)", "exported = export_hf(Path(cfg.model.checkpoint), out / \"hf\", main)",
             ["tests/test_train.py::test_model_only_checkpoint_and_hf_export_hold_the_trained_weights"],
             "OUTPUT/hf from the base checkpoint"),
    Mutation("deferred_weight_gather_skipped", "megatron_sft/train/checkpointing.py",
             "    gather_parameters(model)  # parallel.overlap_param_gather", "    # parallel.overlap_param_gather",
             ["tests/test_train.py::test_deferred_weight_gather_completes_before_every_checkpoint"],
             "overlap_param_gather: a checkpoint holds the previous step's weights for other ranks' shards"),
    Mutation("fused_wgrad_added_twice", "megatron_sft/fused_output_loss.py",
             "        weight.grad_added_to_main_grad = True\n", "        pass\n",
             ["tests/test_train_reference.py::test_untied_output_weight_matches_float64_hf"],
             "the fused loss's weight gradient in main_grad, and DDP's hook adds the stand-in on top of it"),
    Mutation("resume_ignores_saved_optimizer", "megatron_sft/train/checkpointing.py",
             '    return bool(json.loads((Path(path) / STATE_FILE).read_text()).get("distributed_optimizer", configured))\n',
             "    return configured\n",
             ["tests/test_train.py::test_one_replica_uses_the_plain_optimizer_and_its_checkpoint_resumes_at_dp2"],
             "a resumed run builds the optimizer its new layout would pick, not the one whose state it loads"),
]


def copy_tree(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def run_targets(tree: Path, targets: list[str], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *targets]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return done.returncode, done.stdout + done.stderr


def check(mutation: Mutation | None, targets: list[str], timeout: int) -> tuple[str, str, float]:
    """(outcome, detail, seconds) for one mutation (None: the unmutated baseline)."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        if mutation is not None:
            path = tree / mutation.path
            text = path.read_text()
            if text.count(mutation.old) != 1:
                return "ANCHOR MISSING", f"{mutation.path}: the original text occurs {text.count(mutation.old)} times", 0.0
            path.write_text(text.replace(mutation.old, mutation.new))
        code, output = run_targets(tree, targets, timeout)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    if code in (4, 5):  # usage error / nothing collected: the check ran nothing
        return "NOT RUN", output.strip().splitlines()[-1] if output.strip() else f"pytest exit {code}", time.time() - started
    if code == 0:
        return "SURVIVED", "all targets pass", time.time() - started
    reason = re.search(r"^E +(.+)$", output, flags=re.MULTILINE)  # the first assertion / error line: why it failed
    detail = (failed[0] if failed else f"pytest exit {code}") + (f" ({reason.group(1).strip()[:90]})" if reason else "")
    return "caught", detail, time.time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their targets")
    parser.add_argument("--no-baseline", action="store_true", help="skip checking that the targets pass unmutated")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.path}: {m.why}\n{'':36s} -> {', '.join(m.targets)}")
        return 0
    if not args.no_baseline:
        targets = sorted({t for m in chosen for t in m.targets})
        outcome, detail, seconds = check(None, targets, args.timeout)
        print(f"baseline ({len(targets)} targets, unmutated): {'pass' if outcome == 'SURVIVED' else detail} [{seconds:.0f}s]", flush=True)
        if outcome != "SURVIVED":
            return 2
    rows = []
    for m in chosen:
        outcome, detail, seconds = check(m, m.targets, args.timeout)
        rows.append((m.name, outcome, detail, seconds))
        print(f"{m.name:36s} {outcome:9s} {detail} [{seconds:.0f}s]", flush=True)
    print("\n| mutation | outcome | failing test |\n|---|---|---|")
    for name, outcome, detail, _ in rows:
        print(f"| {name} | {outcome} | {detail} |")
    return 0 if all(outcome == "caught" for _, outcome, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
