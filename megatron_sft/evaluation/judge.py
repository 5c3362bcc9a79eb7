"""The LLM judge of AlpacaEval 2: alpaca-eval's own prompt, a judge the user chooses, verdicts parsed robustly.

The prompt is alpaca-eval's ``alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt`` (the one its AlpacaEval 2
annotator ``weighted_alpaca_eval_gpt4_turbo`` sends), filled and split into chat messages by alpaca-eval's
``make_prompts`` / ``prompt_to_chatml``: the instruction and two outputs named ``m`` (shown first) and ``M``;
the judge answers with the identifier of the better one. Judges:

- ``LocalJudge``: an HF model directory run by the generation backends (vLLM, or transformers on CPU), its chat
  template, greedy decoding; prompts longer than its context are not sent (status ``too_long``).
- ``EndpointJudge``: an OpenAI-compatible ``/chat/completions`` endpoint; the API key is read from the
  environment variable the user names, sent only in the Authorization header and scrubbed from error messages.
  With ``logprobs`` the verdict is weighted by the probabilities of ``m`` and ``M`` (alpaca-eval's
  ``logprob_parser``), as AlpacaEval 2's own annotator does.

A verdict that names neither or both identifiers is ``unparsed``: counted, never guessed.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from megatron_sft.evaluation.graders import GraderUnavailable

TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"  # under alpaca_eval/evaluators_configs/
IDENTIFIERS = {"m": 1.0, "M": 2.0}  # the template's names: m = the output shown first
_IDENTIFIER = re.compile(r"(?<![\w'’])([mM])(?![\w'’])")
RETRIES = 5
BACKOFF_S = 2.0  # doubled per retry of a rate-limited or failing request


class JudgeUnavailable(GraderUnavailable):
    """The judge cannot give verdicts (endpoint refusing or down, model not loadable): nothing scores 0 silently;
    the judgements so far are saved and a rerun resumes."""


@dataclass
class Verdict:
    preference: Optional[float]  # 1.0: the output shown first is better, 2.0: the second; None: no usable verdict
    text: str  # what the judge answered (cut to 300 characters)
    status: str  # judged | unparsed | too_long


def parse_verdict(text: str) -> Optional[float]:
    """1.0 / 2.0 for a verdict naming exactly one identifier (``M``, ``**m**``, ``The best model is M.``,
    ``m m m``), None when it names neither or both (``m or M``) or only inside words (``I'm``)."""
    cleaned = text.strip().strip("`*\"'.:;!# \n")
    if cleaned in IDENTIFIERS:
        return IDENTIFIERS[cleaned]
    found = {match.group(1) for match in _IDENTIFIER.finditer(text)}
    return IDENTIFIERS[found.pop()] if len(found) == 1 else None


def judge_messages(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    """alpaca-eval's AlpacaEval 2 judge prompt for one pair, as chat messages (system, user)."""
    from megatron_sft.evaluation.alpacaeval import alpaca_eval_package

    package = alpaca_eval_package()
    import pandas as pd

    template = (Path(package.__file__).parent / "evaluators_configs" / TEMPLATE).read_text(encoding="utf-8")
    frame = pd.DataFrame([{"instruction": instruction, "output_1": first, "output_2": second}])
    prompts, _ = package.utils.make_prompts(frame, template)
    return package.utils.prompt_to_chatml(prompts[0])


class Judge(Protocol):
    def verdicts(self, conversations: list[list[dict]], seeds: list[int]) -> list[Verdict]: ...

    def close(self) -> None: ...


class LocalJudge:
    """A local HF model as the judge, through ``backends`` (vLLM or transformers), greedy."""

    def __init__(self, model_dir: str, backend: str, max_tokens: int, engine: dict[str, Any]):
        from transformers import AutoConfig, AutoTokenizer

        from megatron_sft.evaluation.backends import Sampling, make_backend

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_config = AutoConfig.from_pretrained(model_dir)
        self.context = getattr(model_config, "max_position_embeddings", None) or 10**9
        self.sampling = Sampling(1, 0.0, 1.0, max_tokens)
        self.backend = make_backend(backend, model_dir, **engine)

    def verdicts(self, conversations: list[list[dict]], seeds: list[int]) -> list[Verdict]:
        from megatron_sft.evaluation.prompts import encode, render

        ids = []
        for messages in conversations:
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            user = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
            ids.append(encode(self.tokenizer, render(self.tokenizer, user, system, "chat"), "chat"))
        fits = [i for i, prompt in enumerate(ids) if len(prompt) + self.sampling.max_tokens <= self.context]
        out = [Verdict(None, "", "too_long") for _ in conversations]
        if fits:
            replies = self.backend.generate([ids[i] for i in fits], self.sampling, [seeds[i] for i in fits])
            for i, reply in zip(fits, replies):
                text = reply[0].text
                preference = parse_verdict(text)
                out[i] = Verdict(preference, text[:300], "judged" if preference is not None else "unparsed")
        return out

    def close(self) -> None:
        self.backend.close()


class EndpointJudge:
    """An OpenAI-compatible chat endpoint as the judge; requests in ``workers`` threads, retried with backoff."""

    def __init__(self, url: str, model: str, key_env: str, max_tokens: int, workers: int, logprobs: bool,
                 timeout_s: float = 120.0):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.key_env, self.workers, self.logprobs, self.timeout_s = model, key_env, workers, logprobs, timeout_s
        self.max_tokens = 1 if logprobs else max_tokens  # a weighted verdict reads the first token's logprobs
        self._key = os.environ.get(key_env) if key_env else None  # kept in memory only
        if key_env and not self._key:
            print(f"judge: ${key_env} is not set; calling {self.url} without an API key")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _request(self, messages: list[dict]) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "temperature": 0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=5)
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        problem = ""
        for attempt in range(RETRIES):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = self._scrub(err.read().decode("utf-8", "replace")[:200].replace("\n", " "))
                if err.code in (401, 403):
                    raise JudgeUnavailable(f"judge endpoint {self.url} refused the request (HTTP {err.code}: "
                                           f"{detail}); check the API key in ${self.key_env} "
                                           "(--judge-api-key-env names the variable)") from None
                if err.code != 429 and err.code < 500:
                    raise JudgeUnavailable(f"judge endpoint {self.url} answered HTTP {err.code}: {detail} "
                                           f"(is --judge-name {self.model!r} served there?)") from None
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as err:
                problem = self._scrub(f"{type(err).__name__}: {err}")
            time.sleep(BACKOFF_S * 2**attempt)
        raise JudgeUnavailable(f"judge endpoint {self.url} failed {RETRIES} times ({problem}); the judgements so far "
                               "are saved: rerun to resume")

    def _verdict(self, messages: list[dict]) -> Verdict:
        answer = self._request(messages)
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeUnavailable(f"judge endpoint {self.url} answered without choices[0].message: "
                                   f"{self._scrub(json.dumps(answer)[:200])}") from None
        preference = self._weighted(choice) if self.logprobs else parse_verdict(text)
        return Verdict(preference, text[:300], "judged" if preference is not None else "unparsed")

    def _weighted(self, choice: dict) -> Optional[float]:
        """alpaca-eval's logprob_parser: 2 - P(m) / (P(m) + P(M)) over the first token's top logprobs."""
        from megatron_sft.evaluation.alpacaeval import alpaca_eval_package

        if not (choice.get("logprobs") or {}).get("content"):
            raise JudgeUnavailable(f"judge endpoint {self.url} returned no logprobs; drop --judge-logprobs or serve "
                                   "a model that returns them")
        parser = alpaca_eval_package().completion_parsers.logprob_parser
        value = parser(choice, numerator_token="m", denominator_tokens=["m", "M"], is_binarize=False)[0]
        return None if value is None or math.isnan(value) else float(value)

    def verdicts(self, conversations: list[list[dict]], seeds: list[int]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._verdict, conversations))

    def close(self) -> None:
        pass


