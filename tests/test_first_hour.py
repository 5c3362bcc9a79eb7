"""Issue 23, items 1, 4 and 5 (a newcomer's first hour), mostly through the CLI in a subprocess:

1. errors known before the workers start are found before they start, as one line and exit 2: a run directory
   with checkpoints without --resume (the demo's old re-run hint), a layout that does not fit the process count,
   an optional package the config asks for that does not import; the demo's re-run hint works;
2. (item 4) --resume of a completed run says so in one line and exits 0 without touching a file, on every rank
   the same; a config that asks for more steps still continues the run;
3. (item 5) eval counts prompts longer than the context as their own outcome, printed with the fix, and the
   default label of an export (RUN/hf) is the run's name, in eval and in compare.

One real training run (2 steps, one process) is shared by the tests of items 1 and 4.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sft.testing.train_check import make_tiny_run_inputs, tiny_cli_args

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_sft", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = _lines(done)
    assert len(lines) == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return lines[0]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root with its size, mtime and content hash."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, digest)
    return out


def _shadow(root: Path, modules: list[str]) -> dict:
    """An environment in which ``modules`` fail to import (as when the package is not installed)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in modules:
        (root / f"{name}.py").write_text(f'raise ImportError("No module named {name!r}")\n')
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    ckpt, data = make_tiny_run_inputs(root, layers=2)
    return root, ckpt, data


def _args(tiny, out: Path, *extra: str) -> list[str]:
    _, ckpt, data = tiny
    return tiny_cli_args(ckpt, data, out, "train.epochs=1", "train.max_steps=2", "log.tensorboard=false", *extra)


