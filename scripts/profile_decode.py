"""Where a steady decode step's time goes: vanilla vLLM vs TOVA at equal live context.

Runs ``--requests`` requests whose prompts are ``--cache-size`` tokens long in a pool big
enough for all, and times every decode step in which all of them decode.  TOVA keeps C + 1
positions and evicts one per request and layer; vanilla attends over C..C+steps positions
(no eviction).  Stages are timed by wrapping the functions that run them (wall clock,
summed per step, median over steps); ``--torch-profile`` adds the top operators of a few
TOVA steps.  CPU, in-process engine, tiny random model (``--arch``) or any HF checkpoint
(``--model``).

    python3 scripts/profile_decode.py
    python3 scripts/profile_decode.py --model ~/.cache/tova-vllm/SmolLM2-135M-Instruct \\
        --requests 16 --policies tova,window
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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


class StageClock:
    """Wall time of wrapped functions, summed per engine step (nested calls count in
    each stage that encloses them)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = collections.defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner, attr: str, stage: str) -> None:
        original = getattr(owner, attr)
        clock = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.current[stage] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def end_step(self, keep: bool) -> None:
        if keep:
            self.steps.append(dict(self.current))
        self.current = collections.defaultdict(float)

    def medians_ms(self) -> dict[str, float]:
        names = sorted({k for s in self.steps for k in s})
        return {k: statistics.median(s.get(k, 0.0) for s in self.steps) * 1e3 for k in names}


def instrument(clock: StageClock) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from tova_vllm.engine import (cpu_evictor, evictor, native,
                                  phased_builder, phase_loop)
    from tova_vllm.policies import selection

    clock.wrap(GPUModelRunner, "execute_model", "runner.execute_model")
    clock.wrap(GPUModelRunner, "_build_attention_metadata", "metadata build (all groups)")
    clock.wrap(phased_builder.TovaPhasedBuilder, "_plan", "tova: plan")
    clock.wrap(phased_builder.TovaPhasedBuilder, "_phase_metadata", "tova: phase metadata")
    clock.wrap(phased_builder.TovaPhasedBuilder, "_next_steady_step",
               "tova: steady step (last plan reused)")
    clock.wrap(CPUAttentionBackendImpl, "forward", "attention kernel (stock forward)")
    clock.wrap(phase_loop.TovaImplMixin, "forward", "tova: layer forward (incl. kernel)")
    clock.wrap(evictor.Evictor, "evict", "tova: evict")
    clock.wrap(cpu_evictor.CpuEvictor, "evict_layers", "tova: evict_layers (all layers at once)")
    # Inside evict_layers (the side state's move is a copy_slots call of its own).
    clock.wrap(cpu_evictor, "write_positions", "tova: evict_layers/side state positions")
    clock.wrap(native, "position_drops",
               "tova: evict_layers/drops by position (side state written, moved)")
    clock.wrap(cpu_evictor.CpuEvictor, "_layer_tova_scores",
               "tova: evict_layers/TOVA scores from K")
    clock.wrap(cpu_evictor.CpuEvictor, "_layer_policy_scores", "tova: evict_layers/policy scores")
    clock.wrap(native, "decode_drops", "tova: evict_layers/drops")
    clock.wrap(native, "copy_slots", "tova: evict_layers/moves (K, V, side state)")
    clock.wrap(native, "decode_attention", "tova: attention that scores (C)")
    clock.wrap(cpu_evictor.CpuEvictor, "tova_scores", "tova: evict/scores")
    clock.wrap(cpu_evictor.CpuEvictor, "compact", "tova: evict/compact")
    clock.wrap(cpu_evictor.CpuEvictor, "decode_moves", "tova: evict/decode_moves")
    del selection


MAX_MODEL_LEN = 1024


def profile(model_dir, tova, prompts, steps: int, torch_profile: bool, clock: StageClock,
            prefix_caching: bool = True):
    from engine_harness import make_llm, shutdown
    from vllm import SamplingParams

    llm = make_llm(model_dir, tova, block_size=32, num_blocks=4096, max_model_len=MAX_MODEL_LEN,
                   max_num_batched_tokens=4096, max_num_seqs=256,
                   enable_prefix_caching=prefix_caching)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": list(p)}, params)
    step_times, prof = [], None
    try:
        n = 0
        while engine.has_unfinished_requests():
            decoding = (len(scheduler.running) == len(prompts) and
                        all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running))
            ctx = contextlib.nullcontext()
            if torch_profile and decoding and n == steps // 2:
                from torch.profiler import ProfilerActivity, profile as tprofile
                prof = tprofile(activities=[ProfilerActivity.CPU])
                ctx = prof
            start = time.perf_counter()
            with ctx:
                engine.step()
            elapsed = time.perf_counter() - start
            # Skip the first decode steps (warm-up: buffers, layout probe).
            keep = decoding and n >= 3
            clock.end_step(keep)
            if keep:
                step_times.append(elapsed)
            n += decoding
    finally:
        shutdown(llm)
    return step_times, prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama_gqa")
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--cache-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--policies", default="tova")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine this many times, round-robin, and pool the "
                             "steps (a 2-core machine drifts between back-to-back runs)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="every engine without prefix caching (TOVA evicts in place)")
    parser.add_argument("--no-eviction", action="store_true",
                        help="also TOVA with a budget no request reaches (C = the model "
                             "length): the plugin's cost when it evicts nothing, on "
                             "vanilla's exact workload")
    args = parser.parse_args()

    from bench_engine import real_text_prompts
    from engine_harness import random_prompts
    from tiny_models import build_tiny_model

    lengths = [args.cache_size] * args.requests
    prompts = (real_text_prompts(lengths, seed=1, model=args.model) if args.model
               else random_prompts(lengths, seed=1))
    clock = StageClock()
    instrument(clock)
    engines = [("vanilla", None)] + [
        (p, {"cache_size": args.cache_size, "policy": p}) for p in args.policies.split(",")]
    if args.no_eviction:
        engines.append(("tova C>=len", {"cache_size": MAX_MODEL_LEN}))
    times = {name: [] for name, _ in engines}
    stage_steps = {name: [] for name, _ in engines}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(args.arch, Path(tmp) / args.arch)
        for r in range(args.rounds):
            for name, tova in engines:
                print(f"[profile] round {r + 1} of {args.rounds}: {name} ...", file=sys.stderr,
                      flush=True)
                clock.steps = []
                step_times, prof = profile(model, tova, prompts, args.steps,
                                           args.torch_profile and r == 0, clock,
                                           args.prefix_caching)
                times[name] += step_times
                stage_steps[name] += clock.steps
                if prof is not None:
                    print(f"\n--- torch profiler, one {name} decode step ---")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                    row_limit=25))
    rows = {}
    for name in times:
        clock.steps = stage_steps[name]
        rows[name] = (statistics.median(times[name]) * 1e3, len(times[name]),
                      clock.medians_ms())

    base = rows["vanilla"][0]
    print(f"\nsteady decode, {args.requests} requests at live context {args.cache_size}, "
          f"model {args.model or args.arch}, prefix caching "
          f"{'on' if args.prefix_caching else 'off'} (median ms per step, {args.rounds} round(s))")
    for name, (step_ms, n, stages) in rows.items():
        print(f"\n{name}: step {step_ms:.2f} ms ({step_ms / base:.2f}x vanilla), {n} steps")
        for stage, ms in stages.items():
            print(f"  {stage:<40}{ms:8.2f}")


if __name__ == "__main__":
    main()
