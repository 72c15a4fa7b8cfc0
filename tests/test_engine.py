"""TOVA inside vLLM's engine (CPU, fp32) against the plain-PyTorch reference.

Every engine here is in-process (``engine_harness``): requests arrive at different steps,
prompts are longer than ``max_num_batched_tokens`` so chunked prefill splits them, and the
greedy tokens of every request must equal ``tova_vllm.reference.generate`` at the same
budget and prompt mode.
"""

from __future__ import annotations

import pytest

from engine_harness import (
    Req, kv_manager, make_llm, preemption_workload, random_prompts, real_blocks, run,
    run_with_preemption_log, scheduler_of, shutdown,
)
from tova_vllm.policies import cdiv
from tova_vllm.reference import generate as reference_generate

BLOCK = 32
# Prompts shorter and longer than every budget, one longer than two scheduler chunks.
PROMPT_LENGTHS = (5, 20, 70, 150, 300)
ARRIVALS = (0, 0, 3, 5, 9)
MAX_TOKENS = 24


def _workload(lengths=PROMPT_LENGTHS, arrivals=ARRIVALS, max_tokens=MAX_TOKENS, seed=0):
    return [Req(p, max_tokens, a) for p, a in zip(random_prompts(lengths, seed), arrivals)]


def _reference(model, requests, cache_size, prompt_mode="prompt", prompt_chunk=512):
    return {
        i: reference_generate(model, list(r.prompt), cache_size=cache_size,
                              max_new_tokens=r.max_tokens, prompt_mode=prompt_mode,
                              prompt_chunk=prompt_chunk).token_ids
        for i, r in enumerate(requests)
    }


@pytest.mark.parametrize("arch", ["llama_mha", "llama_gqa", "qwen2", "mistral"])
def test_engine_equals_reference_across_budgets(arch, tiny_models, hf_models):
    """Budgets 16, 64, 200 share one engine each; prompt mode, chunked prefill on."""
    requests = _workload()
    for cache_size in (16, 64, 200):
        llm = make_llm(tiny_models[arch], {"cache_size": cache_size})
        try:
            got = run(llm, requests).tokens
        finally:
            shutdown(llm)
        expected = _reference(hf_models[arch], requests, cache_size)
        assert got == expected, f"{arch} C={cache_size}"


@pytest.mark.parametrize(
    "cache_size,prompt_chunk,max_batched",
    [
        (40, 48, 64),  # scheduler chunks (64) straddle eviction points (48, 96, ...)
        (16, 100, 128),
        (8, 1, 64),  # the token-by-token multi-state RNN
    ],
)
def test_chunked_prompt_mode_equals_reference(cache_size, prompt_chunk, max_batched,
                                              tiny_models, hf_models):
    arch = "llama_gqa"
    requests = _workload(lengths=(30, 150, 220), arrivals=(0, 1, 2), max_tokens=16, seed=1)
    llm = make_llm(tiny_models[arch], {"cache_size": cache_size, "prompt_mode": "chunked",
                                       "prompt_chunk": prompt_chunk},
                   max_num_batched_tokens=max_batched)
    try:
        got = run(llm, requests).tokens
    finally:
        shutdown(llm)
    assert got == _reference(hf_models[arch], requests, cache_size, "chunked", prompt_chunk)


def test_chunked_mode_does_not_depend_on_batch_neighbours(tiny_models):
    """The same request alone and beside others gives the same tokens."""
    tova = {"cache_size": 24, "prompt_mode": "chunked", "prompt_chunk": 40}
    target = _workload(lengths=(200,), arrivals=(0,), max_tokens=12, seed=2)[0]
    neighbours = _workload(lengths=(90, 33, 170), arrivals=(0, 0, 0), max_tokens=12, seed=3)
    llm = make_llm(tiny_models["qwen2"], tova, max_num_batched_tokens=96)
    try:
        alone = run(llm, [target]).tokens[0]
        crowded = run(llm, neighbours[:2] + [target] + neighbours[2:]).tokens[2]
    finally:
        shutdown(llm)
    assert alone == crowded


def test_no_eviction_is_bit_identical_to_vanilla(tiny_models):
    requests = _workload(lengths=(5, 70, 300), arrivals=(0, 2, 4), max_tokens=20)
    results = {}
    for name, tova in (("vanilla", None), ("tova", {"cache_size": 1024})):
        llm = make_llm(tiny_models["llama_gqa"], tova)
        try:
            results[name] = run(llm, requests, logprobs=True)
        finally:
            shutdown(llm)
    assert results["tova"].tokens == results["vanilla"].tokens
    assert results["tova"].logprobs == results["vanilla"].logprobs  # exact float equality


def test_compiled_engine_equals_reference(tiny_models, hf_models):
    """vLLM's default torch.compile path (enforce_eager=False) on CPU."""
    requests = _workload(lengths=(20, 150), arrivals=(0, 1), max_tokens=16)
    llm = make_llm(tiny_models["llama_mha"], {"cache_size": 32}, enforce_eager=False)
    try:
        got = run(llm, requests).tokens
    finally:
        shutdown(llm)
    assert got == _reference(hf_models["llama_mha"], requests, 32)


@pytest.fixture(scope="module", params=[True, False], ids=["prefix_caching", "no_caching"])
def memory_engine(request, tiny_models):
    llm = make_llm(tiny_models["llama_gqa"], {"cache_size": TestMemory.CACHE},
                   enable_prefix_caching=request.param)
    yield llm
    shutdown(llm)


