"""Tensor parallelism: each rank holds half of the query heads, the score is all-reduced
over the TP group before selection, so every rank keeps the same tokens and TP=2 equals
the reference (which averages over all heads at once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from engine_harness import random_prompts
from tova_vllm.reference import generate as reference_generate

SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, prompts, cache_size = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=model, dtype="float32", max_model_len=1024, block_size=32,
                  max_num_batched_tokens=64, enforce_eager=True, seed=0,
                  tensor_parallel_size=2, distributed_executor_backend="mp",
                  additional_config={"tova": {"cache_size": cache_size}})
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def test_tp2_equals_reference(tiny_models, hf_models, tmp_path):
    arch, cache_size = "llama_gqa", 24  # 8 query heads, 2 KV heads: 4 + 1 per rank
    prompts = [list(p) for p in random_prompts((10, 60, 150), seed=5)]
    script = tmp_path / "tp2.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_models[arch]), json.dumps(prompts), str(cache_size)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    expected = [reference_generate(hf_models[arch], p, cache_size=cache_size,
                                   max_new_tokens=20).token_ids for p in prompts]
    assert got == expected
