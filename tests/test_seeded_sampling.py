"""Seeded sampling with TOVA on CPU: prompts prefilled in several chunks used to kill the
engine core (vLLM rewinds a discarded row's generator with ``set_offset``, which CPU
generators lack; patch ``runner_keeps_cpu_generators``).  A seeded request's tokens must not
depend on how its prompt was chunked or what it was batched with.

Reference: the same request with its whole prompt in one step (``max_num_batched_tokens``
above the prompt), where no sampled token is discarded and vLLM's own path is taken.
"""

from __future__ import annotations

import pytest

from engine_harness import kv_manager, make_llm, random_prompts, scheduler_of, shutdown

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CACHE_SIZE = 32
TOVA = {"cache_size": CACHE_SIZE}
MAX_TOKENS = 24
TARGET_SEED = 1234
TARGET, *OTHERS = random_prompts((300, 200, 90, 260), seed=7)


def _sample(llm, batch: bool, seed: int = TARGET_SEED) -> tuple[list[int], int]:
    """The target's tokens (seeded, temperature 0.8), alone or among seeded and unseeded
    requests of other lengths; and the tokens TOVA evicted meanwhile."""
    from vllm import SamplingParams

    def params(seed):
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95,
                              seed=seed, ignore_eos=True)

    prompts = [TARGET, *OTHERS] if batch else [TARGET]
    seeds = [seed, 5, None, 6][:len(prompts)]
    stats = kv_manager(scheduler_of(llm)).stats
    evicted_before = stats.evicted_tokens
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                           [params(s) for s in seeds], use_tqdm=False)
    return (list(outputs[0].outputs[0].token_ids),
            stats.evicted_tokens - evicted_before)


@pytest.fixture(scope="module")
def runs(tiny_models):
    results = {}
    for chunk in (512, 64, 96):  # 512: one step for the whole prompt (the reference)
        # Stats on: the scheduler then counts what TOVA evicted.
        llm = make_llm(tiny_models["llama_gqa"], TOVA, max_num_batched_tokens=chunk,
                       disable_log_stats=False)
        try:
            results[chunk, "alone"] = _sample(llm, batch=False)
            if chunk != 512:
                results[chunk, "batch"] = _sample(llm, batch=True)
            if chunk == 64:
                other_seed = _sample(llm, batch=False, seed=TARGET_SEED + 1)
        finally:
            shutdown(llm)
    return results, other_seed


def test_seeded_tokens_do_not_depend_on_chunking_or_batch(runs):
    runs, other_seed = runs
    reference, evicted = runs[512, "alone"]
    assert other_seed[0] != reference  # the seed matters: this comparison can fail
    assert len(reference) == MAX_TOKENS
    assert evicted > 0  # TOVA evicted: the prompt alone is far beyond the budget
    for key, (tokens, evicted) in runs.items():
        assert evicted > 0, key
        assert tokens == reference, key
