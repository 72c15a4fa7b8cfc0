"""``vllm bench throughput`` (vLLM's offline benchmark) runs with TOVA on and reports."""

from __future__ import annotations

import json
import os
import subprocess

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, CACHE_SIZE = 8, 48, 32, 32


def test_vllm_bench_throughput_with_tova(tiny_models, tmp_path):
    result_file = tmp_path / "throughput.json"
    cmd = ["vllm", "bench", "throughput", "--model", str(tiny_models["llama_gqa"]),
           "--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
           "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS),
           "--dtype", "float32", "--max-model-len", "256", "--block-size", "32",
           "--num-gpu-blocks-override", "12", "--enforce-eager", "--seed", "0",
           "--additional-config", json.dumps({"tova": {"cache_size": CACHE_SIZE}}),
           "--output-json", str(result_file)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Throughput:" in proc.stdout
    result = json.loads(result_file.read_text())
    assert result["num_requests"] == NUM_PROMPTS and result["tokens_per_second"] > 0
    startup = [line for line in log.splitlines() if "tova-vllm: TOVA enabled" in line]
    assert len(startup) == 1 and f"cache_size={CACHE_SIZE}" in startup[0], startup
