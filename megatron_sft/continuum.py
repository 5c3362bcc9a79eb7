"""A miniature of the paper's model-capability continuum that runs on a CPU in minutes.

One tiny base model, two generated tasks with the same format ("c x m ?" -> three to six letters):

- *prior* task (model-strong end): shift every letter by one. The base model is pre-trained on it
  briefly (plain PyTorch NLL on rows disjoint from the SFT and held-out rows), so it starts with a strong
  but imperfect prior;
- *novel* task (model-weak end): a fixed random substitution cipher the base model has never seen; its
  prior points at the shifted letters instead, so the targets start at low p.

``megatron-sft probe`` measures the base model's mean token p on each task's SFT data; then each task is
fine-tuned with each objective (NLL, -p, adaptive_mix by default) by ``megatron-sft train`` and
evaluated on held-out rows with transformers (greedy exact match, teacher-forced token accuracy and
mean p). The paper predicts -p >= NLL on the prior task and NLL > -p on the novel one; the table reports
whatever the run shows.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_sft.demo import (LETTERS, SHIFT_BY_ONE, exact_match_accuracy, fresh_output_dir, letter_task_rows,
                               pretrain_base_model, token_accuracy_and_mean_p, write_jsonl)

DEFAULT_OBJECTIVES = ("nll", "neg_p", "adaptive_mix")


@dataclass
class ContinuumCell:
    task: str
    objective: str
    base_mean_p: float  # probe on the task's SFT data
    exact_match: float  # held-out, after SFT
    token_accuracy: float
    held_out_mean_p: float
    base_exact_match: float
    base_token_accuracy: float
    steps: int
    last_loss: float


def cipher_mapping(seed: int) -> dict[str, str]:
    """A random permutation of the letters with no letter mapped to itself or to its shifted letter."""
    rng = random.Random(seed)
    while True:
        image = LETTERS[:]
        rng.shuffle(image)
        mapping = dict(zip(LETTERS, image))
        if all(v != k and v != SHIFT_BY_ONE[k] for k, v in mapping.items()):
            return mapping




def run_continuum(out: str | Path, objectives: tuple[str, ...] = DEFAULT_OBJECTIVES, epochs: int = 4,
                  base_steps: int = 1500, train_rows: int = 512, lr: float = 3e-3, overwrite: bool = False) -> list[ContinuumCell]:
    from megatron_sft.commands.probe import probe_worker
    from megatron_sft.commands.train import train_worker
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.launch import run_local_workers
    from megatron_sft.testing.tiny_models import save_tiny_hf_model
    from megatron_sft.train.config import load_config

    started = time.perf_counter()
    out = fresh_output_dir(out, overwrite)
    tasks = {"prior (shift by one)": SHIFT_BY_ONE, "novel (substitution cipher)": cipher_mapping(seed=11)}
    held_out = letter_task_rows(200, seed=1, mapping=SHIFT_BY_ONE)  # prompts; each task maps them its own way
    used = {r["prompt"] for r in held_out}
    base_rows = letter_task_rows(400, seed=2, mapping=SHIFT_BY_ONE, exclude=used)
    used |= {r["prompt"] for r in base_rows}
    sft_prompts = letter_task_rows(train_rows, seed=3, mapping=SHIFT_BY_ONE, exclude=used)

    print(f"[1/3] base model: tiny Qwen2 (4 layers, hidden 128), {base_steps} steps of NLL on the prior task", flush=True)
    base = out / "base_hf"
    save_tiny_hf_model(base, "qwen2-tied-gqa", layers=4, hidden=128, seed=0)
    pretrain_base_model(base, base_rows, base_steps)
    ckpt = run_local_workers(convert_hf_to_mcore, 1, base, out / "base_mcore", timeout_s=600)[0]

    cells: list[ContinuumCell] = []
    for t, (task, mapping) in enumerate(tasks.items()):
        slug = "prior" if t == 0 else "novel"
        remap = lambda rows: [{"prompt": r["prompt"], "response": " ".join(mapping[c] for c in r["prompt"][:-2].split())}  # noqa: E731
                              for r in rows]
        train_file = write_jsonl(out / "data" / f"{slug}_train.jsonl", remap(sft_prompts))
        task_held_out = remap(held_out)
        write_jsonl(out / "data" / f"{slug}_held_out.jsonl", task_held_out)
        probe = run_local_workers(
            probe_worker, 1, load_config(None, [f"output_dir={out / 'probe' / slug}", f"model.checkpoint={ckpt}",
                                                f"data.train=[{train_file}]"]).to_dict(),
            len(sft_prompts), 8, str(out / "probe" / slug), 0, timeout_s=600)[0]
        base_em = exact_match_accuracy(base, task_held_out)
        base_tokens, _ = token_accuracy_and_mean_p(base, task_held_out)
        print(f"[2/3] {task}: base mean p {probe['mean_p']:.3f} ({probe['region']}, probe recommends "
              f"{probe['recommended_objective']}); held-out exact match {base_em:.1%}", flush=True)
        for objective in objectives:
            run_dir = out / "runs" / f"{slug}_{objective.replace(':', '-')}"
            config = load_config(None, [f"{k}={v}" for k, v in {
                "output_dir": run_dir, "model.checkpoint": ckpt, "data.train": f"[{train_file}]", "data.max_length": 64,
                "objective.name": objective, "train.global_batch_size": 16, "train.micro_batch_size": 4,
                "train.epochs": epochs, "optim.lr": lr, "optim.warmup_ratio": 0.05, "checkpoint.keep_last": 1,
                "log.every_steps": 1000, "log.progress_bar": "false", "log.tensorboard": "false"}.items()])
            summary = run_local_workers(train_worker, 1, config.to_dict(), False, timeout_s=3600)[0]
            tokens, mean_p = token_accuracy_and_mean_p(summary["export"], task_held_out)
            cell = ContinuumCell(task, objective, probe["mean_p"], exact_match_accuracy(summary["export"], task_held_out),
                                 tokens, mean_p, base_em, base_tokens, summary["steps"], summary["last_loss"])
            cells.append(cell)
            print(f"      SFT with {objective:13s}: held-out exact match {cell.exact_match:6.1%}, token accuracy "
                  f"{cell.token_accuracy:6.1%}, mean p {cell.held_out_mean_p:.3f}", flush=True)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the HF export is what is evaluated
    print(f"[3/3] table and plot ({time.perf_counter() - started:.0f}s in all)", flush=True)
    (out / "continuum.json").write_text(json.dumps([asdict(c) for c in cells], indent=2) + "\n")
    table = continuum_table(cells)
    (out / "continuum.md").write_text(table + "\n")
    print(table)
    plot_continuum(cells, out / "continuum.png")
    print(f"wrote {out / 'continuum.md'}, {out / 'continuum.json'} and {out / 'continuum.png'}")
    return cells


def continuum_table(cells: list[ContinuumCell]) -> str:
    objectives = list(dict.fromkeys(c.objective for c in cells))
    tasks = list(dict.fromkeys(c.task for c in cells))
    lines = ["| task | base mean p | base EM | " + " | ".join(f"{o}: EM / token acc" for o in objectives) + " |",
             "|---|---|---|" + "---|" * len(objectives)]
    for task in tasks:
        row = {c.objective: c for c in cells if c.task == task}
        first = row[objectives[0]]
        best = max(objectives, key=lambda o: (row[o].exact_match, row[o].token_accuracy))
        lines.append(f"| {task} | {first.base_mean_p:.3f} | {first.base_exact_match:.1%} | " + " | ".join(
            f"{'**' if o == best else ''}{row[o].exact_match:.1%} / {row[o].token_accuracy:.1%}{'**' if o == best else ''}"
            for o in objectives) + " |")
    return "\n".join(lines)


def plot_continuum(cells: list[ContinuumCell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = list(dict.fromkeys(c.objective for c in cells))
    tasks = list(dict.fromkeys(c.task for c in cells))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(objectives)
    for ax, metric, label in ((axes[0], "exact_match", "held-out exact match"),
                              (axes[1], "token_accuracy", "held-out token accuracy")):
        for i, objective in enumerate(objectives):
            values = [next(getattr(c, metric) for c in cells if c.task == t and c.objective == objective) for t in tasks]
            ax.bar([x + i * width for x in range(len(tasks))], values, width, label=objective)
        ax.set_xticks([x + width * (len(objectives) - 1) / 2 for x in range(len(tasks))])
        base_p = {c.task: c.base_mean_p for c in cells}
        ax.set_xticklabels([f"{t}\nbase mean p {base_p[t]:.2f}" for t in tasks], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle("Capability continuum in miniature: held-out accuracy after SFT, by objective")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
