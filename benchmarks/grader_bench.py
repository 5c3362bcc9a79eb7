"""How the graders agree with each benchmark's own answers, side by side with a false-positive check.

For every item the benchmark's reference answer is written as a model would write it (math: the reference
solution text where it ends in \\boxed{}, else \\boxed{answer}; multiple choice: \\boxed{letter} and the option
text in a box; figfont: the word; code: the canonical solution in a markdown block) and graded: the share
scored right should be 100%. The same answers graded against the *next* item's reference (a wrong answer
that is still well-formed) give the false-positive rate, which should be ~0%. Items per second of grading
(worker processes, as `megatron-sft eval` grades) are printed too; for code, side by side with the same
answers graded unsandboxed (evalplus's guard only, as before the sandbox), to show what the sandbox costs.

    python benchmarks/grader_bench.py [--benchmarks math,medical,figfont,code] [--limit N] [--workers 2]
        [--sandbox auto|bwrap|unshare|os-unshare]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from megatron_sft.evaluation import benchmarks as bm
from megatron_sft.evaluation.extraction import last_boxed
from megatron_sft.evaluation.graders import grade
from megatron_sft.evaluation.runner import GradingContext
from megatron_sft.evaluation.sandbox import UNSANDBOXED
from megatron_sft.evaluation.workers import grade_in_workers


def right_answers(bench: bm.Benchmark, items: list[bm.Item], data_dir) -> list[str]:
    if bench.grader == "math":
        solutions = {}
        if bench.name in ("math500", "minerva"):
            rows = bm.read_jsonl(data_dir / bench.source)
            key = "unique_id" if bench.name == "math500" else "idx"
            solutions = {str(r.get(key, n)): r["solution"] for n, r in enumerate(rows)}
        return [solutions.get(item.id) if last_boxed(solutions.get(item.id, "")) else f"\\boxed{{{item.reference}}}"
                for item in items]
    if bench.grader == "choice":
        return [f"\\boxed{{{item.reference}}}" for item in items]
    if bench.grader == "figfont":
        return [item.reference["answer"] for item in items]
    from megatron_sft.evaluation.code_tasks import evalplus_dataset, load_problems

    problems = load_problems(data_dir / bench.source, evalplus_dataset(bench.name))
    return [f"```python\n{problems[i.id]['prompt']}{problems[i.id]['canonical_solution']}\n```" for i in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", default="math,medical,figfont,code")
    parser.add_argument("--limit", type=int, default=0, help="first N items per benchmark (0: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--sandbox", default="auto", help="mechanism for code (auto: the first that works)")
    args = parser.parse_args()
    data_dir = bm.default_data_dir()
    print(f"{'benchmark':18s} {'items':>6s} {'right->1':>9s} {'wrong->1':>9s} {'items/s':>8s} {'unsandboxed':>11s}"
          f"  unmatched (first 3)")
    for bench in bm.resolve_benchmarks(args.benchmarks):
        items = bm.load_items(bench, data_dir, {}, args.limit or None)
        answers = right_answers(bench, items, data_dir)
        with tempfile.TemporaryDirectory() as tmp:
            context = GradingContext(bench, data_dir, Path(tmp), {"sandbox": args.sandbox})
            records = [{"id": i.id, "reference": i.reference, "meta": i.meta} for i in items]
            context.prepare(records)
            tasks = [(bench.grader, a, r["reference"], context.meta(r)) for a, r in zip(answers, records)]
            # the next item's reference, where it differs as text (equal answers of neighbours are right)
            pairs = [(a, s) for a, r, s in zip(answers, records, records[1:] + records[:1])
                     if json.dumps(s["reference"]) != json.dumps(r["reference"])]
            wrong = [(bench.grader, a, s["reference"], context.meta(s)) for a, s in pairs]
            if bench.grader == "choice":  # the next item's letter may coincide: compare with a different letter
                wrong = [(g, a, next(k for k in r["meta"]["options"] if k != ref), r["meta"])
                         for (g, a, ref, _), r in zip(tasks, records)]
            timeout = args.timeout * (4 if bench.grader == "code" else 1)  # as `megatron-sft eval` allows
            start = time.time()
            right = grade_in_workers(grade, tasks, args.workers, timeout)
            seconds = time.time() - start
            false = grade_in_workers(grade, wrong, args.workers, timeout)
            side, note = "", ""
            if bench.grader == "code":  # the same answers with evalplus's guard only (no sandbox), for comparison
                bare = [(g, a, ref, {**meta, "sandbox": UNSANDBOXED}) for g, a, ref, meta in tasks]
                start = time.time()
                bare_right = grade_in_workers(grade, bare, args.workers, timeout)
                bare_seconds = time.time() - start
                side = f"{len(items) / bare_seconds:.1f}"
                note = (f"[sandbox {context.sandbox}: {seconds / bare_seconds:.2f}x the unsandboxed time; unsandboxed "
                        f"right->1 {sum(r['score'] for r in bare_right) / len(items):.1%}]  ")
        false_hits = [f"{w[1][-40:]!r} vs {w[2]!r:.40}" for w, r in zip(wrong, false) if r["score"] >= 1]
        misses = [f"{i.id}: {r.get('error') or r.get('pred')!r:.60}" for i, r in zip(items, right) if r["score"] < 1]
        print(f"{bench.name:18s} {len(items):6d} {sum(r['score'] for r in right) / len(items):9.1%} "
              f"{sum(r['score'] for r in false) / max(1, len(wrong)):9.1%} {len(items) / seconds:8.1f} {side:>11s}  "
              f"{note}{'; '.join(misses[:3])}", flush=True)
        for hit in false_hits[:3]:
            print(f"{'':18s} false positive: {hit}")


if __name__ == "__main__":
    main()
