"""Decode-step cost of TOVA's eviction on CPU at realistic layer shapes, against vLLM's own
CPU attention kernel for the same step, in the same run.

One layer, one decode step: E requests each attend with one query over C + 1 cached
positions (vLLM's kernel, what vanilla pays at that context), then TOVA scores those
positions (last-query softmax over all heads), picks the token to drop and moves one token
(what TOVA adds).  Shapes default to a Llama-3-8B layer (32 query / 8 KV heads, head 128);
``--model`` takes them from a checkpoint's config.json.

    python3 scripts/bench_eviction_cpu.py [--requests 32 --cache-size 512 --dtype bfloat16]
    python3 scripts/bench_eviction_cpu.py --model ~/.cache/tova-vllm/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", help="HF checkpoint dir: its heads and head size")
    args = parser.parse_args()
    if args.model:
        with open(f"{args.model}/config.json") as f:
            cfg = json.load(f)
        args.q_heads, args.kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        args.head_size = cfg.get("head_dim") or cfg["hidden_size"] // args.q_heads
        print(f"shapes of {args.model}: {args.q_heads} query / {args.kv_heads} KV heads "
              f"of {args.head_size}")

    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from tova_vllm.engine.cpu_evictor import CpuEvictor
    from tova_vllm.engine.plan import EvictionBatch

    dtype = getattr(torch, args.dtype)
    # vLLM's bf16 kernel uses AMX where the CPU has it; Linux lets a process run AMX only
    # after asking (vLLM's worker does it; this script runs no worker).
    if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()
    E, C, bs, D = args.requests, args.cache_size, args.block_size, args.head_size
    live = C + 1
    per_row = -(-live // bs)
    num_blocks = E * per_row + 1
    isa = _get_attn_isa(dtype, bs, D, "auto")
    cache = torch.randn(num_blocks, args.kv_heads, bs, 2 * D).to(dtype)
    pages = cache.view(num_blocks, args.kv_heads, 2 * bs, D)
    key_cache, value_cache = pages.chunk(2, dim=2)
    block_table = (torch.randperm(num_blocks - 1)[: E * per_row] + 1).view(E, per_row).to(torch.int32)
    query = torch.randn(E, args.q_heads, D).to(dtype)
    scale = D ** -0.5

    seq_lens = torch.full((E,), live, dtype=torch.int32)
    qsl = torch.arange(E + 1, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=E, num_heads=args.q_heads, num_kv_heads=args.kv_heads, head_dim=D,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False, kv_cache_dtype="auto")
    out = torch.empty_like(query)

    def attention():
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=block_table, softcap=0.0,
            scheduler_metadata=metadata, s_aux=None, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")

    # The engine's own eviction path: the batch the planner makes for steady decode
    # (every row C + 1 live, one drop each), prepared once, evicted by the CPU evictor.
    positions = torch.arange(live)
    rows = torch.arange(E)
    ev = EvictionBatch(
        rows=rows, query_index=rows, query_position=torch.full((E,), 10 * live),
        block_ids=block_table.long()[:, positions // bs], block_offsets=(positions % bs).expand(E, live),
        live=torch.full((E,), live), keep=torch.full((E,), C), keep_list=[C] * E,
        live_list=[live] * E, one_drop_each=True,
    ).prepared(bs, torch.device("cpu"))
    evictor = CpuEvictor(isa, D, args.q_heads, scale)

    def evict():
        evictor.evict(query, pages, ev)

    from tova_vllm.engine.layer_batch import LayerBatch

    # With tensor parallelism (an all-reduce between the head sums and the choice; here
    # the identity) the attention only scores, and the drop and move wait for the step's
    # end; alone, the attention also drops and moves each row while its pages are hot.
    scoring_only = CpuEvictor(isa, D, args.q_heads, scale, lambda summed: summed)

    def attend_and_evict(scorer=evictor):
        # What a steady step does in the engine: attention gives the scores (one pass
        # over K and V), then the drop and the move.
        batch = LayerBatch(ev, 1, attention_scores=True)
        if not scorer.attend_and_score(query, pages, block_table, seq_lens, out, batch):
            raise SystemExit("this layout has no fused decode attention")
        batch.add(scorer, pages, None)

    def attend_only():
        batch = LayerBatch(ev, 1, attention_scores=True)
        scoring_only.attend_and_score(query, pages, block_table, seq_lens, out, batch)

    def timed(fn):
        fn()
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    import os

    from tova_vllm.engine import native

    t_attn, t_evict = timed(attention), timed(evict)
    fused = native.attends(evictor.layout(pages), pages)
    if fused:
        t_fused, t_step = timed(attend_only), timed(attend_and_evict)
        t_step_end = timed(lambda: attend_and_evict(scoring_only))
    reader = "in place (C)" if native.library() is not None else "torch copy"
    # The same eviction with K copied by torch, as without a C compiler.
    os.environ["TOVA_VLLM_NATIVE"] = "0"
    native.library.cache_clear()
    t_copy = timed(evict)
    kv_mb = 2 * E * live * args.kv_heads * D * torch.finfo(dtype).bits / 8 / 1e6
    print(f"one layer, one decode step: {E} requests x {live} cached positions, "
          f"{args.q_heads}/{args.kv_heads} heads x {D}, {args.dtype}, isa {isa}, "
          f"{torch.get_num_threads()} threads, K+V {kv_mb:.0f} MB")
    print(f"  vLLM attention kernel   {t_attn:8.2f} ms")
    print(f"  TOVA eviction           {t_evict:8.2f} ms  (x{t_evict / t_attn:.2f} of attention)"
          f"  K read {reader}")
    print(f"  TOVA eviction, K copied {t_copy:8.2f} ms  (x{t_copy / t_attn:.2f} of attention)"
          "  TOVA_VLLM_NATIVE=0")
    if fused:
        print(f"  TOVA attention + scores {t_fused:8.2f} ms  (x{t_fused / t_attn:.2f} of attention)"
              "  one pass over K and V (steady decode in the engine)")
        print(f"  ... + drop and move     {t_step:8.2f} ms  (x{t_step / t_attn:.2f}): TOVA adds "
              f"x{(t_step - t_attn) / t_attn:+.2f} of attention to the step  (in the "
              "attention call)")
        print(f"  ... same, at step end   {t_step_end:8.2f} ms  (x{t_step_end / t_attn:.2f})"
              "  (tensor parallel: after the all-reduce)")


if __name__ == "__main__":
    main()
