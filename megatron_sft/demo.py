"""The embedded CPU default: the whole pipeline on a tiny model and a generated task, in a couple of minutes.

1. A generated task, "shift every letter by one" (``c x m ?`` -> ``d y n``), split into train / held-out.
2. A tiny random Qwen2-shaped model, briefly pre-trained with plain PyTorch + NLL on a small disjoint set of
   rows so that it is a *capable but imperfect* base model (mean token p well above chance), which is the
   regime where the paper finds prior-leaning objectives such as -p useful.
3. ``convert hf-to-mcore``, then ``train`` with the ``p`` objective at TP=2 on 2 local processes
   (gloo on 127.0.0.1 without CUDA), then the automatic HF export.
4. Greedy-decoding exact-match accuracy of the base model and of the exported model on the held-out split,
   with transformers' own ``generate`` (independent of the training code).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


from megatron_sft.toy.files import fresh_output_dir, write_jsonl
from megatron_sft.toy.hf_loop import exact_match_accuracy, pretrain_base_model, token_accuracy_and_mean_p
from megatron_sft.toy.letter_task import shift_task_rows


@dataclass
class DemoResult:
    base_accuracy: float  # exact match, greedy decoding
    tuned_accuracy: float
    base_token_accuracy: float
    tuned_token_accuracy: float
    base_mean_p: float
    first_loss: float
    last_loss: float
    steps: int
    seconds: float
    output_dir: str


def run_demo(out: str | Path, nproc: int = 2, tensor_parallel: int = 2, objective: str = "p", epochs: int = 4,
             base_steps: int = 450, overwrite: bool = False) -> DemoResult:
    from megatron_sft.train.entry import launch_training
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.toy.tiny_models import save_tiny_hf_model
    from megatron_sft.config import load_config

    started = time.perf_counter()
    out = fresh_output_dir(out, overwrite)
    held_out = shift_task_rows(200, seed=1)
    base_rows = shift_task_rows(400, seed=2, exclude={r["prompt"] for r in held_out})
    train_rows = shift_task_rows(512, seed=3, exclude={r["prompt"] for r in held_out + base_rows})
    write_jsonl(out / "data" / "train.jsonl", train_rows)
    write_jsonl(out / "data" / "held_out.jsonl", held_out)

    print(f"[1/4] base model: tiny Qwen2 (4 layers, hidden 128), {base_steps} steps of plain-PyTorch NLL on "
          f"{len(base_rows)} rows", flush=True)
    base = out / "base_hf"
    save_tiny_hf_model(base, "qwen2-tied-gqa", layers=4, hidden=128, seed=0)
    pretrain_base_model(base, base_rows, base_steps)
    base_accuracy = exact_match_accuracy(base, held_out)
    base_tokens, base_p = token_accuracy_and_mean_p(base, held_out)
    print(f"      base model on the held-out split: exact match {base_accuracy:.1%}, token accuracy {base_tokens:.1%}, "
          f"mean p {base_p:.3f}", flush=True)

    print("[2/4] convert hf-to-mcore", flush=True)
    ckpt = convert_hf_to_mcore(base, out / "base_mcore", progress=False)

    config_path = out / "config.yaml"
    config_path.write_text(DEMO_CONFIG.format(
        output_dir=out / "run", checkpoint=ckpt, train=out / "data" / "train.jsonl",
        eval=out / "data" / "held_out.jsonl", tp=tensor_parallel, objective=objective, epochs=epochs,
    ))
    print(f"[3/4] megatron-sft train {config_path} --nproc {nproc}  (objective {objective}, TP={tensor_parallel})", flush=True)
    summary = launch_training(load_config(config_path), nproc=nproc)

    print("[4/4] held-out exact match with transformers generate (greedy)", flush=True)
    tuned_accuracy = exact_match_accuracy(summary["export"], held_out)
    tuned_tokens, tuned_p = token_accuracy_and_mean_p(summary["export"], held_out)
    result = DemoResult(
        base_accuracy=base_accuracy, tuned_accuracy=tuned_accuracy, base_token_accuracy=base_tokens,
        tuned_token_accuracy=tuned_tokens, base_mean_p=summary["first_mean_p"],
        first_loss=summary["first_loss"], last_loss=summary["last_loss"], steps=summary["steps"],
        seconds=time.perf_counter() - started, output_dir=str(out),
    )
    from megatron_sft.capability import advise  # the one capability rule, as `megatron-sft probe` applies it

    print(f"base model on the training data: {advise(result.base_mean_p).line(result.base_mean_p)} "
          f"(the probe's rule; this demo trains with {objective})")
    print(f"held-out, base -> after SFT with {objective}: exact match {base_accuracy:.1%} -> {tuned_accuracy:.1%}, "
          f"token accuracy {base_tokens:.1%} -> {tuned_tokens:.1%}, mean p {base_p:.3f} -> {tuned_p:.3f}")
    print(f"training: {result.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}; "
          f"{result.seconds:.0f}s in all")
    print(f"exported HF model: {summary['export']}; logs: {out / 'run'} (tensorboard --logdir {out / 'run' / 'tensorboard'})")
    print(f"train again (edit {config_path} or add key=value overrides): megatron-sft train {config_path} "
          f"output_dir={out / 'run'}2 --nproc {nproc}")
    return result


DEMO_CONFIG = """\
# Written by `megatron-sft demo`. Train again into a new run directory ({output_dir} holds the first run's checkpoints):
#   megatron-sft train {output_dir}/../config.yaml output_dir={output_dir}2 --nproc {tp}
output_dir: {output_dir}
model:
  checkpoint: {checkpoint}
parallel:
  tensor: {tp}
  sequence_parallel: true
data:
  train: [{train}]
  eval: [{eval}]
  max_length: 64
  packing: true
objective:
  name: {objective}
train:
  global_batch_size: 16
  micro_batch_size: 2
  epochs: {epochs}
  eval_every_steps: 10
optim:
  lr: 3.0e-3
  warmup_ratio: 0.05
checkpoint:
  every_steps: 20
  keep_last: 1
log:
  every_steps: 5
"""
