"""AlpacaEval 2: the pipeline end to end on files in the published format with a tiny local judge (its prompts
built and its verdicts parsed for real), the length-controlled win rate against alpaca-eval's own function,
resume of a half-judged run, an OpenAI-compatible endpoint judge (the key never reaches disk or output), and
the refusals (no judge, no alpaca-eval, judges mixed in compare)."""

from __future__ import annotations

import http.server
import json
import os
import random
import threading
import zlib
from pathlib import Path
from typing import ClassVar

import pytest

from megatron_sft.cli import main


def _alpaca_eval_importable() -> bool:
    from megatron_sft.evaluation.alpacaeval import alpaca_eval_package
    from megatron_sft.evaluation.graders import GraderUnavailable

    try:
        alpaca_eval_package()
    except GraderUnavailable:
        return False
    return True


if not _alpaca_eval_importable():
    message = "alpaca-eval is not installed (pip install alpaca-eval; .ci/run installs it with the dev extra)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

WORDS = [str(i) for i in range(100)] + list("abcdefghijkl")
N_ITEMS = 12


def write_alpaca_files(data_dir: Path, n: int = N_ITEMS) -> list[dict]:
    """alpaca_eval.json (a JSON list of instruction/output/generator/dataset) and df_gamed.csv (per "gamed"
    baseline and instruction: preference, std_delta_len, instruction_difficulty, not_gamed_baseline) as the
    tatsu-lab/alpaca_eval dataset publishes them, with made-up contents."""
    import pandas as pd

    rng = random.Random(0)
    folder = data_dir / "alpacaeval"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"dataset": "helpful_base", "instruction": " ".join(rng.choices(WORDS, k=6)),
             "output": " ".join(rng.choices(WORDS, k=rng.randint(2, 40))), "generator": "gpt4_1106_preview"}
            for _ in range(n)]
    (folder / "alpaca_eval.json").write_text(json.dumps(rows, indent=4))
    gamed = [{"model": model, "index": i, "preference": rng.random(), "std_delta_len": rng.gauss(0, 1),
              "instruction_difficulty": rng.gauss(0, 1), "not_gamed_baseline": False}
             for model in ("gamed_verbose", "gamed_concise") for i in range(n)]
    pd.DataFrame(gamed).to_csv(folder / "df_gamed.csv", index=False)
    return rows


def lc_by_alpaca_eval(annotations: list[dict], gamed: Path, monkeypatch) -> dict:
    """alpaca-eval's function called directly, its hub download answered by the local file."""
    from megatron_sft.evaluation.alpacaeval import alpaca_eval_package

    glm = alpaca_eval_package().metrics.glm_winrate
    monkeypatch.setattr(glm, "hf_hub_download", lambda **kwargs: str(gamed))
    return glm.get_length_controlled_winrate(annotations, save_weights_dir=None)


def verdict_judge(path: Path):
    """A tiny random judge that answers ``m`` (the output shown first): one residual dimension is kept positive
    (its embedding column set, nothing written to it by the layers) and only the ``m`` row of the output layer
    reads it. With alpaca-eval's order randomisation that is a win for the model on some items, a loss on others."""
    import torch
    from transformers import AutoTokenizer

    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    model = save_tiny_hf_model(path, variant="qwen2-untied-mha", config_overrides={"max_position_embeddings": 4096})
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("m"), 0] = 1.0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("alpacaeval")
    rows = write_alpaca_files(root / "data")
    save_tiny_hf_model(root / "model", config_overrides={"max_position_embeddings": 4096})
    return {"root": root, "data": root / "data", "model": root / "model", "rows": rows,
            "judge": verdict_judge(root / "judge")}


def eval_args(setup: dict, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(setup["model"]), "--benchmarks", "alpacaeval", "--out", str(out), "--backend", "hf",
            "--data-dir", str(setup["data"]), "--max-tokens", "8", "--chunk", "4", "--label", "tiny", *extra]