class TestMemory:
    CACHE = 64

    def test_decoding_requests_hold_exactly_the_bound(self, memory_engine):
        llm = memory_engine
        bound = cdiv(self.CACHE + 1, BLOCK)
        requests = _workload(lengths=(10, 100, 300, 64), arrivals=(0, 0, 2, 4), max_tokens=80)
        seen_decoding = set()

        def check(scheduler):
            manager = kv_manager(scheduler)
            for request in scheduler.running:
                rid = request.request_id
                length = request.num_computed_tokens
                if length > request.num_prompt_tokens:
                    # The last step touched min(length, C + 1) cache positions; the tail
                    # past the bound was freed when the first decode step was scheduled.
                    held = real_blocks(manager, rid)
                    first = manager.schedule_of(request).first_eviction()
                    if manager.copy_on_write and length == first:
                        # The first eviction's step: its ordinary blocks are released when
                        # the next step is scheduled, after it has been processed.
                        assert held == cdiv(first, BLOCK) + cdiv(self.CACHE, BLOCK), (rid, held)
                        continue
                    assert held == cdiv(min(length, self.CACHE + 1), BLOCK), (rid, length, held)
                    if length > self.CACHE:
                        assert held == bound
                        seen_decoding.add(rid)

        run(llm, requests, after_step=check)
        assert len(seen_decoding) == len(requests)
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block

    def test_pool_is_free_after_aborts(self, memory_engine):
        llm = memory_engine
        requests = _workload(lengths=(100, 300, 20), arrivals=(0, 0, 0), max_tokens=200)
        result = run(llm, requests, abort_at={0: 3, 1: 12, 2: 30})
        assert all(len(tokens) < 200 for tokens in result.tokens.values())
        assert not scheduler_of(llm).requests
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_tova_runs_more_requests_concurrently_than_vanilla(tiny_models):
    """A pool of 23 usable blocks: 6 requests of 40 + 300 tokens need 66 blocks at full
    length, but only 6 * ceil(33 / 32) = 12 under C = 32.  Count the requests running
    at once past 200 tokens (where each needs 7 blocks without eviction)."""
    requests = _workload(lengths=(40,) * 6, arrivals=(0,) * 6, max_tokens=300)
    long_running = {}
    for name, tova in (("vanilla", None), ("tova", {"cache_size": 32})):
        seen = [0]

        def count(scheduler):
            seen[0] = max(seen[0], sum(r.num_computed_tokens >= 200 for r in scheduler.running))

        llm = make_llm(tiny_models["llama_gqa"], tova, num_blocks=24, max_model_len=512)
        try:
            run(llm, requests, after_step=count)
        finally:
            shutdown(llm)
        long_running[name] = seen[0]
    assert long_running["tova"] == 6
    assert long_running["vanilla"] <= 23 // 7


def test_preemption_after_eviction_replays_exactly(tiny_models, hf_models):
    """Recompute preemption of requests that already evicted; outputs stay exact.

    Request 0 starts short and grows towards its budget; the later, long-prompt requests
    evict from their first decode step on and hold their bound.  When request 0 needs a
    block the pool (10 usable blocks) is full, and vLLM preempts the newest running
    request: one that has been evicting for many steps.  Its recompute replays prompt
    plus generated tokens, and must reproduce the uninterrupted result.
    """
    arch, cache_size = "llama_gqa", 96
    requests = preemption_workload()
    result, preempted_after_eviction = run_with_preemption_log(tiny_models[arch], requests,
                                                               cache_size)
    got = result.tokens
    assert preempted_after_eviction, "nothing was preempted after its eviction started"
    assert got == _reference(hf_models[arch], requests, cache_size)


def test_per_request_budget_lowers_memory_and_matches_reference(tiny_models, hf_models):
    """SamplingParams(extra_args={"tova_cache_size": N}) sets C for one request only."""
    arch, server_budget = "llama_gqa", 96
    prompts = random_prompts((50, 120, 120), seed=6)
    budgets = (None, 16, 40)
    requests = [Req(p, 60, 0, None if b is None else {"tova_cache_size": b})
                for p, b in zip(prompts, budgets)]
    held = {}

    def record(scheduler):
        manager = kv_manager(scheduler)
        for request in scheduler.running:
            if request.num_computed_tokens > request.num_prompt_tokens + 1:
                held[request.request_id.split("-")[0]] = real_blocks(manager, request.request_id)

    llm = make_llm(tiny_models[arch], {"cache_size": server_budget})
    try:
        got = run(llm, requests, after_step=record).tokens
    finally:
        shutdown(llm)
    for i, budget in enumerate(budgets):
        c = server_budget if budget is None else budget
        assert got[i] == reference_generate(hf_models[arch], list(prompts[i]), cache_size=c,
                                            max_new_tokens=60).token_ids, i
        assert held[str(i)] == cdiv(c + 1, BLOCK), (i, held)


@pytest.fixture(scope="module")
def budget_96_engine(tiny_models):
    llm = make_llm(tiny_models["llama_mha"], {"cache_size": 96})
    yield llm
    shutdown(llm)


@pytest.mark.parametrize("bad", [0, -2, 97, 2.5, "8", True])
def test_bad_per_request_budget_is_rejected_and_engine_keeps_serving(bad, budget_96_engine):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = budget_96_engine
    with pytest.raises(VLLMValidationError, match="tova_cache_size must be an integer from 1 to 96"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(max_tokens=4, extra_args={"tova_cache_size": bad}))
    ok = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                      SamplingParams(max_tokens=4, extra_args={"tova_cache_size": 8}))
    assert len(ok[0].outputs[0].token_ids) == 4
