"""Prefix caching with TOVA on: copy-on-write eviction (``engine/spec.py``, ``plan.py``).

Blocks written before a request's first eviction are ordinary vLLM blocks, shared and
cached as in vanilla vLLM; the first eviction gathers the survivors into private blocks.
Every request here must give the reference's tokens, the same tokens with caching off,
and read exactly the prefix it may: the part before its own first eviction that earlier
requests published (none for H2O, which accumulates the attention of every prompt query).
"""

from __future__ import annotations

import pytest

from engine_harness import (
    Req, make_llm, random_prompts, run, run_with_preemption_log, scheduler_of, shutdown,
)
from tova_vllm.policies import EvictionSchedule
from tova_vllm.reference import generate as reference_generate

ARCH, BLOCK, SERVER_BUDGET = "llama_gqa", 32, 96
PREFIX = random_prompts((224,), seed=11)[0]  # 7 blocks shared by most requests
OTHER = random_prompts((160,), seed=12)[0]  # 5 blocks shared by two overlapping requests


def _tail(n: int, seed: int) -> tuple[int, ...]:
    return random_prompts((n,), seed=100 + seed)[0]


FIRST = [Req(PREFIX + _tail(40, 1), 20)]  # runs alone first and publishes the prefix
SECOND = [
    Req(PREFIX + _tail(50, 2), 16, 0, {"tova_cache_size": 48}),
    Req(PREFIX[:161], 16, 0),  # the hit may cover all of it but its last token
    Req(PREFIX[:70], 40, 0),  # shorter than C: its first eviction comes while decoding
    Req(PREFIX + _tail(30, 3), 16, 0, {"tova_policy": "h2o"}),  # may not read
    Req(PREFIX + _tail(20, 4), 16, 1, {"tova_policy": "window", "tova_cache_size": 32}),
    Req(PREFIX + _tail(45, 5), 16, 3),
    Req(OTHER + _tail(20, 6), 90, 0),  # still decoding when the next one arrives
    Req(OTHER + _tail(25, 7), 16, 30),
]
MODES = {
    "prompt": {},
    "chunked": {"prompt_mode": "chunked", "prompt_chunk": 48},
}


def _settings(req: Req) -> tuple[int, str]:
    extra = req.extra_args or {}
    return extra.get("tova_cache_size", SERVER_BUDGET), extra.get("tova_policy", "tova")


def _expected_hit(req: Req, published: tuple[int, ...], prompt_chunk) -> int:
    """Tokens the request may read: whole blocks of the longest published prefix it
    shares, ending before its own first eviction and before its last prompt token."""
    cache_size, policy = _settings(req)
    if policy == "h2o":
        return 0
    shared = 0
    while (shared < min(len(published), len(req.prompt))
           and published[shared] == req.prompt[shared]):
        shared += 1
    first = EvictionSchedule(cache_size, len(req.prompt), prompt_chunk).first_eviction()
    limit = min(shared, first - 1, len(req.prompt) - 1)
    return limit // BLOCK * BLOCK


