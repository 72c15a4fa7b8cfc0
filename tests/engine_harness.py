"""Drive an in-process vLLM engine step by step and watch its scheduler.

Tests run vLLM with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so the scheduler, its KV manager
and the worker live in the test process: requests can arrive at chosen steps, and block
holdings can be read after every step.
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@dataclass(frozen=True)
class Req:
    prompt: tuple[int, ...]
    max_tokens: int
    arrival_step: int = 0
    extra_args: Optional[dict] = None


@dataclass
class RunResult:
    tokens: dict[int, list[int]]
    logprobs: dict[int, list[float]] = field(default_factory=dict)
    max_running: int = 0
    steps: int = 0
    #: Prompt tokens each request read from the prefix cache (vLLM's num_cached_tokens).
    cached: dict[int, int] = field(default_factory=dict)


def random_prompts(lengths: Sequence[int], seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    # Byte tokens only (ids 3..258): no specials inside prompts.
    return [tuple(rng.randrange(3, 259) for _ in range(n)) for n in lengths]


def make_llm(model_dir, tova: Optional[dict] = None, *, block_size: int = 32,
             max_num_batched_tokens: int = 64, max_model_len: int = 1024,
             num_blocks: Optional[int] = None, max_num_seqs: int = 16, **kwargs):
    from vllm import LLM

    extra = dict(additional_config={"tova": tova}) if tova is not None else {}
    if num_blocks is not None:
        extra["num_gpu_blocks_override"] = num_blocks
    return LLM(
        model=str(model_dir), dtype=kwargs.pop("dtype", "float32"), max_model_len=max_model_len,
        block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs, enforce_eager=kwargs.pop("enforce_eager", True),
        seed=0, **extra, **kwargs,
    )


def shutdown(llm) -> None:
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def run(llm, requests: Sequence[Req], *, logprobs: bool = False,
        after_step: Optional[Callable[[object], None]] = None,
        abort_at: Optional[dict[int, int]] = None) -> RunResult:
    """Greedy-generate every request; request i is added at its ``arrival_step``.

    ``after_step(scheduler)`` runs after every engine step; ``abort_at`` maps a request
    index to the step at which it is aborted.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    result = RunResult(tokens={})
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival_step)
    step = 0
    abort_at = dict(abort_at or {})
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]].arrival_step <= step:
            i = pending.pop(0)
            params = SamplingParams(max_tokens=requests[i].max_tokens, temperature=0.0,
                                    ignore_eos=True, logprobs=0 if logprobs else None,
                                    extra_args=requests[i].extra_args)
            engine.add_request(str(i), {"prompt_token_ids": list(requests[i].prompt)}, params)
        for i, at in list(abort_at.items()):
            if at == step:
                engine.abort_request([str(i)])
                del abort_at[i]
        for out in engine.step():
            if out.finished:
                completion = out.outputs[0]
                result.tokens[int(out.request_id)] = list(completion.token_ids)
                result.cached[int(out.request_id)] = out.num_cached_tokens or 0
                if logprobs:
                    result.logprobs[int(out.request_id)] = [
                        lp[tok].logprob for lp, tok in zip(completion.logprobs, completion.token_ids)
                    ]
        result.max_running = max(result.max_running, len(scheduler.running))
        if after_step is not None:
            after_step(scheduler)
        step += 1
        assert step < 20000, "engine did not finish"
    result.steps = step
    return result


def reference_tokens(hf_model, request: Req, tova: dict) -> list[int]:
    """The plain-PyTorch reference's greedy tokens for ``request`` in an engine whose TOVA
    settings are ``tova`` (the request's own budget and policy, if any, win)."""
    from tova_vllm.reference import generate

    extra = request.extra_args or {}
    chunked = tova.get("prompt_mode") == "chunked"
    return generate(hf_model, list(request.prompt),
                    cache_size=extra.get("tova_cache_size", tova["cache_size"]),
                    max_new_tokens=request.max_tokens,
                    policy=extra.get("tova_policy", tova.get("policy", "tova")),
                    **(dict(prompt_mode="chunked", prompt_chunk=tova["prompt_chunk"])
                       if chunked else {})).token_ids


def run_equals_reference(model_dir, hf_model, requests: Sequence[Req], tova: dict,
                         **llm_kwargs):
    """Runs ``requests`` in a fresh engine (``make_llm(model_dir, tova, **llm_kwargs)``),
    asserts every request's tokens equal the reference's, and returns the run's result."""
    llm = make_llm(model_dir, tova, **llm_kwargs)
    try:
        result = run(llm, requests)
    finally:
        shutdown(llm)
    for i, request in enumerate(requests):
        assert result.tokens[i] == reference_tokens(hf_model, request, tova), i
    return result


def kv_manager(scheduler):
    (manager,) = scheduler.kv_cache_manager.coordinator.single_type_managers
    return manager


def real_blocks(manager, request_id: str) -> int:
    return sum(1 for b in manager.req_to_blocks.get(request_id, ()) if b is not manager._null_block)


def preemption_workload(extra_args: Optional[dict] = None) -> list[Req]:
    """Request 0 starts short and grows towards a budget of 96; the later, long-prompt
    requests evict from their first decode step on.  In a pool of 10 usable blocks
    (``run_with_preemption_log``), request 0's growth makes vLLM preempt the newest running
    request: one that has been evicting for many steps."""
    return [Req(p, n, a, extra_args) for p, n, a in zip(
        random_prompts((10, 110, 120, 100), seed=4), (150, 100, 100, 60), (0, 1, 2, 3))]


def run_with_preemption_log(model_dir, requests: Sequence[Req], cache_size: int,
                            num_blocks: int = 11, **llm_kwargs
                            ) -> tuple[RunResult, list[str]]:
    """Run ``requests`` in a pool of ``num_blocks`` blocks (11 by default); also return the
    ids of requests preempted after their eviction had started.  Prefix caching is off
    unless asked for: copy-on-write's first eviction needs more than 11 blocks at
    max_model_len 320 (``policies.peak_table_blocks``)."""
    llm_kwargs.setdefault("enable_prefix_caching", False)
    llm = make_llm(model_dir, {"cache_size": cache_size}, num_blocks=num_blocks,
                   max_model_len=320, **llm_kwargs)
    scheduler = scheduler_of(llm)
    original = scheduler._preempt_request
    preempted: list[str] = []

    def record(request, *args, **kwargs):
        if request.num_computed_tokens > max(request.num_prompt_tokens, cache_size):
            preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = record
    try:
        return run(llm, requests), preempted
    finally:
        shutdown(llm)