@pytest.fixture(scope="module")
def completed(tiny):
    """A finished 2-step run (one process): checkpoints, config.yaml, metrics.jsonl and COMPLETED."""
    out = tiny[0] / "completed"
    done = _cli("train", *_args(tiny, out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((out / "COMPLETED").read_text())["steps"] == 2
    return out


# item 1: refused before any worker starts ------------------------------------------------------------------------


def _refusal(tiny, completed: Path, tmp: Path, case: str) -> tuple[list[str], dict | None, list[str]]:
    """(train arguments, environment, what the one line must say) for each error known before the start."""
    if case == "existing_checkpoints":  # the demo's old hint: same config, same output_dir, no --resume
        return (_args(tiny, completed) + ["--nproc", "2"], None,
                [f"{completed} already has checkpoints (latest: step_0000002)", "pass --resume",
                 f"output_dir={completed}2"])
    if case == "tp_without_processes":
        return (_args(tiny, tmp / "out", "parallel.tensor=2"), None,
                ["1 process (no --nproc) is not a multiple of parallel.tensor x parallel.pipeline = 2", "--nproc 2"])
    if case == "batch_vs_data_parallel":
        return (_args(tiny, tmp / "out", "train.global_batch_size=6") + ["--nproc", "2"], None,
                ["train.global_batch_size 6 must be a multiple of train.micro_batch_size (2) x data-parallel size (2"])
    if case == "wandb_missing":
        return (_args(tiny, tmp / "out", "log.wandb=true") + ["--nproc", "2"], _shadow(tmp / "shadow", ["wandb"]),
                ["log.wandb=true but wandb does not import", "pip install 'megatron-sft[wandb]'", "log.wandb=false"])
    if case == "tensorboard_missing":
        return (_args(tiny, tmp / "out", "log.tensorboard=true"), _shadow(tmp / "shadow", ["tensorboard"]),
                ["log.tensorboard=true but tensorboard does not import", "pip install tensorboard"])
    raise ValueError(case)


REFUSALS = ["existing_checkpoints", "tp_without_processes", "batch_vs_data_parallel", "wandb_missing",
            "tensorboard_missing"]


@pytest.mark.parametrize("case", REFUSALS)
def test_known_errors_are_one_line_and_exit_2_through_the_cli(tiny, completed, tmp_path, case):
    args, env, expected = _refusal(tiny, completed, tmp_path, case)
    before = _snapshot(completed)
    done = _cli("train", *args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    line = _one_line(done)
    assert line.startswith("megatron-sft train: error: "), line
    for words in expected:
        assert words in line, line
    assert "[rank" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()  # nothing written: no worker reached the output directory
    assert _snapshot(completed) == before


@pytest.mark.parametrize("case", REFUSALS)
def test_known_errors_stop_before_any_worker_or_trainer_starts(tiny, completed, tmp_path, case, monkeypatch):
    """The same refusals in-process, with worker start-up and the in-process trainer made to fail loudly."""
    import megatron_sft.launch
    import megatron_sft.train.entry as entry
    from megatron_sft.config import ConfigError, load_config

    args, env, expected = _refusal(tiny, completed, tmp_path, case)
    for name in ("wandb", "tensorboard"):
        if env is not None and (tmp_path / "shadow" / f"{name}.py").exists():
            monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    nproc = int(args[args.index("--nproc") + 1]) if "--nproc" in args else None
    overrides = [a for a in args if "=" in a]

    def started(*_args, **_kwargs):
        raise AssertionError("a worker (or the trainer) started")

    monkeypatch.setattr(megatron_sft.launch, "run_local_workers", started)
    monkeypatch.setattr(entry, "train_worker", started)
    with pytest.raises(ConfigError) as err:
        entry.launch_training(load_config(None, overrides), nproc=nproc)
    assert expected[0] in str(err.value)


@pytest.mark.parametrize("state", ["none", "empty_dir", "latest", "latest_is_a_dir", "steps_without_latest",
                                   "unfinished_save_only"])
def test_existing_checkpoint_check_agrees_with_the_trainer(tmp_path, state):
    """preflight refuses exactly the directories the trainer refuses (trainer._resume_checkpoint), with
    the same words."""
    from megatron_sft.config import ConfigError, load_config
    from megatron_sft.train.preflight import check_existing_checkpoints
    from megatron_sft.train.trainer import _resume_checkpoint

    checkpoints = tmp_path / "run" / "checkpoints"
    if state != "none":
        checkpoints.mkdir(parents=True)
    if state == "latest":
        (checkpoints / "latest").write_text("step_0000004\n")
    if state == "latest_is_a_dir":
        (checkpoints / "latest").mkdir()
    if state == "steps_without_latest":
        (checkpoints / "step_0000004").mkdir()
    if state == "unfinished_save_only":
        (checkpoints / ".step_0000004.tmp").mkdir()
    config = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.checkpoint=x", "data.train=y.jsonl"])
    trainer_refuses = preflight_refuses = None
    try:
        _resume_checkpoint(config, resume=False, main=False)
    except ConfigError as err:
        trainer_refuses = str(err)
    try:
        check_existing_checkpoints(config, resume=False)
    except ConfigError as err:
        preflight_refuses = str(err)
    assert (trainer_refuses is None) == (preflight_refuses is None) == (state != "latest")
    if trainer_refuses is not None:
        assert preflight_refuses.startswith(trainer_refuses), (preflight_refuses, trainer_refuses)
    check_existing_checkpoints(config, resume=True)  # --resume is never refused here


def test_demo_rerun_hint_is_accepted(tmp_path):
    """The command in the header of the demo's config.yaml parses and passes the start-up checks on a
    directory whose first run left checkpoints (the old hint, without the output_dir override, did not)."""
    from megatron_sft.cli import build_parser
    from megatron_sft.config import ConfigError, load_config
    from megatron_sft.demo import DEMO_CONFIG
    from megatron_sft.train.preflight import check_existing_checkpoints, check_layout, process_count

    demo = tmp_path / "demo"
    (demo / "run" / "checkpoints").mkdir(parents=True)
    (demo / "run" / "checkpoints" / "latest").write_text("step_0000032\n")
    (demo / "config.yaml").write_text(DEMO_CONFIG.format(
        output_dir=demo / "run", checkpoint=demo / "ckpt", train=demo / "train.jsonl", eval=demo / "eval.jsonl", tp=2,
        objective="p", epochs=4))
    header = [line.lstrip("# ").strip() for line in (demo / "config.yaml").read_text().splitlines()
              if line.startswith("#") and "megatron-sft train" in line]
    assert len(header) == 1, header
    argv = shlex.split(header[0][header[0].index("megatron-sft train"):])[1:]
    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    assert Path(config.output_dir) != demo / "run"
    check_existing_checkpoints(config, resume=args.resume)  # not refused
    with pytest.raises(ConfigError, match="already has checkpoints"):  # the old hint would be
        check_existing_checkpoints(load_config(args.config, []), resume=False)
    from megatron_sft.model.args import ModelArgs

    tiny_args = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=100, hidden_size=128, ffn_hidden_size=256,
                          num_layers=4, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                          max_position_embeddings=64, norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
                          rope_theta=1e4, padded_vocab_size=128)
    check_layout(tiny_args, config, *process_count(args.nproc))  # the hint's --nproc fits the demo's TP


@pytest.mark.slow
def test_demo_prints_a_rerun_command_that_trains(tmp_path):
    """The real demo (small), then the command its last line prints: a second run that finishes."""
    out = tmp_path / "demo"
    done = _cli("demo", "--out", str(out), "--base-steps", "30", "--epochs", "1", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    hint = [line for line in done.stdout.splitlines() if "megatron-sft train" in line][-1]
    argv = shlex.split(hint[hint.index("megatron-sft train"):])[1:]
    again = _cli(*argv, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (out / "run2" / "COMPLETED").is_file()


# item 4: --resume of a completed run --------------------------------------------------------------------------


def test_resume_of_a_completed_run_says_so_and_touches_nothing(tiny, completed):
    before = _snapshot(completed)
    summary = json.loads((completed / "COMPLETED").read_text())
    done = _cli("train", *_args(tiny, completed), "--nproc", "2", "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    line = _one_line(done)
    assert f"{completed} has already completed (2 steps, loss {summary['first_loss']:.4f} -> " \
           f"{summary['last_loss']:.4f}" in line, line
    assert "nothing to do" in line and "train.max_steps" in line, line
    assert _snapshot(completed) == before


@pytest.mark.slow  # ~30 s on 2 busy cores; the agreement itself is tested below without torchrun
def test_resume_of_a_completed_run_under_torchrun_is_one_line_from_every_rank(tiny, completed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(completed, run)
    before = _snapshot(run)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "megatron_sft", "train", *_args(tiny, run), "--resume"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    said = [line for line in _lines(done) if "has already completed" in line]
    assert len(said) == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert _snapshot(run) == before


def _agreement_worker(cases: list[list[str]]) -> list:
    """Per case, rank r sees the run directory case[r]; every rank must return rank 0's decision. A completed
    decision closes the process group, so it can only be the last case."""
    import torch.distributed as dist

    from megatron_sft.config import load_config
    from megatron_sft.train.completed_run import agreed_completed_summary

    decisions = []
    for dirs in cases:
        config = load_config(None, [f"output_dir={dirs[dist.get_rank()]}", "model.checkpoint=x", "data.train=y.jsonl",
                                    "train.epochs=1", "train.max_steps=2"])
        summary = agreed_completed_summary(config, resume=True, collective=True)
        decisions.append(None if summary is None else summary["steps"])
    return decisions


def test_every_rank_takes_rank_0s_decision(completed, tmp_path):
    from megatron_sft.launch import run_local_workers

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    cases = [[str(unfinished), str(completed)], [str(completed), str(unfinished)]]
    assert run_local_workers(_agreement_worker, 2, cases, timeout_s=300) == [[None, 2], [None, 2]]


@pytest.mark.parametrize("overrides, saved, more", [
    ([], {"epochs": 1, "max_steps": 2}, False),  # the same config: nothing to do
    (["train.max_steps=2"], {"epochs": 1, "max_steps": 2}, False),
    (["train.max_steps=3"], {"epochs": 1, "max_steps": 2}, True),  # a higher limit: continue
    (["train.epochs=2"], {"epochs": 1, "max_steps": None}, True),  # more epochs: continue
    (["train.epochs=1"], {"epochs": 1, "max_steps": 2}, True),  # the limit that stopped the run is lifted
    (["train.epochs=1"], {"epochs": 1, "max_steps": 50}, False),  # a limit that never bit, lifted
    (["train.epochs=1", "optim.lr=1e-4"], {"epochs": 1, "max_steps": None}, False),  # other keys: still done
])
def test_which_configs_ask_a_completed_run_for_more_steps(tmp_path, overrides, saved, more):
    from megatron_sft.config import load_config
    from megatron_sft.train.completed_run import asks_for_more_steps

    base = [f"output_dir={tmp_path}", "model.checkpoint=x", "data.train=y.jsonl"]
    base += [] if any(o.startswith("train.") for o in overrides) else ["train.epochs=1", "train.max_steps=2"]
    assert asks_for_more_steps(load_config(None, base + overrides), saved, steps_done=2) is more


def test_resume_with_more_steps_continues_a_completed_run(tiny, completed, tmp_path):
    """A larger train.max_steps: the run goes on from its checkpoint and COMPLETED holds the new summary."""
    run = tmp_path / "run"
    shutil.copytree(completed, run)
    done = _cli("train", *_args(tiny, run, "train.max_steps=3"), "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from step_0000002" in done.stdout + done.stderr
    summary = json.loads((run / "COMPLETED").read_text())
    assert summary["steps"] == 3 and summary["last_loss"] is not None


# item 5: eval outcomes and labels ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_context_export(tmp_path_factory):
    """A tiny model saved as an export, RUN/hf, with a 48-token context (math500's prompts do not fit)."""
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    path = tmp_path_factory.mktemp("eval") / "math-neg_p" / "hf"
    save_tiny_hf_model(path, config_overrides={"max_position_embeddings": 48})
    return path


def _eval(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("eval", "--backend", "hf", "--model", str(model), "--benchmarks", "math500", "--limit", "2",
                "--max-tokens", "2", "--grader-workers", "1", "--out", str(out), *extra)


def test_prompts_longer_than_the_context_are_their_own_outcome(short_context_export, tmp_path):
    out = tmp_path / "eval"
    done = _eval(short_context_export, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no answer 0%, truncated 0%, prompt longer than the context 100%" in done.stdout, done.stdout
    advice = [line for line in done.stdout.splitlines() if "are longer than the context" in line]
    assert len(advice) == 1, done.stdout
    assert "2 of 2 prompts (100%) are longer than the context of 48 tokens" in advice[0]
    assert "use a model with a longer context" in advice[0] and "--template plain" in advice[0]
    metrics = json.loads((out / "results.json").read_text())["benchmarks"]["math500"]
    assert metrics["prompt_too_long"] == 1.0 and metrics["no_answer"] == 0 and metrics["truncated"] == 0
    for line in (out / "math500" / "generations.jsonl").read_text().splitlines():
        for sample in json.loads(line)["samples"]:
            assert sample["prompt_too_long"] is True and sample["prompt_tokens"] >= 48 and sample["score"] == 0
    assert json.loads((out / "results.json").read_text())["label"] == "math-neg_p"  # RUN/hf: the run's name
    assert "| math-neg_p |" in (out / "results.md").read_text()


def test_a_lowered_max_model_len_is_named_as_the_fix(short_context_export, tmp_path):
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    model = tmp_path / "long_context"
    save_tiny_hf_model(model, config_overrides={"max_position_embeddings": 4096})
    done = _eval(model, tmp_path / "eval", "--max-model-len", "40")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "raise --max-model-len (now 40; the model allows 4096)" in done.stdout, done.stdout
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["label"] == "long_context"


def test_outcome_fractions_keep_the_three_apart():
    from megatron_sft.evaluation.prompt_fit import outcome_fractions, too_long_fields

    samples = [{"pred": None, "finished": False, **too_long_fields(90, 64)},  # prompt too long
               {"pred": None, "finished": False, "note": "prompt of 80 tokens does not fit the context of 64"},  # old
               {"pred": None, "finished": False},  # cut at --max-tokens without an answer
               {"pred": "3", "finished": True}]
    assert outcome_fractions(samples) == {"no_answer": 0.25, "truncated": 0.25, "prompt_too_long": 0.5}


def test_default_label_is_the_run_for_an_export(short_context_export, tmp_path):
    from megatron_sft.evaluation.tables import default_label

    assert default_label(short_context_export) == "math-neg_p"
    assert default_label(f"{short_context_export}/") == "math-neg_p"
    assert default_label(tmp_path / "Qwen2.5-Math-1.5B") == "Qwen2.5-Math-1.5B"


def test_compare_names_rows_after_their_runs(tmp_path):
    """Results written before the new default (label "hf") are named after their run; repeated names get
    their eval directory's name; --labels still wins."""
    paths = []
    for run, eval_dir in (("math-nll", "eval"), ("math-neg_p", "eval"), ("math-neg_p", "eval-t06")):
        folder = tmp_path / "runs" / run / eval_dir
        folder.mkdir(parents=True)
        results = {"model": str(tmp_path / "runs" / run / "hf"), "label": "hf", "config": {"label": ""},
                   "benchmarks": {"math500": {"title": "MATH500", "domain": "math", "accuracy": 0.5}}}
        (folder / "results.json").write_text(json.dumps(results))
        paths.append(str(folder))
    done = _cli("compare", *paths, "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| math-nll |" in table and "| math-neg_p (eval) |" in table and "| math-neg_p (eval-t06) |" in table
    assert "| hf |" not in table
    done = _cli("compare", *paths, "--labels", "a,b,c", "--out", str(tmp_path / "cmp2"))
    assert done.returncode == 0 and "| b |" in (tmp_path / "cmp2" / "compare.md").read_text()
