"""Demo: offline LLM.generate with TOVA on a real model, SmolLM2-135M-Instruct.

Each prompt (chat and plain text; one long passage that TOVA must evict most of) is answered
twice, with the full KV cache (vanilla vLLM) and with TOVA at a small budget, and the KV blocks
each request held are read from the scheduler's own block table.

    python3 scripts/demo.py [--cache-size 128] [--model HF_CHECKPOINT_DIR]

Without --model it builds the real model once (``python3 -m tova_vllm.real_model``); if that
is impossible (no package index) it falls back to a random tiny model and says why.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # engine_harness, and the offline tiny-model fallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# In-process engine, so the demo can read the scheduler's block table.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def long_passage(n_chars: int = 3000) -> str:
    """Prose that ships with every Python: the history section of CPython's LICENSE.txt."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    text = path.read_text() if path.is_file() else ""
    return text[:n_chars].rsplit("\n\n", 1)[0] or "Python was created in the early 1990s. " * 60


# (kind, text): "chat" prompts go through the model's chat template.
PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Give three tips for staying healthy."),
    ("text", "The capital of France is"),
    ("chat", "Summarize this text in two sentences.\n\n" + long_passage()),
]


def render(llm, kind: str, text: str) -> str:
    if kind == "text":
        return text
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def run(model_dir: Path, tova: dict | None, max_tokens: int, block_size: int, ignore_eos: bool):
    from vllm import LLM, SamplingParams

    from engine_harness import kv_manager, real_blocks, scheduler_of

    extra = {"additional_config": {"tova": tova}} if tova else {}
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=2048, block_size=block_size,
              enforce_eager=True, seed=0, **extra)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    prompt_lens = {}
    for i, (kind, text) in enumerate(PROMPTS):
        prompt = render(llm, kind, text)
        prompt_lens[i] = len(llm.get_tokenizer().encode(prompt, add_special_tokens=False))
        engine.add_request(str(i), prompt, params)
    scheduler = scheduler_of(llm)
    peak, decoding, texts = {}, {}, {}  # blocks: most at any time / most while generating
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[int(out.request_id)] = out.outputs[0].text
        manager = kv_manager(scheduler)
        for request in scheduler.running:
            rid = int(request.request_id.split("-")[0])
            held = real_blocks(manager, request.request_id)
            peak[rid] = max(peak.get(rid, 0), held)
            if request.num_computed_tokens > request.num_prompt_tokens:
                decoding[rid] = max(decoding.get(rid, 0), held)
    return texts, (peak, decoding), prompt_lens


def pick_model(arg: str | None, tmp: str) -> tuple[Path, str, bool]:
    """(checkpoint, description, is_real)."""
    if arg:
        return Path(arg), arg, True
    from tova_vllm import real_model

    try:
        if not real_model.is_built():
            print("building the real model once (about 2 minutes) ...", flush=True)
        return real_model.build(), "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", True
    except (real_model.ModelBuildError, ImportError) as err:
        from tiny_models import build_tiny_model

        print(f"\nFALLBACK: the real model could not be built ({err}).\n"
              "Running on a random tiny model instead: its text is gibberish; only the KV "
              "blocks held are meaningful.\n", flush=True)
        return build_tiny_model("llama_gqa", Path(tmp) / "tiny"), "random tiny llama_gqa", False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="any HF checkpoint directory (default: the real model)")
    parser.add_argument("--cache-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, what, real = pick_model(args.model, tmp)
        print("[1/2] full KV cache (vanilla vLLM) ...", flush=True)
        full_texts, full_peak, lens = run(model_dir, None, args.max_tokens, args.block_size,
                                          ignore_eos=not real)
        print(f"[2/2] TOVA, cache_size={args.cache_size} ...", flush=True)
        tova_texts, tova_peak, _ = run(model_dir, {"cache_size": args.cache_size},
                                       args.max_tokens, args.block_size, ignore_eos=not real)

    print(f"\nmodel: {what}; TOVA cache_size={args.cache_size} tokens per layer, "
          f"block_size={args.block_size}, greedy, max_tokens={args.max_tokens}\n")
    for i, (kind, text) in enumerate(PROMPTS):
        shown = text if len(text) < 70 else f"{text[:60]}... ({lens[i]} prompt tokens)"
        print(f"--- request {i} ({kind}): {shown!r}")
        for name, texts, (peak, decoding) in (("full cache", full_texts, full_peak),
                                              ("TOVA", tova_texts, tova_peak)):
            print(f"  {name:<10} [{decoding.get(i, 0):>3} KV blocks, peak {peak.get(i, 0):>3}]: "
                  f"{texts[i].strip()!r}")
        print()
    print("KV blocks: the most a request held while generating; peak includes the prompt's "
          "prefill, which TOVA's default prompt_mode='prompt' attends to in full before "
          "evicting.")
    for name, (peak, decoding) in (("full cache", full_peak), ("TOVA", tova_peak)):
        print(f"  {name:<10} all requests: {sum(decoding.values())} while generating, "
              f"{sum(peak.values())} peak")


if __name__ == "__main__":
    main()
