"""Every `megatron-sft` command the README shows, run as written from top to bottom in a fresh working
directory that holds only the demo's output (issue 23): each exits 0, or fails with one line (the error the
README promises for a missing model, data set, GPU or cluster), never a traceback. Slow: it runs the demo and a
training run. Hub downloads are switched off (HF_HUB_OFFLINE), and commands that would reach a network address
outside loopback (an OpenAI-compatible judge URL) are only checked to parse."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The `megatron-sft ...` lines of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            words = shlex.split(line) if line and not line.startswith("#") else []
            if words and (words[0] == "megatron-sft" or (words[0].endswith("=...") and "megatron-sft" in words)):
                commands.append(line)
    return commands


def _run(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "megatron_sft", *words], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def test_the_readme_lists_the_commands_a_user_runs():
    commands = readme_commands()
    assert len(commands) >= 20
    assert any(" --nproc 2 output_dir=" in c for c in commands)  # flags and overrides in any order


def test_every_readme_command_exits_0_or_fails_with_one_line(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # as in a clone: the commands name examples/...
    demo = _run(["demo", "--out", "runs/demo", "--overwrite"], tmp_path)  # the quick start's first command
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    failures = []
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] != "megatron-sft":  # KEY=... megatron-sft ...: a remote judge; only its parsing is checked
            words = words[words.index("megatron-sft"):] + ["--help"]
        done = _run(words[1:], tmp_path)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        if done.returncode != 0 and ("Traceback" in done.stdout + done.stderr or not lines or
                                     not any("error" in line.lower() for line in lines[-1:])):
            failures.append(f"{command}\n  exit {done.returncode}: " + "\n  ".join(lines[-8:]))
    assert not failures, "\n\n".join(failures)
