"""lm-evaluation-harness (``lm_eval``) with TOVA on, through its CLI on the project's tiny
offline perplexity task (``docs/lm_eval/``): the ``vllm`` model with the budget in
``--model_args`` (JSON, so the nested ``additional_config`` passes as is), and the
``local-completions`` model against a TOVA ``vllm serve``.

Perplexity is read through prompt log-probabilities (``prompt_logprobs``; over HTTP,
``echo`` with ``logprobs``), so the budget acts only where the prompt itself is evicted:
``chunked`` prompt mode.  There, a budget that holds every text equals Hugging Face's
full-cache perplexity, and a small one changes it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_harness import VllmServer

TASK_DIR = Path(__file__).resolve().parents[1] / "docs" / "lm_eval"
# word_perplexity of a tiny random model is near float overflow; the byte metrics are not.
METRICS = ("byte_perplexity,none", "bits_per_byte,none")
ARCH = "llama_gqa"
CHUNKED = {"prompt_mode": "chunked", "prompt_chunk": 4}
MAX_MODEL_LEN = 256
HOLDS_ALL = 256  # C >= every text of the task (at most 128 tokens with BOS)
SMALL = 8


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The committed task, with its data path made absolute (the YAML's is repo-relative)."""
    out = tmp_path_factory.mktemp("lm_eval_task")
    (out / "tova_tiny.jsonl").write_bytes((TASK_DIR / "tova_tiny.jsonl").read_bytes())
    yaml = (TASK_DIR / "tova_tiny.yaml").read_text()
    (out / "tova_tiny.yaml").write_text(
        yaml.replace("docs/lm_eval/tova_tiny.jsonl", str(out / "tova_tiny.jsonl")))
    return out


def lm_eval_scores(model: str, model_args: dict, task_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model,
           "--model_args", json.dumps(model_args), "--include_path", str(task_dir),
           "--tasks", "tova_tiny", "--batch_size", "8", "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result_file,) = out.rglob("results_*.json")
    return json.loads(result_file.read_text())["results"]["tova_tiny"]


def vllm_args(model_dir, tova: dict) -> dict:
    return {"pretrained": str(model_dir), "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
            "enforce_eager": True, "seed": 0, "additional_config": {"tova": tova}}


@pytest.fixture(scope="module")
def reference_scores(tiny_models, task_dir, tmp_path_factory):
    """lm-eval's scores, each run once per module: ``"hf"`` (full cache), or a budget C
    for the in-process ``vllm`` model (chunked prompt mode)."""
    model = tiny_models[ARCH]
    done = {}

    def scores(run):
        if run not in done:
            out = tmp_path_factory.mktemp(f"lm_eval_{run}")
            if run == "hf":
                done[run] = lm_eval_scores("hf", {"pretrained": str(model), "dtype": "float32"},
                                           task_dir, out)
            else:
                done[run] = lm_eval_scores(
                    "vllm", vllm_args(model, {"cache_size": run, **CHUNKED}), task_dir, out)
        return done[run]

    return scores


def test_lm_eval_vllm_scores_follow_the_budget(reference_scores):
    full = reference_scores("hf")
    holds_all = reference_scores(HOLDS_ALL)
    small = reference_scores(SMALL)
    for metric in METRICS:
        assert math.isfinite(small[metric]) and small[metric] > 0, (metric, small)
        assert holds_all[metric] == pytest.approx(full[metric], rel=1e-4), metric
        assert small[metric] != pytest.approx(full[metric], rel=1e-3), metric


def local_completions_args(server: VllmServer, model_dir) -> dict:
    # add_bos_token: local-completions encodes a text without the tokenizer's special
    # tokens, the hf and vllm models with them; this tokenizer adds a BOS, so without it
    # the two would score different token streams (one BOS fewer after the prefix BOS).
    # max_length: lm-eval's rolling windows must fit the server's max_model_len.
    return {"model": "tiny", "base_url": f"{server.base_url}/v1/completions",
            "tokenizer": str(model_dir), "tokenizer_backend": "huggingface",
            "add_bos_token": True, "max_length": MAX_MODEL_LEN}


# lm-eval 0.4.13's loglikelihood request body is fixed (model, prompt, echo, logprobs,
# max_tokens 1, temperature, seed): no model_args reach it, so a per-request
# "tova_cache_size" cannot be sent and each budget needs its own server.
@pytest.mark.parametrize("cache_size", [HOLDS_ALL, SMALL])
def test_lm_eval_local_completions_against_tova_server(cache_size, tiny_models, task_dir,
                                                       reference_scores, tmp_path):
    model = tiny_models[ARCH]
    server = VllmServer.start(
        model, ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                "--seed", "0", "--served-model-name", "tiny", "--additional-config",
                json.dumps({"tova": {"cache_size": cache_size, **CHUNKED}})],
        tmp_path / "server.log",
        env_updates={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    try:
        server.wait_healthy(timeout=240)
        served = lm_eval_scores("local-completions", local_completions_args(server, model),
                                task_dir, tmp_path / "lm_eval")
    finally:
        server.stop()
    full = reference_scores("hf")
    for metric in METRICS:
        assert math.isfinite(served[metric]) and served[metric] > 0, (metric, served)
        if cache_size == HOLDS_ALL:
            assert served[metric] == pytest.approx(full[metric], rel=1e-5), metric
        else:
            # The same engine in-process, same budget: the server must score as it does.
            assert served[metric] == pytest.approx(reference_scores(SMALL)[metric],
                                                   rel=1e-6), metric
            assert served[metric] != pytest.approx(full[metric], rel=1e-3), metric