def _published(req: Req, prompt_chunk) -> tuple[int, ...]:
    """The prompt tokens ``req`` publishes: its blocks before its first eviction."""
    cache_size, _ = _settings(req)
    first = EvictionSchedule(cache_size, len(req.prompt), prompt_chunk).first_eviction()
    return req.prompt[: min(first, len(req.prompt)) // BLOCK * BLOCK]


def _reference(model, req: Req, mode: dict) -> list[int]:
    cache_size, policy = _settings(req)
    return reference_generate(model, list(req.prompt), cache_size=cache_size,
                              max_new_tokens=req.max_tokens, policy=policy,
                              prompt_mode=mode.get("prompt_mode", "prompt"),
                              prompt_chunk=mode.get("prompt_chunk", 512)).token_ids


def _run_both(model_dir, mode: dict, caching: bool):
    llm = make_llm(model_dir, {"cache_size": SERVER_BUDGET, **mode},
                   enable_prefix_caching=caching)
    try:
        return run(llm, FIRST), run(llm, SECOND)
    finally:
        shutdown(llm)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_shared_prefixes_are_read_exactly(mode, tiny_models, hf_models):
    settings = MODES[mode]
    chunk = settings.get("prompt_chunk")
    first_on, second_on = _run_both(tiny_models[ARCH], settings, caching=True)
    first_off, second_off = _run_both(tiny_models[ARCH], settings, caching=False)

    assert first_on.tokens == first_off.tokens
    assert second_on.tokens == second_off.tokens, "caching on != caching off"
    for i, req in enumerate(FIRST):
        assert first_on.tokens[i] == _reference(hf_models[ARCH], req, settings), f"first {i}"
    for i, req in enumerate(SECOND):
        assert second_on.tokens[i] == _reference(hf_models[ARCH], req, settings), f"second {i}"

    # What was read: the first request's prefix for most, the overlapping request's for
    # the last one (it arrives while that one still decodes), nothing for H2O.
    assert first_on.cached == {0: 0}
    published = _published(FIRST[0], chunk)
    expected = {i: _expected_hit(req, published, chunk) for i, req in enumerate(SECOND)}
    expected[len(SECOND) - 1] = _expected_hit(SECOND[-1], _published(SECOND[-2], chunk), chunk)
    assert second_on.cached == expected
    assert expected[0] > 0 and expected[len(SECOND) - 1] > 0 and expected[3] == 0
    if mode == "prompt":
        assert expected[1] == 160  # all of the 161-token prompt but its last token
    assert all(n == 0 for n in second_off.cached.values())


def test_cached_blocks_are_never_written_by_eviction(tiny_models):
    """Requests that read the shared prefix and then evict never write into it: a request
    that reads it afterwards gives the tokens it gives with caching off."""
    requests = [Req(PREFIX + _tail(40, i), 40, i) for i in range(4)]
    probe = [Req(PREFIX + _tail(60, 9), 24)]
    llm = make_llm(tiny_models[ARCH], {"cache_size": 16})
    try:
        run(llm, requests)
        # Every request above evicted (C = 16); the probe reads the 7 prefix blocks.
        got = run(llm, probe)
    finally:
        shutdown(llm)
    assert got.cached == {0: 7 * BLOCK}
    assert got.tokens[0] == _reference_no_cache(tiny_models[ARCH], probe, 16)


def _reference_no_cache(model_dir, requests, cache_size) -> list[int]:
    llm = make_llm(model_dir, {"cache_size": cache_size}, enable_prefix_caching=False)
    try:
        return run(llm, requests).tokens[0]
    finally:
        shutdown(llm)


def test_preemption_after_a_hit_and_after_eviction(tiny_models, hf_models):
    """A 15-block pool (the copy-on-write peak at max_model_len 320 is 14 blocks): requests
    that read a shared prefix evict, get preempted, re-read it on resume, and replay."""
    shared = random_prompts((64,), seed=21)[0]
    tails = random_prompts((46, 56, 36, 50), seed=22)
    requests = [Req(random_prompts((10,), seed=23)[0], 150, 0)] + [
        Req(shared + tail, n, a)
        for tail, n, a in zip(tails, (100, 100, 60, 100), (1, 2, 3, 4))]
    cache_size = 96
    result, preempted = run_with_preemption_log(tiny_models[ARCH], requests, cache_size,
                                                num_blocks=15, enable_prefix_caching=True)
    assert preempted, "nothing was preempted after its eviction started"
    for i, req in enumerate(requests):
        assert result.tokens[i] == reference_generate(
            hf_models[ARCH], list(req.prompt), cache_size=cache_size,
            max_new_tokens=req.max_tokens).token_ids, i
    off, _ = run_with_preemption_log(tiny_models[ARCH], requests, cache_size, num_blocks=15)
    assert result.tokens == off.tokens


def test_private_blocks_are_never_published(tiny_models):
    """After every step, each running request's hashed blocks are exactly its blocks
    before its first eviction (never a private one), and its ordinary blocks are
    released once the first eviction is processed."""
    requests = [Req(PREFIX + _tail(40, i), 30, i) for i in range(3)] + [
        Req(PREFIX[:50], 60, 2)]
    bad: list[str] = []

    def check(scheduler):
        from engine_harness import kv_manager

        manager = kv_manager(scheduler)
        for request in scheduler.running:
            blocks = manager.req_to_blocks[request.request_id]
            first = manager.schedule_of(request).first_eviction()
            ordinary = -(-first // BLOCK)
            for index, block in enumerate(blocks):
                if block is manager._null_block:
                    continue
                if index >= ordinary and block.block_hash is not None:
                    bad.append(f"{request.request_id}: private block {index} hashed")
                if (request.num_computed_tokens > first and index < ordinary):
                    bad.append(f"{request.request_id}: ordinary block {index} still held")

    llm = make_llm(tiny_models[ARCH], {"cache_size": 40})
    try:
        run(llm, requests, after_step=check)
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    finally:
        shutdown(llm)
    assert not bad, bad[:5]