def annotations_from(out: Path, rows: list[dict], label: str = "tiny") -> list[dict]:
    generations = [json.loads(line) for line in (out / "alpacaeval" / "generations.jsonl").read_text().splitlines()]
    judged = {r["id"]: r for r in map(json.loads, (out / "alpacaeval" / "judgements.jsonl").read_text().splitlines())}
    answers = {g["id"]: g["samples"][0]["text"] for g in generations}
    return [{"instruction": row["instruction"], "output_1": row["output"], "output_2": answers[str(i)],
             "generator_1": row["generator"], "generator_2": label, "preference": judged[str(i)]["preference"]}
            for i, row in enumerate(rows)]


# ---- units -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, preference", [
    ("m", 1.0), ("M", 2.0), (" **M**\n", 2.0), ("`m`", 1.0), ("The best model is M.", 2.0), ("m m m", 1.0),
    ("m or M", None), ("I'm not sure", None), ("", None), ("w7 w7", None), ("Model: 5m", None),
])
def test_verdicts_are_parsed_or_counted_unparsed(text, preference):
    from megatron_sft.evaluation.judge import parse_verdict

    assert parse_verdict(text) == preference


def test_lc_win_rate_of_fixed_annotations_is_alpaca_evals(tmp_path, monkeypatch):
    from megatron_sft.evaluation.alpacaeval import winrates

    rows = write_alpaca_files(tmp_path)
    rng = random.Random(1)
    preferences = [1.0, 2.0, 2.0, 1.5, None, 1.0, 2.0, 1.0, 1.7, 2.0, 1.0, 1.2]
    annotations = [{"instruction": r["instruction"], "output_1": r["output"],
                    "output_2": " ".join(rng.choices(WORDS, k=rng.randint(1, 60))), "generator_1": r["generator"],
                    "generator_2": "model", "preference": p} for r, p in zip(rows, preferences)]
    ours = winrates(annotations, tmp_path / "alpacaeval" / "df_gamed.csv")
    theirs = lc_by_alpaca_eval(annotations, tmp_path / "alpacaeval" / "df_gamed.csv", monkeypatch)
    assert ours["length_controlled_winrate"] == pytest.approx(float(theirs["length_controlled_winrate"]), abs=1e-12)
    assert ours["win_rate"] == pytest.approx(float(theirs["win_rate"]), abs=1e-12)
    used = [p for p in preferences if p is not None]  # the raw win rate, by hand: P(model better), draws half
    assert ours["win_rate"] == pytest.approx(100 * sum(p - 1 for p in used) / len(used))
    assert ours["length_controlled_winrate"] != pytest.approx(ours["win_rate"], abs=0.01)  # the GLM did something


def test_without_a_judge_eval_refuses_in_one_line(setup, tmp_path, capsys):
    assert main(eval_args(setup, tmp_path / "o")) == 2
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "alpacaeval needs a judge" in printed[0]
    assert "--judge-model" in printed[0] and "--judge-url" in printed[0]
    assert not (tmp_path / "o").exists()


def test_missing_alpaca_eval_fails_early_saying_how_to_install(setup, tmp_path, monkeypatch, capsys):
    import sys

    from megatron_sft.evaluation import alpacaeval

    monkeypatch.setitem(sys.modules, "alpaca_eval", None)  # `import alpaca_eval` raises ImportError
    alpacaeval.alpaca_eval_package.cache_clear()
    try:
        assert main(eval_args(setup, tmp_path / "o", "--judge-model", str(setup["judge"]))) == 2
    finally:
        alpacaeval.alpaca_eval_package.cache_clear()
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "pip install alpaca-eval" in printed[0] and not (tmp_path / "o").exists()


# ---- end to end --------------------------------------------------------------------------------------------------

