"""The baseline policies (window, sink_window, h2o) inside vLLM's engine vs the reference.

Same set-up as ``test_engine.py``: in-process engines, chunked prefill (prompts longer than
``max_num_batched_tokens``), staggered arrivals, greedy tokens compared with
``tova_vllm.reference.generate`` under the same policy, budget and prompt mode.
"""

from __future__ import annotations

import pytest

from engine_harness import (
    Req, make_llm, preemption_workload, random_prompts, run, run_with_preemption_log, shutdown,
)
from tova_vllm.policies import POLICY_NAMES, EvictionPolicy
from tova_vllm.reference import generate as reference_generate

POLICIES = POLICY_NAMES  # every registered policy


def _expected(model, req: Req, cache_size: int, policy, prompt_mode="prompt", prompt_chunk=512):
    return reference_generate(model, list(req.prompt), cache_size=cache_size,
                              max_new_tokens=req.max_tokens, policy=policy,
                              prompt_mode=prompt_mode, prompt_chunk=prompt_chunk).token_ids


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2"])
def test_per_request_policies_share_one_engine(arch, tiny_models, hf_models):
    """Every policy x two budgets, all requests in one engine batch together (mixed decode
    and chunked prefill steps), each equal to the reference under its own policy."""
    prompts = random_prompts((5, 20, 70, 150), seed=11)
    requests, settings = [], []
    for policy in POLICIES:
        for cache_size in (16, 48):
            for i, prompt in enumerate(prompts):
                requests.append(Req(prompt, 16, i, {"tova_policy": policy,
                                                    "tova_cache_size": cache_size}))
                settings.append((policy, cache_size))
    llm = make_llm(tiny_models[arch], {"cache_size": 48})
    try:
        got = run(llm, requests).tokens
    finally:
        shutdown(llm)
    for i, (req, (policy, cache_size)) in enumerate(zip(requests, settings)):
        assert got[i] == _expected(hf_models[arch], req, cache_size, policy), (policy, cache_size, i)
    # The policies must actually choose differently, or this test proves nothing.
    per_policy = {p: [got[i] for i, s in enumerate(settings) if s[0] == p] for p in POLICIES}
    for a in POLICIES:
        for b in POLICIES:
            if a < b:
                assert per_policy[a] != per_policy[b], (a, b)


@pytest.mark.parametrize(
    "tova",
    [
        {"cache_size": 40, "policy": "h2o", "prompt_mode": "chunked", "prompt_chunk": 48},
        {"cache_size": 24, "policy": "h2o", "recent": 5},
        {"cache_size": 16, "policy": "sink_window", "sinks": 2, "prompt_mode": "chunked",
         "prompt_chunk": 1},
        {"cache_size": 40, "policy": "window", "prompt_mode": "chunked", "prompt_chunk": 48},
    ],
    ids=["h2o-chunked", "h2o-recent5", "sinks2-token-by-token", "window-chunked"],
)
def test_server_policy_equals_reference(tova, tiny_models, hf_models):
    arch = "llama_mha"
    requests = [Req(p, 16, a) for p, a in zip(random_prompts((30, 150, 220), seed=12), (0, 1, 2))]
    llm = make_llm(tiny_models[arch], tova, max_num_batched_tokens=64)
    try:
        got = run(llm, requests).tokens
    finally:
        shutdown(llm)
    policy = EvictionPolicy(tova["policy"], sinks=tova.get("sinks", 4), recent=tova.get("recent"))
    mode = tova.get("prompt_mode", "prompt")
    for i, req in enumerate(requests):
        assert got[i] == _expected(hf_models[arch], req, tova["cache_size"], policy, mode,
                                   tova.get("prompt_chunk", 512)), i


def test_h2o_preemption_replays_accumulated_attention(tiny_models, hf_models):
    """Recompute after preemption rebuilds H2O's accumulated scores from scratch (in
    different scheduler chunks), and the outputs stay equal to the reference."""
    arch, cache_size = "llama_gqa", 96
    requests = preemption_workload({"tova_policy": "h2o"})
    result, preempted = run_with_preemption_log(tiny_models[arch], requests, cache_size)
    got = result.tokens
    assert preempted, "nothing was preempted after its eviction started"
    for i, req in enumerate(requests):
        assert got[i] == _expected(hf_models[arch], req, cache_size, "h2o"), i


@pytest.fixture(scope="module")
def budget_32_engine(tiny_models):
    llm = make_llm(tiny_models["llama_mha"], {"cache_size": 32, "recent": 8})
    yield llm
    shutdown(llm)


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"tova_policy": "lru"}, "tova_policy must be one of"),
        ({"tova_policy": 3}, "tova_policy must be one of"),
        ({"tova_policy": "sink_window", "tova_cache_size": 4}, "sink tokens"),
        ({"tova_policy": "h2o", "tova_cache_size": 8}, "most recent tokens"),
    ],
)
def test_bad_per_request_policy_is_rejected_and_engine_keeps_serving(extra, match,
                                                                     budget_32_engine):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = budget_32_engine
    with pytest.raises(VLLMValidationError, match=match):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(max_tokens=4, extra_args=extra))
    ok = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                      SamplingParams(max_tokens=4, extra_args={"tova_policy": "h2o"}))
    assert len(ok[0].outputs[0].token_ids) == 4
