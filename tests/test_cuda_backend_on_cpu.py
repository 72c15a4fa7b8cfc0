"""TOVA's CUDA backend (``engine/cuda_backend.py``) inside a real vLLM engine, on CPU.

vLLM's CUDA build cannot be installed here, so ``flash_attn_on_cpu`` swaps only the two
compiled FlashAttention ops for plain-torch versions of their contracts; vLLM's
FlashAttention builder, metadata, KV layout and impl run as they are, under TOVA's builder
mixin, phase loop, LSE request and ``PagedEvictor``.  Outputs must equal the plain-PyTorch
reference (``tova_vllm.reference``), as the CPU backend's do in ``test_engine*.py``.

What this does not prove: the real FlashAttention kernels' behaviour (their LSE layout is
taken from vLLM's own uses of it), CUDA streams and speed.  The Triton kernels are checked
on their own in ``test_kernels.py`` (and on a GPU by ``scripts/gpu_checks.sh``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_harness import (
    Req, make_llm, preemption_workload, random_prompts, run, run_with_preemption_log, shutdown,
)
from flash_attn_on_cpu import flash_attention_on_cpu, flash_attn_varlen_func, reshape_and_cache_flash
from tova_vllm.reference import generate as reference_generate

BLOCK = 32


def _expected(model, req: Req, cache_size: int, policy="tova", prompt_mode="prompt",
              prompt_chunk=512):
    return reference_generate(model, list(req.prompt), cache_size=cache_size,
                              max_new_tokens=req.max_tokens, policy=policy,
                              prompt_mode=prompt_mode, prompt_chunk=prompt_chunk).token_ids


def _run(model_dir, tova, requests, *, kernels=None, **llm_kwargs):
    with flash_attention_on_cpu(kernels):
        llm = make_llm(model_dir, tova, **llm_kwargs)
        try:
            from tova_vllm.engine.cuda_backend import TovaFlashAttentionImpl

            impls = [m.impl for m in llm.llm_engine.model_executor.driver_worker.worker
                     .model_runner.model.modules() if hasattr(m, "impl")]
            assert impls and all(isinstance(i, TovaFlashAttentionImpl) for i in impls)
            result = run(llm, requests, logprobs=True)
            evictors = [i._evictor for i in impls if i._evictor is not None]
            if tova is not None and tova["cache_size"] < 1024:  # something was evicted
                assert len(evictors) == len(impls)
                assert {e.kernels.name for e in evictors} == {kernels or "torch"}
            return result
        finally:
            shutdown(llm)


# --- the stand-ins themselves, against dense attention -------------------------------------


def test_stand_in_flash_attention_matches_dense_causal_attention():
    gen = torch.Generator().manual_seed(0)
    q_heads, kv_heads, dim, block_size, num_blocks = 8, 2, 16, 4, 40
    key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    seq_lens, query_lens = [13, 1, 7], [5, 1, 7]
    tables = torch.randperm(num_blocks, generator=gen)[:3 * 4].view(3, 4).int()
    q = torch.randn(sum(query_lens) + 2, q_heads, dim, generator=gen)  # + padding rows
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    out, lse = flash_attn_varlen_func(
        q, key_cache, value_cache, max(query_lens), cu, max(seq_lens),
        seqused_k=torch.tensor(seq_lens, dtype=torch.int32), block_table=tables,
        softmax_scale=0.3, causal=True, return_softmax_lse=True)
    for r, (s, n) in enumerate(zip(seq_lens, query_lens)):
        pos = torch.arange(s)
        k = key_cache[tables[r, pos // block_size].long(), pos % block_size]
        v = value_cache[tables[r, pos // block_size].long(), pos % block_size]
        qr = q[cu[r]:cu[r + 1]]
        for h in range(q_heads):
            logits = qr[:, h] @ k[:, h // 4].T * 0.3  # [n, s]
            logits[torch.arange(s)[None, :] > (s - n + torch.arange(n))[:, None]] = -torch.inf
            torch.testing.assert_close(out[cu[r]:cu[r + 1], h], logits.softmax(-1) @ v[:, h // 4])
            torch.testing.assert_close(lse[h, cu[r]:cu[r + 1]], logits.logsumexp(-1))
    assert torch.isinf(lse[:, 13:]).all()


def test_stand_in_cache_write_uses_slots_and_skips_negative_ones():
    key_cache = torch.zeros(3, 4, 2, 8)
    value_cache = torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    slots = torch.tensor([9, -1, 2], dtype=torch.int64)  # 3 tokens; key row 3 is padding
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "auto", None, None)
    assert torch.equal(key_cache[2, 1], key[0]) and torch.equal(value_cache[0, 2], value[2])
    assert int((key_cache != 0).any(-1).any(-1).sum()) == 2


# --- TOVA's CUDA backend in the engine -----------------------------------------------------


@pytest.mark.parametrize("arch,block_size", [("llama_gqa", 32), ("qwen2", 16)])
def test_cuda_backend_equals_reference(arch, block_size, tiny_models, hf_models):
    """Budgets 16 and 64 in one engine (per-request budget), prompt mode, chunked prefill
    (prompts up to 300 > 64 batched tokens), staggered arrivals; FlashAttention's usual
    block size 16 and 32."""
    prompts = random_prompts((5, 20, 70, 150, 300), seed=0)
    requests = [Req(p, 16, a, {"tova_cache_size": c})
                for c in (16, 64) for p, a in zip(prompts, (0, 0, 3, 5, 9))]
    got = _run(tiny_models[arch], {"cache_size": 64}, requests, block_size=block_size).tokens
    for i, req in enumerate(requests):
        assert got[i] == _expected(hf_models[arch], req, req.extra_args["tova_cache_size"]), i


@pytest.mark.parametrize("kernel_lse", [True, False], ids=["lse-from-attention", "two-pass"])
def test_cuda_backend_chunked_prompt_mode_equals_reference(kernel_lse, tiny_models, hf_models,
                                                           monkeypatch):
    """Scheduler chunks (64) straddle eviction points (every 48 prompt tokens): phases
    with subsets of a step's tokens.  ``two-pass``: the scorer computes the softmax itself
    (what runs when the attention kernel cannot return the log-sum-exp)."""
    from tova_vllm.engine.cuda_backend import TovaFlashAttentionImpl

    if not kernel_lse:
        monkeypatch.setattr(TovaFlashAttentionImpl, "_kernel_returns_lse", lambda self, md: False)
    calls = []
    original = flash_attn_varlen_func

    def counting(*args, **kwargs):
        calls.append(bool(kwargs.get("return_softmax_lse")))
        return original(*args, **kwargs)

    import flash_attn_on_cpu

    monkeypatch.setattr(flash_attn_on_cpu, "flash_attn_varlen_func", counting)
    arch = "llama_gqa"
    tova = {"cache_size": 40, "prompt_mode": "chunked", "prompt_chunk": 48}
    requests = [Req(p, 16, a) for p, a in zip(random_prompts((30, 150, 220), seed=1), (0, 1, 2))]
    got = _run(tiny_models[arch], tova, requests).tokens
    for i, req in enumerate(requests):
        assert got[i] == _expected(hf_models[arch], req, 40, "tova", "chunked", 48), i
    assert any(calls) == kernel_lse and not all(calls)


@pytest.fixture
def host_plan_checks(monkeypatch):
    """Checks, at every TOVA metadata build, that the builder can plan from the runner's
    host copies without reading the device: host seq_lens equal the device ones, and the
    device block table is a view of one of the runner's block-table buffers (whose host
    half ``step_context.host_block_table`` returns).  Yields the number of checked builds."""
    from tova_vllm.engine import handoff, phased_builder, step_context

    checked = []
    original = phased_builder.TovaPhasedBuilder.build

    def build(self, common_prefix_len, cm, fast_build=False):
        if self.tova_spec is not None:
            n = cm.num_reqs
            assert cm.seq_lens_cpu_upper_bound[:n].tolist() == cm.seq_lens[:n].tolist()
            table = cm.block_table_tensor[:n]
            buffers = [t.block_table for t in
                       handoff.step_runner.current().input_batch.block_table.block_tables]
            assert any(b.gpu.data_ptr() == table.data_ptr() for b in buffers)
            assert torch.equal(step_context.host_block_table(table), table)
            checked.append(n)
        return original(self, common_prefix_len, cm, fast_build)

    monkeypatch.setattr(phased_builder.TovaPhasedBuilder, "build", build)
    yield checked
    assert checked, "no TOVA metadata was built"


def test_host_block_table_is_the_runners_host_buffer():
    """On CUDA the runner's block table has distinct host and device halves: the builder
    must read the host half (no device read), and copy back only unknown tensors."""
    from types import SimpleNamespace

    from tova_vllm.engine.handoff import step_runner
    from tova_vllm.engine.step_context import host_block_table

    device_half = torch.arange(40, dtype=torch.int32).view(4, 10)
    host_half = device_half.clone()
    buffer = SimpleNamespace(gpu=device_half, cpu=host_half)
    runner = SimpleNamespace(input_batch=SimpleNamespace(block_table=SimpleNamespace(
        block_tables=[SimpleNamespace(block_table=buffer)])))
    with step_runner.publishing(runner):
        got = host_block_table(device_half[:3])
        assert got.data_ptr() == host_half.data_ptr() and got.shape == (3, 10)
        other = torch.ones(2, 10, dtype=torch.int32)
        assert torch.equal(host_block_table(other), other)


def test_cuda_backend_policies_share_one_engine(tiny_models, hf_models, host_plan_checks):
    """Every policy (side state: positions, H2O's accumulated attention) in one engine."""
    arch = "llama_gqa"
    prompts = random_prompts((5, 70, 150), seed=11)
    requests, policies = [], []
    for policy in ("tova", "window", "sink_window", "h2o"):
        for i, prompt in enumerate(prompts):
            requests.append(Req(prompt, 16, i, {"tova_policy": policy}))
            policies.append(policy)
    got = _run(tiny_models[arch], {"cache_size": 24}, requests).tokens
    for i, (req, policy) in enumerate(zip(requests, policies)):
        assert got[i] == _expected(hf_models[arch], req, 24, policy), (policy, i)


def test_cuda_backend_without_eviction_is_bit_identical_to_vanilla(tiny_models):
    """C >= every sequence: TOVA on equals the plugin off, on the same FlashAttention path."""
    requests = [Req(p, 20, a) for p, a in zip(random_prompts((5, 70, 300)), (0, 2, 4))]
    vanilla = _run(tiny_models["llama_gqa"], None, requests)
    tova = _run(tiny_models["llama_gqa"], {"cache_size": 1024}, requests)
    assert tova.tokens == vanilla.tokens
    assert tova.logprobs == vanilla.logprobs


def test_cuda_backend_in_bfloat16(tiny_models):
    """FlashAttention's dtypes (bf16): C >= length is bit-identical to the plugin off, and
    with eviction every layer scores, selects and compacts a bf16 cache (``_run`` checks
    the evictors ran).  Tokens under eviction are not compared with the fp32 reference:
    bf16 rounding legitimately flips near-tied choices."""
    requests = [Req(p, 12, a) for p, a in zip(random_prompts((5, 70, 150), seed=3), (0, 1, 2))]
    model = tiny_models["llama_gqa"]
    vanilla = _run(model, None, requests, dtype="bfloat16")
    unbounded = _run(model, {"cache_size": 1024}, requests, dtype="bfloat16")
    assert unbounded.tokens == vanilla.tokens and unbounded.logprobs == vanilla.logprobs
    bounded = _run(model, {"cache_size": 24}, requests, dtype="bfloat16")
    assert [len(bounded.tokens[i]) for i in range(3)] == [12] * 3
    assert bounded.tokens[0] == vanilla.tokens[0]  # 5 + 12 tokens never exceed C = 24
    assert bounded.tokens != vanilla.tokens


def test_cuda_backend_compiled_engine_equals_reference(tiny_models, hf_models):
    """vLLM's torch.compile path (enforce_eager=False): the KV write runs from the compiled
    graph with the slot mapping TOVA's builder rewrote in place."""
    arch = "llama_gqa"
    requests = [Req(p, 16, a) for p, a in zip(random_prompts((20, 150)), (0, 1))]
    got = _run(tiny_models[arch], {"cache_size": 32}, requests, enforce_eager=False).tokens
    for i, req in enumerate(requests):
        assert got[i] == _expected(hf_models[arch], req, 32), i


def test_cuda_backend_preemption_after_eviction_replays_exactly(tiny_models, hf_models,
                                                                host_plan_checks):
    arch, cache_size = "llama_gqa", 96
    requests = preemption_workload()
    with flash_attention_on_cpu():
        result, preempted = run_with_preemption_log(tiny_models[arch], requests, cache_size)
    assert preempted, "nothing was preempted after its eviction started"
    for i, req in enumerate(requests):
        assert result.tokens[i] == _expected(hf_models[arch], req, cache_size), i


_TRITON_SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import engine_harness as eh
from test_cuda_backend_on_cpu import _run
reqs = [eh.Req(p, 8, a, {{"tova_policy": pol}}) for p, a, pol in zip(
    eh.random_prompts((20, 60, 45), seed=5), (0, 1, 2), ("tova", "tova", "h2o"))]
got = _run(Path({model!r}), {{"cache_size": 16, "prompt_mode": "chunked",
                             "prompt_chunk": 24}}, reqs, kernels="triton").tokens
print("TOKENS", [got[i] for i in range(len(reqs))])
"""


def test_cuda_backend_with_interpreted_triton_kernels(tiny_models, hf_models):
    """The engine with the Triton kernels (what runs on CUDA), under ``TRITON_INTERPRET=1``
    in a fresh process (the interpreter must be on before Triton loads)."""
    arch = "llama_gqa"
    script = _TRITON_SCRIPT.format(tests=str(Path(__file__).parent),
                                   model=str(tiny_models[arch]))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")]
    got = eval(line[len("TOKENS "):])
    reqs = [Req(p, 8, a) for p, a in zip(random_prompts((20, 60, 45), seed=5), (0, 1, 2))]
    for i, (req, policy) in enumerate(zip(reqs, ("tova", "tova", "h2o"))):
        assert got[i] == _expected(hf_models[arch], req, 16, policy, "chunked", 24), i
