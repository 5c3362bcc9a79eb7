"""A miniature of the paper's model-capability continuum that runs on a CPU in minutes.

One tiny base model, two generated tasks with the same format ("c x m ?" -> three to six letters):

- *prior* task (model-strong end): shift every letter by one. The base model is pre-trained on it
  briefly (plain PyTorch NLL on rows disjoint from the SFT and held-out rows), so it starts with a strong
  but imperfect prior;
- *novel* task (model-weak end): a fixed random substitution cipher the base model has never seen; its
  prior points at the shifted letters instead, so the targets start at low p.

``megatron-sft probe`` measures the base model's mean token p on each task's SFT data; then each task is
fine-tuned with each objective by ``megatron-sft train`` and evaluated on held-out rows with transformers
(greedy exact match, teacher-forced token accuracy and mean p). The objectives are either a list (NLL, -p,
adaptive_mix by default) or the alpha sweep ``nll`` + ``family:<alpha>`` (f_alpha = (1 - p^alpha)/alpha:
alpha -> 0 is NLL, alpha = 1 is -p), whose plot is the paper's X: accuracy vs alpha, one line per task.

Everything repeats over seeds 0..N-1: a seed changes the base model's init, its pre-training order and the SFT
data order; the rows (pre-training, SFT, held-out) stay fixed, so the spread is the training noise. The table
reports mean ± 95% t-interval per cell (see continuum_stats), and shows whatever the run shows.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sft.continuum_report import ContinuumCell, continuum_table, plot_continuum, write_results  # noqa: F401
from megatron_sft.toy.files import fresh_output_dir, write_jsonl
from megatron_sft.toy.hf_loop import exact_match_accuracy, pretrain_base_model, token_accuracy_and_mean_p
from megatron_sft.toy.letter_task import LETTERS, SHIFT_BY_ONE, letter_task_rows

DEFAULT_OBJECTIVES = ("nll", "neg_p", "adaptive_mix")
# one torch thread per process: the tiny model gains little from a second, and on a shared 2-core machine two
# threads per process spin against other processes (pre-training measured 20x slower at load 10 with two)
WORKER_THREADS = 1
DEFAULT_ALPHAS = (0.1, 1.0, 10.0)
HELD_OUT_ROWS = 200
BASE_ROWS = 400


@dataclass
class ContinuumTask:
    name: str
    slug: str
    train_file: Path
    held_out: list[dict[str, str]]


def cipher_mapping(seed: int) -> dict[str, str]:
    """A random permutation of the letters with no letter mapped to itself or to its shifted letter."""
    rng = random.Random(seed)
    while True:
        image = LETTERS[:]
        rng.shuffle(image)
        mapping = dict(zip(LETTERS, image))
        if all(v != k and v != SHIFT_BY_ONE[k] for k, v in mapping.items()):
            return mapping


def alpha_sweep_objectives(alphas: tuple[float, ...]) -> tuple[str, ...]:
    """``nll`` (the alpha -> 0 end) and ``family:<alpha>`` per alpha, in increasing alpha."""
    return ("nll",) + tuple(f"family:{a:g}" for a in sorted(alphas))


def continuum_tasks(out: Path, train_rows: int) -> tuple[list[ContinuumTask], list[dict[str, str]]]:
    """The two tasks' SFT files and held-out rows, and the base model's pre-training rows: all disjoint prompts,
    fixed across seeds (the held-out prompts are the same for both tasks; each task maps them its own way)."""
    held_out = letter_task_rows(HELD_OUT_ROWS, seed=1, mapping=SHIFT_BY_ONE)
    used = {r["prompt"] for r in held_out}
    base_rows = letter_task_rows(BASE_ROWS, seed=2, mapping=SHIFT_BY_ONE, exclude=used)
    used |= {r["prompt"] for r in base_rows}
    sft_prompts = letter_task_rows(train_rows, seed=3, mapping=SHIFT_BY_ONE, exclude=used)
    tasks = []
    for name, slug, mapping in (("prior (shift by one)", "prior", SHIFT_BY_ONE),
                                ("novel (substitution cipher)", "novel", cipher_mapping(seed=11))):
        train_file = write_jsonl(out / "data" / f"{slug}_train.jsonl", _remap(sft_prompts, mapping))
        task_held_out = _remap(held_out, mapping)
        write_jsonl(out / "data" / f"{slug}_held_out.jsonl", task_held_out)
        tasks.append(ContinuumTask(name, slug, train_file, task_held_out))
    return tasks, base_rows


def _remap(rows: list[dict[str, str]], mapping: dict[str, str]) -> list[dict[str, str]]:
    """The same prompts answered by ``mapping`` (the prompt's letters, "c x m ?" without the " ?")."""
    return [{"prompt": r["prompt"], "response": " ".join(mapping[c] for c in r["prompt"][:-2].split())} for r in rows]


def build_base(out: Path, base_rows: list[dict[str, str]], base_steps: int, seed: int) -> tuple[Path, str]:
    """The seed's tiny base model (init and pre-training order from ``seed``): (HF dir, Megatron checkpoint)."""
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.launch import run_local_workers
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    base = out / "base_hf"
    save_tiny_hf_model(base, "qwen2-tied-gqa", layers=4, hidden=128, seed=seed)
    pretrain_base_model(base, base_rows, base_steps, seed=seed)
    return base, run_local_workers(convert_hf_to_mcore, 1, base, out / "base_mcore", timeout_s=600,
                                   threads=WORKER_THREADS)[0]


def probe_base(out: Path, task: ContinuumTask, base: Path, ckpt: str) -> dict[str, Any]:
    """``megatron-sft probe`` on the task's SFT data plus the base model's held-out exact match / token accuracy."""
    from megatron_sft.config import load_config
    from megatron_sft.launch import run_local_workers
    from megatron_sft.probe import probe_worker

    rows = sum(1 for _ in task.train_file.open())
    config = load_config(None, [f"output_dir={out / 'probe' / task.slug}", f"model.checkpoint={ckpt}",
                                f"data.train=[{task.train_file}]"])
    probe = run_local_workers(probe_worker, 1, config.to_dict(), rows, 8, str(out / "probe" / task.slug), 0,
                              timeout_s=600, threads=WORKER_THREADS)[0]
    probe["base_em"] = exact_match_accuracy(base, task.held_out)
    probe["base_tokens"], _ = token_accuracy_and_mean_p(base, task.held_out)
    return probe


def sft_cell(out: Path, task: ContinuumTask, objective: str, ckpt: str, probe: dict[str, Any], seed: int,
             epochs: int, lr: float) -> ContinuumCell:
    """One ``megatron-sft train`` run (data order and init seeds from ``seed``), evaluated on the held-out rows."""
    from megatron_sft.config import load_config
    from megatron_sft.launch import run_local_workers
    from megatron_sft.train.entry import train_worker

    run_dir = out / "runs" / f"{task.slug}_{objective.replace(':', '-')}"
    config = load_config(None, [f"{k}={v}" for k, v in {
        "output_dir": run_dir, "model.checkpoint": ckpt, "data.train": f"[{task.train_file}]", "data.max_length": 64,
        "data.seed": 1234 + seed, "train.seed": 1234 + seed, "objective.name": objective,
        "train.global_batch_size": 16, "train.micro_batch_size": 4, "train.epochs": epochs, "optim.lr": lr,
        "optim.warmup_ratio": 0.05, "checkpoint.keep_last": 1, "log.every_steps": 1000, "log.progress_bar": "false",
        "log.tensorboard": "false"}.items()])
    summary = run_local_workers(train_worker, 1, config.to_dict(), False, timeout_s=3600, threads=WORKER_THREADS)[0]
    tokens, mean_p = token_accuracy_and_mean_p(summary["export"], task.held_out)
    cell = ContinuumCell(task.name, objective, probe["mean_p"], exact_match_accuracy(summary["export"], task.held_out),
                         tokens, mean_p, probe["base_em"], probe["base_tokens"], summary["steps"], summary["last_loss"],
                         seed)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the HF export is what is evaluated
    return cell


def run_continuum(out: str | Path, objectives: tuple[str, ...] = DEFAULT_OBJECTIVES, epochs: int = 4,
                  base_steps: int = 1500, train_rows: int = 512, lr: float = 3e-3, overwrite: bool = False,
                  seeds: int = 1) -> list[ContinuumCell]:
    """Every task x objective over seeds 0..seeds-1; the table and JSON are rewritten after each run, the plot
    at the end (``megatron-sft continuum --out OUT --replot`` redraws both from a partial JSON)."""
    import torch

    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)  # pre-training and evaluation here; the workers likewise
    try:
        return _run_seeds(fresh_output_dir(out, overwrite), objectives, seeds, epochs, base_steps, train_rows, lr, started)
    finally:
        torch.set_num_threads(threads)


