"""Time and peak RSS of converting a random ~1B-parameter Qwen2-shaped model HF -> mcore -> HF.

The HF checkpoint is generated tensor by tensor (bf16, 2 GiB safetensors shards) without building an HF
model. Each direction runs as its own `megatron-sft convert` process under /usr/bin/time, so its peak RSS
is its own; the ratio peak RSS / model size is what the conversion's memory promise (<= 1.5x) is about.
Also checks that the exported tensors equal the originals.

    python benchmarks/convert_bench.py [--layers 18] [--workdir /tmp/convert_bench]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def write_random_qwen2(path: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> int:
    from transformers import Qwen2Config

    path.mkdir(parents=True)
    Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"], dtype="bfloat16",
    ).save_pretrained(path)
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv_heads * d, hidden), p + "self_attn.k_proj.bias": (kv_heads * d,),
            p + "self_attn.v_proj.weight": (kv_heads * d, hidden), p + "self_attn.v_proj.bias": (kv_heads * d,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden), p + "mlp.down_proj.weight": (hidden, ffn),
        })
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files, weight_map, size, total, params = [], {}, 0, 0, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard and size + nbytes > 2 * 1024**3:
            flush()
        shard[name], size, total, params = tensor, size + nbytes, total + nbytes, params + tensor.numel()
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return params


def timed(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss_kb = int(re.findall(r"MAXRSS_KB (\d+)", proc.stderr)[-1])
    return elapsed, rss_kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--workdir", default="/tmp/megatron_sft_convert_bench")
    args = parser.parse_args()

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    hf, ckpt, back = work / "hf", work / "mcore", work / "hf_back"
    params = write_random_qwen2(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab)
    size = params * 2
    print(f"random Qwen2-shaped model: {params / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB in bf16")

    _, baseline = timed([sys.executable, "-c", "import megatron_sft.convert.hf_to_mcore, megatron_sft.convert.mcore_to_hf, "
                         "megatron.core.dist_checkpointing, transformers"])
    print(f"baseline RSS of the interpreter with the converter's imports: {baseline / 2**30:.2f} GiB")
    cli = [sys.executable, "-m", "megatron_sft", "convert"]
    t1, rss1 = timed([*cli, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--no-progress"])
    t2, rss2 = timed([*cli, "mcore-to-hf", "--checkpoint", str(ckpt), "--out", str(back), "--no-progress"])
    print(f"{'direction':12} {'time s':>8} {'peak RSS GiB':>13} {'RSS / model':>12} {'(RSS - baseline) / model':>25}")
    for label, t, rss in (("hf -> mcore", t1, rss1), ("mcore -> hf", t2, rss2)):
        print(f"{label:12} {t:8.1f} {rss / 2**30:13.2f} {rss / size:12.2f} {(rss - baseline) / size:25.2f}")

    original = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    exported = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(original) == set(exported), "tensor names differ after the round trip"
    mismatched = 0
    for name in original:
        with safe_open(hf / original[name], "pt") as a, safe_open(back / exported[name], "pt") as b:
            mismatched += not torch.equal(a.get_tensor(name), b.get_tensor(name))
    print(f"round trip: {len(original) - mismatched}/{len(original)} tensors bit-exact")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
