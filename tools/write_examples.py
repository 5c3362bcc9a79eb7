"""Regenerate examples/DATASET/MODEL.yaml from megatron_sft/recipes (tests check that they are in sync).

    python tools/write_examples.py [examples]
"""

import sys
from pathlib import Path

from megatron_sft.recipes.examples import write_examples

if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "examples")
    for path in write_examples(root):
        print(path)
