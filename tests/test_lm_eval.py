"""lm-evaluation-harness (``lm_eval``) with TOVA on: the CLI, its ``vllm`` model with the
budget in ``--model_args`` (JSON, so the nested ``additional_config`` passes as is), on the
project's tiny offline perplexity task (``docs/lm_eval/``).

Perplexity is read through ``prompt_logprobs``, so the budget acts only where the prompt
itself is evicted: ``chunked`` prompt mode.  There, a budget that holds every text equals
Hugging Face's full-cache perplexity, and a small one changes it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TASK_DIR = Path(__file__).resolve().parents[1] / "docs" / "lm_eval"
# word_perplexity of a tiny random model is near float overflow; the byte metrics are not.
METRICS = ("byte_perplexity,none", "bits_per_byte,none")
ARCH = "llama_gqa"


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
    return {"pretrained": str(model_dir), "dtype": "float32", "max_model_len": 256,
            "enforce_eager": True, "seed": 0, "additional_config": {"tova": tova}}


def test_lm_eval_vllm_scores_follow_the_budget(tiny_models, task_dir, tmp_path):
    model = tiny_models[ARCH]
    full = lm_eval_scores("hf", {"pretrained": str(model), "dtype": "float32"}, task_dir,
                          tmp_path / "hf")
    chunked = {"prompt_mode": "chunked", "prompt_chunk": 4}
    holds_all = lm_eval_scores("vllm", vllm_args(model, {"cache_size": 256, **chunked}),
                               task_dir, tmp_path / "c256")
    small = lm_eval_scores("vllm", vllm_args(model, {"cache_size": 8, **chunked}),
                           task_dir, tmp_path / "c8")
    for metric in METRICS:
        assert math.isfinite(small[metric]) and small[metric] > 0, (metric, small)
        assert holds_all[metric] == pytest.approx(full[metric], rel=1e-4), metric
        assert small[metric] != pytest.approx(full[metric], rel=1e-3), metric