def _run_seeds(out: Path, objectives: tuple[str, ...], seeds: int, epochs: int, base_steps: int, train_rows: int,
               lr: float, started: float) -> list[ContinuumCell]:
    """run_continuum's loop: seeds outermost, so an interrupted run has whole seeds in its table."""
    tasks, base_rows = continuum_tasks(out, train_rows)
    settings = dict(objectives=list(objectives), seeds=seeds, epochs=epochs, base_steps=base_steps,
                    train_rows=train_rows, lr=lr, held_out_rows=HELD_OUT_ROWS)
    cells: list[ContinuumCell] = []
    for seed in range(seeds):
        seed_dir = out / f"seed{seed}"
        print(f"[seed {seed + 1}/{seeds}] base model: tiny Qwen2 (4 layers, hidden 128, init seed {seed}), "
              f"{base_steps} steps of NLL on the prior task", flush=True)
        base, ckpt = build_base(seed_dir, base_rows, base_steps, seed)
        for task in tasks:
            probe = probe_base(seed_dir, task, base, ckpt)
            print(f"  {task.name}: base mean p {probe['mean_p']:.3f} ({probe['region']}, probe recommends "
                  f"{probe['recommended_objective']}); held-out exact match {probe['base_em']:.1%}", flush=True)
            for objective in objectives:
                cell = sft_cell(seed_dir, task, objective, ckpt, probe, seed, epochs, lr)
                cells.append(cell)
                settings["elapsed_s"] = round(time.perf_counter() - started, 1)
                write_results(out, cells, settings)  # an interrupted run keeps the table of the runs that finished
                print(f"    SFT with {objective:13s}: held-out exact match {cell.exact_match:6.1%}, token accuracy "
                      f"{cell.token_accuracy:6.1%}, mean p {cell.held_out_mean_p:.3f} "
                      f"({settings['elapsed_s']:.0f}s so far)", flush=True)
    settings["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"table and plot ({settings['elapsed_s']:.0f}s in all)", flush=True)
    print(write_results(out, cells, settings))
    plot_continuum(cells, out / "continuum.png")
    print(f"wrote {out / 'continuum.md'}, {out / 'continuum.json'} and {out / 'continuum.png'}")
    return cells
