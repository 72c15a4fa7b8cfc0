"""A shared-prefix workload: TOVA with prefix caching on and off, against vanilla vLLM with
prefix caching on, in the same run and the same fixed KV pool.

N requests share one long system prompt, each followed by a short distinct question, and
generate long answers.  For each engine: time to first token (median and max over the
requests, from the moment all were submitted), prompt tokens actually computed (the rest
were read from the prefix cache), output tokens/s, peak KV blocks in use (cached free
blocks count as free, as vLLM counts them).  CPU, in-process engine; the model is any HF
checkpoint (--model; the prompts are real text, as in bench_engine.py) or a tiny random one.

    python3 scripts/bench_prefix.py --model ~/.cache/tova-vllm/SmolLM2-135M-Instruct
    python3 scripts/bench_prefix.py --requests 32 --system 1024 --question 24 --max-tokens 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def measure(model_dir, tova, prompts, max_tokens: int, *, blocks: int, block_size: int,
            max_model_len: int, prefix_caching: bool) -> dict:
    from vllm import SamplingParams

    from engine_harness import make_llm, shutdown

    name = f"TOVA {tova}" if tova else "vanilla"
    print(f"[bench_prefix] {name}, prefix caching {'on' if prefix_caching else 'off'} ...",
          file=sys.stderr, flush=True)
    llm = make_llm(model_dir, tova, block_size=block_size, num_blocks=blocks,
                   max_model_len=max_model_len, max_num_batched_tokens=2048,
                   max_num_seqs=256, enable_prefix_caching=prefix_caching)
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    try:
        # Warm-up on an unrelated prompt (nothing it caches is shared with the workload).
        engine.add_request("warm", {"prompt_token_ids": list(prompts[-1][-40:])},
                           SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": list(prompt)}, params)
        first_token, cached, produced, peak = {}, {}, 0, 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            peak = max(peak, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
            for out in outputs:
                if out.outputs[0].token_ids and out.request_id not in first_token:
                    first_token[out.request_id] = now - start
                if out.finished:
                    cached[out.request_id] = out.num_cached_tokens or 0
                    produced += len(out.outputs[0].token_ids)
        elapsed = time.perf_counter() - start
    finally:
        shutdown(llm)
    ttft = sorted(first_token.values())
    return {
        "ttft_median_s": statistics.median(ttft), "ttft_max_s": ttft[-1],
        "prompt_computed": sum(len(p) for p in prompts) - sum(cached.values()),
        "tokens_per_s": produced / elapsed, "peak_blocks": peak, "elapsed_s": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="any HF checkpoint dir (default: a tiny random model)")
    parser.add_argument("--arch", default="llama_gqa", help="tiny random model (no --model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system", type=int, default=1024, help="shared prompt tokens")
    parser.add_argument("--question", type=int, default=24, help="distinct tokens per request")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cache-size", type=int, default=127)
    parser.add_argument("--blocks", type=int, default=160, help="KV pool, blocks")
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()

    from engine_harness import random_prompts

    from bench_engine import real_text_prompts

    lengths = [args.system] + [args.question] * args.requests
    if args.model:
        parts = real_text_prompts(lengths, model=args.model)
    else:
        parts = random_prompts(lengths, seed=0)
    system, questions = parts[0], parts[1:]
    prompts = [system + q for q in questions]
    max_model_len = args.system + args.question + args.max_tokens
    tova = {"cache_size": args.cache_size}
    common = dict(blocks=args.blocks, block_size=args.block_size, max_model_len=max_model_len)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = args.model
        else:
            from tiny_models import build_tiny_model

            model = build_tiny_model(args.arch, Path(tmp) / args.arch)
        rows = {
            "vanilla, caching on": measure(model, None, prompts, args.max_tokens,
                                           prefix_caching=True, **common),
            f"TOVA C={args.cache_size}, caching on": measure(
                model, tova, prompts, args.max_tokens, prefix_caching=True, **common),
            f"TOVA C={args.cache_size}, caching off": measure(
                model, tova, prompts, args.max_tokens, prefix_caching=False, **common),
        }

    print(f"\nworkload: {args.requests} requests x ({args.system} shared + {args.question} "
          f"own prompt tokens, {args.max_tokens} generated), pool {args.blocks - 1} usable "
          f"blocks of {args.block_size}, model {args.model or args.arch}")
    print(f"{'engine':<28}{'TTFT med s':>11}{'TTFT max s':>11}{'prompt computed':>16}"
          f"{'out tok/s':>10}{'x vanilla':>10}{'peak blocks':>12}")
    base = rows["vanilla, caching on"]["tokens_per_s"]
    for name, s in rows.items():
        print(f"{name:<28}{s['ttft_median_s']:>11.2f}{s['ttft_max_s']:>11.2f}"
              f"{s['prompt_computed']:>16}{s['tokens_per_s']:>10.1f}"
              f"{s['tokens_per_s'] / base:>10.2f}{s['peak_blocks']:>12}")


if __name__ == "__main__":
    main()
