"""Vanilla vLLM vs TOVA in the same run, on a long-generation workload with a fixed KV pool.

Prints, for each engine: output tokens/s, peak KV blocks in use, most requests decoding at
once, preemptions; then the decode-step cost of eviction at equal live context, and the
overhead of the plugin when nothing is evicted (C >= every length).  Ratios are against
vanilla measured in this run.  CPU, in-process engine; the model is a tiny random one (see
--arch) or any HF checkpoint (--model, prompts then cut from real text: CPython's
LICENSE.txt and the standard library's sources).  The ratios are the point.

    python3 scripts/bench_engine.py [--requests 16 --prompt 64 --max-tokens 512 --blocks 64]
    python3 scripts/bench_engine.py --model ~/.cache/tova-vllm/SmolLM2-135M-Instruct
    python3 scripts/bench_engine.py --policies tova,window,sink_window,h2o   # policy costs
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def measure(model_dir, tova, requests, *, blocks, block_size, max_model_len, long_after=0,
            prefix_caching=True):
    from engine_harness import make_llm, run, shutdown

    print(f"[bench] {len(requests)} requests, TOVA settings {tova or 'none (vanilla)'} ...",
          file=sys.stderr, flush=True)
    llm = make_llm(model_dir, tova, block_size=block_size, num_blocks=blocks,
                   max_model_len=max_model_len, max_num_batched_tokens=2048, max_num_seqs=256,
                   enable_prefix_caching=prefix_caching)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    stats = {"peak_blocks": 0, "max_decoding": 0, "preemptions": 0, "decode_step_s": []}
    original_preempt = scheduler._preempt_request

    def count_preempt(*args, **kwargs):
        stats["preemptions"] += 1
        return original_preempt(*args, **kwargs)

    scheduler._preempt_request = count_preempt
    pool = scheduler.kv_cache_manager.block_pool
    last = [time.perf_counter()]

    def observe(sched):
        now = time.perf_counter()
        running = sched.running
        if running and all(r.num_computed_tokens > r.num_prompt_tokens for r in running):
            stats["decode_step_s"].append((now - last[0], len(running)))
        last[0] = now
        stats["peak_blocks"] = max(stats["peak_blocks"], pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        # Requests decoding deep into their generation at once: where memory binds.
        stats["max_decoding"] = max(stats["max_decoding"], sum(
            r.num_computed_tokens > max(r.num_prompt_tokens, long_after) for r in running))

    try:
        run(llm, requests[:2])  # warm-up
        stats["preemptions"] = 0
        start = time.perf_counter()
        last[0] = start
        result = run(llm, requests, after_step=observe)
        elapsed = time.perf_counter() - start
    finally:
        shutdown(llm)
    stats["tokens_per_s"] = sum(len(t) for t in result.tokens.values()) / elapsed
    stats["elapsed_s"] = elapsed
    return stats


def _median_run(runs: list[dict]) -> dict:
    """One engine's rounds: median tokens/s, the largest peak and concurrency, the median
    preemption count."""
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in runs),
            "peak_blocks": max(s["peak_blocks"] for s in runs),
            "max_decoding": max(s["max_decoding"] for s in runs),
            "preemptions": statistics.median_low(s["preemptions"] for s in runs)}


def _pooled_steps(runs: list[dict]) -> dict:
    return {"decode_step_s": [step for s in runs for step in s["decode_step_s"]]}


def real_text_prompts(lengths, seed: int = 0, *, model: str) -> list[tuple[int, ...]]:
    """Consecutive, distinct slices of real text (it ships with every Python) in the
    model's tokens."""
    import sysconfig

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [root / "LICENSE.txt"] + sorted(root.glob("*.py"))
    ids: list[int] = []
    for path in sources:
        if len(ids) >= sum(lengths) + seed * 997:
            break
        ids += tok.encode(path.read_text(errors="replace"), add_special_tokens=False)
    start, out = seed * 997, []
    for n in lengths:
        out.append(tuple(ids[start:start + n]))
        start += n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama_gqa", help="tiny random model (no --model)")
    parser.add_argument("--model", help="any HF checkpoint dir (prompts: real text)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--cache-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--policies", default="tova",
                        help="comma-separated eviction policies to measure at --cache-size")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every engine this many times, round-robin, and report "
                             "medians (a shared machine's speed drifts between engines)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="every engine, vanilla too, without prefix caching (TOVA then "
                        "evicts in place instead of copy-on-write)")
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]

    from engine_harness import Req, random_prompts
    from tiny_models import build_tiny_model

    bs = args.block_size
    max_model_len = min(args.prompt + args.max_tokens, (args.blocks - 1) * bs)
    prompts = real_text_prompts if args.model else random_prompts
    requests = [Req(p, args.max_tokens, 0) for p in prompts([args.prompt] * args.requests, **(
        {"model": args.model} if args.model else {}))]
    # Equal live context: vanilla decodes at context C..C+steps, TOVA holds C throughout.
    step_requests = [Req(p, 64, 0) for p in prompts([args.cache_size] * 8, seed=1, **(
        {"model": args.model} if args.model else {}))]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(args.arch, Path(tmp) / args.arch)
        long_after = args.prompt + args.max_tokens // 2
        common = dict(blocks=args.blocks, block_size=bs, max_model_len=max_model_len,
                      long_after=long_after, prefix_caching=args.prefix_caching)
        per_request = -(-(args.prompt + args.max_tokens) // bs)
        engines = [("vanilla", None, common),
                   # The ceiling: vanilla with a pool that holds every request at full length.
                   ("vanilla, pool for all", None,
                    dict(common, blocks=args.requests * per_request + 1))]
        engines += [(f"{policy} C={args.cache_size}", {"cache_size": args.cache_size,
                                                       "policy": policy}, common)
                    for policy in policies]
        engines.append(("TOVA C>=len (no eviction)", {"cache_size": max_model_len}, common))
        big = dict(blocks=4096, block_size=bs, max_model_len=1024,
                   prefix_caching=args.prefix_caching)
        step_engines = [("vanilla", None)] + [
            (policy, {"cache_size": args.cache_size, "policy": policy}) for policy in policies]
        runs = {name: [] for name, _, _ in engines}
        step_runs = {name: [] for name, _ in step_engines}
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"[bench] round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for name, tova, settings in engines:
                runs[name].append(measure(model, tova, requests, **settings))
            for name, tova in step_engines:
                step_runs[name].append(measure(model, tova, step_requests, **big))
        rows = {name: _median_run(stats) for name, stats in runs.items()}
        step_vanilla = _pooled_steps(step_runs["vanilla"])
        step_policy = {name: _pooled_steps(step_runs[name]) for name, _ in step_engines[1:]}

    print(f"\nworkload: {args.requests} requests x (prompt {args.prompt} + {args.max_tokens} "
          f"generated), pool {args.blocks - 1} usable blocks of {bs} tokens, "
          + (f"median of {args.rounds} round-robin rounds, " if args.rounds > 1 else "")
          + f"model {args.model or args.arch}, prefix caching "
          f"{'on (TOVA: copy-on-write)' if args.prefix_caching else 'off'}")
    print(f"{'engine':<28}{'out tok/s':>10}{'x vanilla':>10}{'peak blocks':>12}"
          f"{'max at >' + str(long_after) + ' tok':>17}{'preemptions':>12}")
    base = rows["vanilla"]["tokens_per_s"]
    for name, s in rows.items():
        print(f"{name:<28}{s['tokens_per_s']:>10.1f}{s['tokens_per_s'] / base:>10.2f}"
              f"{s['peak_blocks']:>12}{s['max_decoding']:>17}{s['preemptions']:>12}")

    def per_step(stats):
        times = [t for t, n in stats["decode_step_s"] if n == 8]
        return statistics.median(times) * 1e3 if times else float("nan")

    v = per_step(step_vanilla)
    print(f"\ndecode step, 8 requests at live context {args.cache_size} "
          f"(vanilla: {args.cache_size}..{args.cache_size + 64} tokens, no eviction; "
          f"policies: {args.cache_size} kept + 1, one eviction per request and layer):")
    print(f"  vanilla {v:.2f} ms")
    for policy, stats in step_policy.items():
        t = per_step(stats)
        print(f"  {policy:<12}{t:.2f} ms   ratio {t / v:.2f}")


if __name__ == "__main__":
    main()
