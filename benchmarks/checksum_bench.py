"""Cost of the checkpoint manifest's CRC-32 (megatron_sft.train.checkpoint_integrity), per GiB and for a 7B
checkpoint with its optimizer state (bf16 weights 2 B + fp32 main weights and two Adam moments 12 B per
parameter: ~91 GiB). Measures one core, reading a file from the page cache as a save just wrote it; the
ranks split the files, so divide by the rank count (a cold read from disk is bound by the disk instead).

    python benchmarks/checksum_bench.py [--gib 1] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

from megatron_sft.train.checkpoint_integrity import file_crc32

SEVEN_B_GIB = 7e9 * (2 + 12) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test file (default 1 GiB)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    path = Path(args.workdir) / "checksum_bench.bin"
    block = os.urandom(1 << 24)
    with path.open("wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[: size - start])
    try:
        file_crc32(path)  # warm the page cache
        start = time.perf_counter()
        file_crc32(path)
        from_file = (time.perf_counter() - start) / args.gib
        start = time.perf_counter()
        zlib.crc32(block)
        in_memory = (time.perf_counter() - start) / (len(block) / 2**30)
    finally:
        path.unlink()
    print(json.dumps({"seconds_per_gib_from_page_cache": round(from_file, 3),
                      "seconds_per_gib_in_memory": round(in_memory, 3),
                      "7b_checkpoint_gib": round(SEVEN_B_GIB, 1),
                      "7b_seconds_one_rank": round(from_file * SEVEN_B_GIB, 1),
                      "7b_seconds_8_ranks": round(from_file * SEVEN_B_GIB / 8, 1)}, indent=2))


if __name__ == "__main__":
    main()