def judge_identity(config: Any) -> dict[str, Any]:
    """What the judgements depend on and what results.json names: never the API key."""
    if config.judge_model:
        path = Path(config.judge_model).resolve()
        return {"judge": f"{path.name} (local: {path})", "verdict": "discrete", "template": TEMPLATE,
                "judge_max_tokens": config.judge_max_tokens}
    verdict = "logprob-weighted" if config.judge_logprobs else "discrete"
    return {"judge": f"{config.judge_name} @ {config.judge_url}", "verdict": verdict, "template": TEMPLATE,
            "judge_max_tokens": 1 if config.judge_logprobs else config.judge_max_tokens}


def make_judge(config: Any) -> Judge:
    """The judge the flags choose (``check_judge_config`` has validated them)."""
    if config.judge_url:
        return EndpointJudge(config.judge_url, config.judge_name, config.judge_api_key_env, config.judge_max_tokens,
                             config.judge_workers, config.judge_logprobs)
    engine = dict(batch_size=config.batch_size, tensor_parallel=config.judge_tensor_parallel or config.tensor_parallel,
                  data_parallel=config.data_parallel, gpu_memory_utilization=config.gpu_memory_utilization,
                  dtype=config.dtype, enforce_eager=config.enforce_eager, kv_cache_gib=config.kv_cache_gib)
    try:
        return LocalJudge(config.judge_model, config.judge_backend, config.judge_max_tokens, engine)
    except (OSError, ValueError) as err:
        raise JudgeUnavailable(f"--judge-model {config.judge_model}: cannot load it ({err})") from None