def test_local_judge_end_to_end_resume_and_compare(setup, tmp_path, capsys, monkeypatch):
    from megatron_sft.evaluation.alpacaeval import switched

    out = tmp_path / "run"
    judge = ["--judge-model", str(setup["judge"]), "--judge-backend", "hf", "--judge-max-tokens", "1"]
    assert main(eval_args(setup, out, *judge)) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "results.json").read_text())["benchmarks"]["alpacaeval"]
    judged = [json.loads(line) for line in (out / "alpacaeval" / "judgements.jsonl").read_text().splitlines()]
    assert [j["id"] for j in judged] == [str(i) for i in range(N_ITEMS)]
    flips = switched([row["instruction"] for row in setup["rows"]])
    assert any(flips) and not all(flips)  # alpaca-eval shows the model's answer first for some items only
    for record, flip in zip(judged, flips):  # the verdict read back through the swap: m = the output shown first
        assert record == {"id": record["id"], "swapped": flip, "preference": 2.0 if flip else 1.0, "status": "judged",
                          "text": "m"}
    assert metrics["judged"] == N_ITEMS and metrics["unparsed_verdicts"] == 0 and "0 unparsed" in printed
    assert metrics["n_wins"] == sum(flips) and metrics["n_wins_base"] == N_ITEMS - sum(flips)
    assert metrics["judge"] == f"judge (local: {setup['judge'].resolve()})" and metrics["judge_verdict"] == "discrete"
    expected = lc_by_alpaca_eval(annotations_from(out, setup["rows"]), setup["data"] / "alpacaeval" / "df_gamed.csv",
                                 monkeypatch)
    assert metrics["lc_win_rate"] == pytest.approx(expected["length_controlled_winrate"] / 100, abs=1e-12)
    assert metrics["accuracy"] == metrics["lc_win_rate"] and metrics["win_rate"] == pytest.approx(
        expected["win_rate"] / 100, abs=1e-12)

    # resume: half the judgements lost (a killed job) -> only the other half is judged again, with the same verdicts
    lines = (out / "alpacaeval" / "judgements.jsonl").read_text().splitlines(keepends=True)
    (out / "alpacaeval" / "judgements.jsonl").write_text("".join(lines[:N_ITEMS // 2]))
    generations = (out / "alpacaeval" / "generations.jsonl").read_bytes()
    assert main(eval_args(setup, out, *judge)) == 0
    assert f"judging {N_ITEMS - N_ITEMS // 2} answers" in capsys.readouterr().out
    assert (out / "alpacaeval" / "judgements.jsonl").read_text() == "".join(lines)
    assert (out / "alpacaeval" / "generations.jsonl").read_bytes() == generations  # answers not generated again
    assert json.loads((out / "results.json").read_text())["benchmarks"]["alpacaeval"] == metrics

    # another judge on the same answers: refused, naming what changed
    endpoint = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-name", "other"]
    assert main(eval_args(setup, out, *endpoint)) == 2
    assert "other judge settings" in capsys.readouterr().out

    # compare: the new column, the judge named under the table; runs of different judges are refused
    assert main(["compare", str(out), str(out), "--labels", "a,b", "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| run | AlpacaEval2 LC |" in table and "judged by judge (local:" in table
    other = json.loads((out / "results.json").read_text())
    other["benchmarks"]["alpacaeval"]["judge"] = "gpt-4-1106-preview @ https://api.openai.com/v1"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["compare", str(out), str(tmp_path / "other.json"), "--out", str(tmp_path / "cmp2")]) == 2
    assert "judged by different judges or against different references" in capsys.readouterr().out


def test_a_judge_without_usable_verdicts_fails_counting_them(setup, tmp_path, capsys):
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(tmp_path / "random-judge", variant="llama-tied-gqa", seed=3,
                       config_overrides={"max_position_embeddings": 4096})
    out = tmp_path / "run"
    judge = ["--judge-model", str(tmp_path / "random-judge"), "--judge-backend", "hf", "--judge-max-tokens", "2"]
    assert main(eval_args(setup, out, *judge)) == 2
    printed = capsys.readouterr().out
    judged = [json.loads(line) for line in (out / "alpacaeval" / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == N_ITEMS and {j["status"] for j in judged} == {"unparsed"} and all(j["text"] for j in judged)
    assert f"no usable verdict on {N_ITEMS} items ({N_ITEMS} unparsed" in printed


# ---- an OpenAI-compatible endpoint -----------------------------------------------------------------------------------

ANSWERS = ["M", "After careful thought, the best model is m.", "m or M, hard to say"]  # the last: unparsed


def reply_for(prompt: str) -> str:
    return ANSWERS[zlib.crc32(prompt.encode()) % 3]


class FakeEndpoint(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions answering by the prompt's length, a verdict or an undecided reply; 401 without the
    right key."""

    key = "sk-test-do-not-leak-1234"
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:  # http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            self._reply(401, {"error": {"message": "invalid api key"}})
            return
        FakeEndpoint.seen.append(body)
        user = body["messages"][-1]["content"]
        text = reply_for(user)
        self._reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_endpoint_judge_keeps_the_key_off_disk(setup, tmp_path, capsys, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = ["--judge-url", url, "--judge-name", "judge-7b", "--judge-api-key-env", "MY_JUDGE_KEY"]
    FakeEndpoint.seen = []
    try:
        monkeypatch.setenv("MY_JUDGE_KEY", "wrong")
        assert main(eval_args(setup, tmp_path / "refused", *judge)) == 2
        printed = capsys.readouterr().out
        assert "HTTP 401" in printed and "$MY_JUDGE_KEY" in printed and "wrong" not in printed.split("HTTP 401")[1]
        monkeypatch.setenv("MY_JUDGE_KEY", FakeEndpoint.key)
        out = tmp_path / "run"
        assert main(eval_args(setup, out, *judge, "--judge-workers", "3")) == 0
        printed = capsys.readouterr().out
    finally:
        server.shutdown()
    assert len(FakeEndpoint.seen) == N_ITEMS and {b["model"] for b in FakeEndpoint.seen} == {"judge-7b"}
    assert [m["role"] for m in FakeEndpoint.seen[0]["messages"]] == ["system", "user"]
    assert '"model_identifier": "M"' in FakeEndpoint.seen[0]["messages"][1]["content"]
    replies = [reply_for(body["messages"][-1]["content"]) for body in FakeEndpoint.seen]
    judged = [json.loads(line) for line in (out / "alpacaeval" / "judgements.jsonl").read_text().splitlines()]
    assert sorted(j["text"] for j in judged) == sorted(replies) and 0 < replies.count(ANSWERS[2]) < N_ITEMS
    for j in judged:
        verdict = {ANSWERS[0]: 2.0, ANSWERS[1]: 1.0}.get(j["text"])  # M = second shown, m = first shown
        assert j["preference"] == (None if verdict is None else 3.0 - verdict if j["swapped"] else verdict)
        assert j["status"] == ("unparsed" if verdict is None else "judged")
    metrics = json.loads((out / "results.json").read_text())["benchmarks"]["alpacaeval"]
    assert metrics["judge"] == f"judge-7b @ {url}" and metrics["unparsed_verdicts"] == replies.count(ANSWERS[2])
    assert f"{replies.count(ANSWERS[2])} unparsed" in printed
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and FakeEndpoint.key in p.read_text(errors="replace")]
    assert not leaked and FakeEndpoint.key not in printed


def test_sweep_submit_refuses_without_a_judge_before_submitting(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "scale", "--job-dir", "job"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_SFT_EVAL_ARGS"}
    env["PATH"] = f"{tmp_path / 'nothing'}:/usr/bin:/bin"  # no sbatch: any submission would fail differently
    done = subprocess.run(["bash", "job/submit.sh"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "alpacaeval needs a judge" in done.stderr and "sbatch" not in done.stderr
    env["MEGATRON_SFT_EVAL_ARGS"] = "--judge-url https://api.openai.com/v1 --judge-name gpt-4-1106-preview"
    done = subprocess.run(["bash", "job/submit.sh"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "alpacaeval needs a judge" not in done.stderr and "sbatch" in done.stderr
