"""The budget planner (``python -m tova_vllm budget``) against the engine's own figures:
vLLM's start-up "maximum concurrency" and the scheduler's real block counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine_harness import Req, kv_manager, make_llm, random_prompts, real_blocks, run, \
    scheduler_of, shutdown
from tova_vllm.budget import build_parser, plan, startup_concurrency

BLOCK_SIZE, NUM_BLOCKS, CACHE_SIZE, MAX_LEN = 32, 30, 32, 256  # CPU blocks: multiples of 32
REQUESTS = ((20, 50), (100, 40), (150, 3))  # (prompt, generated): shorter and longer than C


def _args(model_dir, prompt_len, max_tokens, *extra):
    return build_parser().parse_args([
        "--model", str(model_dir), "--block-size", str(BLOCK_SIZE), "--num-blocks",
        str(NUM_BLOCKS), "--max-model-len", str(MAX_LEN), "--cache-size", str(CACHE_SIZE),
        "--prompt-len", str(prompt_len), "--max-tokens", str(max_tokens), *extra])


@pytest.mark.parametrize("caching", [True, False], ids=["prefix_caching", "no_caching"])
def test_budget_matches_engine(caching, tiny_models):
    model = tiny_models["llama_gqa"]
    llm = make_llm(model, {"cache_size": CACHE_SIZE}, block_size=BLOCK_SIZE,
                   num_blocks=NUM_BLOCKS, max_model_len=MAX_LEN, max_num_batched_tokens=256,
                   enable_prefix_caching=caching)
    try:
        scheduler = scheduler_of(llm)
        manager = kv_manager(scheduler)
        seen: list[list[int]] = []

        def record(sched):
            for request in sched.running:  # one at most; none after its last step
                seen[-1].append(real_blocks(manager, request.request_id))

        prompts = random_prompts([p for p, _ in REQUESTS], seed=3)
        # One at a time, so each request's own blocks are read after every step.
        for prompt, (_, gen) in zip(prompts, REQUESTS):
            seen.append([])
            run(llm, [Req(prompt, gen)], after_step=record)
        engine_concurrency = scheduler.vllm_config.cache_config.kv_cache_max_concurrency
    finally:
        shutdown(llm)

    for i, (prompt_len, gen) in enumerate(REQUESTS):
        report = plan(_args(model, prompt_len, gen,
                            *(() if caching else ("--no-enable-prefix-caching",))))
        blocks = seen[i]
        assert max(blocks) == report.tova.peak_blocks, (i, blocks)
        assert blocks[-1] == report.tova.decode_blocks, (i, blocks)
        assert report.tova.decode_blocks <= -(-(CACHE_SIZE + 1) // BLOCK_SIZE)
        assert startup_concurrency(report.num_blocks, report.tova_startup_blocks) == \
            pytest.approx(engine_concurrency)


def test_budget_chunked_and_vanilla_arithmetic(tiny_models):
    # chunked, in place: peak C + prompt_chunk during the prompt, C + 1 while decoding
    report = plan(_args(tiny_models["llama_gqa"], 200, 30, "--prompt-mode", "chunked",
                        "--prompt-chunk", "32", "--no-enable-prefix-caching"))
    assert report.tova.peak_blocks == -(-(CACHE_SIZE + 32) // BLOCK_SIZE)
    assert report.tova.decode_blocks == -(-(CACHE_SIZE + 1) // BLOCK_SIZE)
    assert report.tova_startup_blocks == -(-(CACHE_SIZE + 32) // BLOCK_SIZE)
    assert report.vanilla.decode_blocks == -(-(200 + 29) // BLOCK_SIZE)
    assert report.vanilla_startup_blocks == MAX_LEN // BLOCK_SIZE
    assert report.fit(report.tova) == (NUM_BLOCKS - 1) // report.tova.decode_blocks
    # Copy-on-write (prefix caching on, vLLM's default): the first eviction (at 64, the
    # first chunk boundary past C) gathers into private blocks, which then hold up to
    # C + prompt_chunk positions, while the 64 ordinary positions are still held.
    cow = plan(_args(tiny_models["llama_gqa"], 200, 30, "--prompt-mode", "chunked",
                     "--prompt-chunk", "32"))
    assert cow.tova.peak_blocks == 2 + 2
    assert cow.tova.decode_blocks == report.tova.decode_blocks
    assert cow.tova_startup_blocks == 2 + 2


def test_budget_cli(tiny_models):
    out = subprocess.run(
        [sys.executable, "-m", "tova_vllm", "budget", "--model", str(tiny_models["llama_gqa"]),
         "--kv-memory", "1MiB", "--block-size", "16", "--cache-size", "0",
         "--prompt-len", "10", "--max-tokens", "10"], capture_output=True, text=True)
    assert out.returncode != 0
    assert 'additional_config["tova"]["cache_size"] must be an integer >= 1, got 0' in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "tova_vllm", "budget", "--model", str(tiny_models["llama_gqa"]),
         "--kv-memory", "1MiB", "--block-size", "16", "--cache-size", "32",
         "--prompt-len", "10", "--max-tokens", "100", "--max-model-len", "256"],
        capture_output=True, text=True, check=True)
    assert "requests decoding at once" in out.stdout and "Maximum concurrency" in out.stdout
