"""Demo: offline LLM.generate with TOVA on a tiny model built on the spot (no downloads).

Prints the generated text of each request and the KV blocks each request held, with
eviction (TOVA, cache_size C) and without (vanilla vLLM), from the scheduler's own block
table.  Run:  python3 scripts/demo.py [--cache-size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the offline tiny-model builder lives with the tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# In-process engine, so the demo can read the scheduler's block table.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time",
    "A long list: " + ", ".join(str(i) for i in range(60)),
]


def run(model_dir: Path, tova: dict | None, max_tokens: int, block_size: int):
    from vllm import LLM, SamplingParams

    from engine_harness import kv_manager, real_blocks, scheduler_of

    extra = {"additional_config": {"tova": tova}} if tova else {}
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=2048, block_size=block_size,
              enforce_eager=True, seed=0, **extra)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    scheduler = scheduler_of(llm)
    peak, texts = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[int(out.request_id)] = out.outputs[0].text
        manager = kv_manager(scheduler)
        for request in scheduler.running:
            rid = int(request.request_id.split("-")[0])
            peak[rid] = max(peak.get(rid, 0), real_blocks(manager, request.request_id))
    return texts, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--arch", default="llama_gqa")
    args = parser.parse_args()

    from tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(args.arch, Path(tmp) / args.arch)
        vanilla_texts, vanilla_peak = run(model_dir, None, args.max_tokens, args.block_size)
        tova_texts, tova_peak = run(model_dir, {"cache_size": args.cache_size},
                                    args.max_tokens, args.block_size)

    print(f"\nTOVA cache_size={args.cache_size}, block_size={args.block_size}, "
          f"max_tokens={args.max_tokens} (random tiny {args.arch}: the text is gibberish)\n")
    for i, prompt in enumerate(PROMPTS):
        print(f"request {i}: prompt {prompt[:40]!r}...")
        print(f"  TOVA output:    {tova_texts[i][:70]!r}")
        print(f"  vanilla output: {vanilla_texts[i][:70]!r}")
    print(f"\n{'request':>8} {'peak KV blocks (vanilla)':>26} {'peak KV blocks (TOVA)':>23}")
    for i in range(len(PROMPTS)):
        print(f"{i:>8} {vanilla_peak[i]:>26} {tova_peak[i]:>23}")
    print(f"{'total':>8} {sum(vanilla_peak.values()):>26} {sum(tova_peak.values()):>23}")


if __name__ == "__main__":
    main()
