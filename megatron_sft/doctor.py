"""``megatron-sft doctor``: what this machine runs and how fast, in one command and one report.

Why: the GPU path is where the speed is and where a broken install hides (a Transformer Engine built for
another CUDA, a torch without ``varlen_attn``); a user on a new cluster wants one command that says which
kernels megatron-sft will use, whether its GPU tests pass there, and what tokens/s, MFU and memory to expect,
before queueing a long job. Steps, each with its own time limit so the whole stays inside ~8 minutes:

1. the environment: GPU, torch / CUDA / cuDNN versions, optional packages, the attention backend ``auto``
   resolves to and whether torch's ``varlen_attn`` is there;
2. the ``gpu`` tests of the source checkout (``pytest -m gpu``);
3. ``benchmarks/loss_bench.py`` on CUDA (our vocab-parallel loss vs megatron-core's cross-entropy);
4. ``benchmarks/gpu_train_bench.py``: megatron-sft vs a transformers loop on a Qwen2.5-1.5B shape.

Steps 2-4 need a source checkout (tests/ and benchmarks/ next to the package) and CUDA; without CUDA they are
reported as skipped unless ``--cpu`` asks for their tiny CPU versions (a check of the plumbing, not of speed).
Writes ``report.json`` and ``report.md``; exit 1 when a step that ran failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

OPTIONAL_PACKAGES = ("megatron-core", "transformers", "transformer-engine", "flash-attn", "apex", "vllm")
BUDGET_S = {"gpu tests": 150.0, "loss benchmark": 75.0, "training benchmark": 240.0}


@dataclass
class Step:
    """One step of the report: ok | failed | timeout | skipped, with what it printed or measured."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The machine and what megatron-sft will use on it."""
    import torch

    from megatron_sft.model.attention_backends import resolve_attention_backend, varlen_attn_available

    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None, "gpu": None, "gpu_memory_gib": None,
           "packages": {name: _version(name) for name in OPTIONAL_PACKAGES},
           "attention_backend_auto": resolve_attention_backend("auto"), "torch_varlen_attn": varlen_attn_available()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count())
    return env


def source_checkout() -> Optional[Path]:
    """The repository this package runs from, if it has tests/ and benchmarks/ (not a wheel install)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "tests").is_dir() and (root / "benchmarks").is_dir() else None


def _run(name: str, command: list[str], cwd: Path, timeout_s: float) -> tuple[Step, str]:
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return Step(name, "timeout", time.monotonic() - started, f"over {timeout_s:.0f} s\n{output[-2000:]}"), output
    output = done.stdout + done.stderr
    status = "ok" if done.returncode == 0 else "failed"
    return Step(name, status, time.monotonic() - started, "" if status == "ok" else output[-4000:]), output


def gpu_tests(root: Path, timeout_s: float) -> Step:
    step, output = _run("gpu tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                      "tests"], root, timeout_s)
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", output))
    step.figures = counts
    if step.status == "failed" and not counts.get("failed") and not counts.get("error") and counts.get("passed"):
        step.status = "ok"
    return step


def benchmark(name: str, script: str, arguments: list[str], root: Path, out: Path, timeout_s: float) -> Step:
    """A benchmark script with ``--json``: its figures go into the report."""
    result = out / f"{Path(script).stem}.json"
    step, _ = _run(name, [sys.executable, str(root / "benchmarks" / script), *arguments, "--json", str(result)],
                   root, timeout_s)
    if step.status == "ok":
        step.figures = json.loads(result.read_text())
    return step


def run_doctor(out: Path, cpu: bool = False, skip_tests: bool = False) -> dict:
    """Every step in order; the report (also written to OUT/report.json and OUT/report.md)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "steps": []}
    root, cuda = source_checkout(), torch.cuda.is_available()
    reason = ("no source checkout (tests/ and benchmarks/ are not installed with the wheel)" if root is None
              else None if cuda or cpu else "no CUDA device (--cpu runs the tiny CPU versions)")
    budget = {name: seconds * (1 if cuda else 4) for name, seconds in BUDGET_S.items()}  # CPU: slow starts
    small = [] if cuda else ["--tokens", "512", "--vocab", "4096", "--reps", "1"]
    tiny = [] if cuda else ["--steps", "2", "--warmup", "1", "--rows", "64", "--rows-per-step", "2"]
    plan = [("gpu tests", lambda: gpu_tests(root, budget["gpu tests"])) if not skip_tests else None,
            ("loss benchmark", lambda: benchmark("loss benchmark", "loss_bench.py", small, root, out,
                                                 budget["loss benchmark"])),
            ("training benchmark", lambda: benchmark("training benchmark", "gpu_train_bench.py", tiny, root, out,
                                                     budget["training benchmark"]))]
    for name, run in filter(None, plan):
        step = Step(name, "skipped", detail=reason) if reason else run()
        report["steps"].append(asdict(step))
        print(f"{name}: {step.status} ({step.seconds:.0f} s)", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def _figure_lines(step: dict) -> list[str]:
    figures = step["figures"]
    if step["name"] == "training benchmark" and figures.get("trainers"):
        return [f"  - {name}: {f['tokens_per_s']:.0f} tokens/s ({f['vs_transformers']:.2f}x transformers), MFU "
                f"{'n/a' if f['mfu'] is None else format(f['mfu'], '.1%')}, peak {f['peak_bytes'] / 2**30:.2f} GiB"
                for name, f in figures["trainers"].items()]
    if step["name"] == "loss benchmark" and figures.get("dtypes"):
        return [f"  - {dtype}: time ours/megatron-core {r['time_ours_over_megatron']:.2f}, peak ours/megatron-core "
                f"{r['peak_ours_over_megatron']:.2f}" for dtype, r in figures["dtypes"].items()]
    return [f"  - {json.dumps(figures)}"] if figures else []


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# megatron-sft doctor", "",
             f"- GPU: {env['gpu'] or 'none'}" + (f" ({env['gpu_memory_gib']} GiB)" if env["gpu"] else ""),
             f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}",
             f"- attention backend for `auto`: {env['attention_backend_auto']}; torch varlen_attn: "
             f"{'yes' if env['torch_varlen_attn'] else 'no'}",
             "- packages: " + ", ".join(f"{k} {v or 'absent'}" for k, v in env["packages"].items()), ""]
    for step in report["steps"]:
        lines.append(f"- **{step['name']}**: {step['status']} ({step['seconds']:.0f} s)")
        lines += _figure_lines(step)
        if step["status"] not in ("ok",) and step["detail"]:
            lines.append("  ```\n  " + step["detail"].strip().replace("\n", "\n  ")[-1500:] + "\n  ```")
    return "\n".join(lines) + "\n"
