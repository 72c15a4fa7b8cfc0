"""TOVA's GPU kernels: scoring bandwidth, and the decode-step cost of eviction vs attention.

On CUDA, in one run:

* the device's copy bandwidth (``torch`` copy of a large buffer, read + write bytes);
* the Triton scoring kernel's achieved bandwidth (bytes of paged K it must read / time),
  one-pass (log-sum-exp handed in, as from the attention kernel) and two-pass (it computes
  the log-sum-exp itself), as a fraction of the copy bandwidth;
* the decode step of eviction: score + argmin + the one compaction move per row (the
  fused ``decode_evict``; the three-kernel path too), eager and replayed from a CUDA
  graph, against attention alone for the same step
  (``scaled_dot_product_attention`` over the cache gathered to contiguous
  ``[rows, kv_heads, live, head_dim]``, gather not timed; also vLLM's / flash-attn's paged
  ``flash_attn_with_kvcache`` when one of them imports).

Off CUDA it says it needs a GPU and exits 0.

    python3 scripts/bench_kernels.py [--dtype bf16] [--configs 64x2048,16x4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Mean seconds per call, CUDA events around ``iters`` back-to-back calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def graph_time(fn, iters: int) -> float:
    """Mean seconds per replay of ``fn`` captured in a CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, iters)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), 20)
    return 2 * nbytes / seconds


def paged_cache(rows, live, kv_heads, head_dim, block_size, dtype, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    per_row = -(-live // block_size)
    num_blocks = rows * per_row + 8
    table = torch.randperm(num_blocks, device="cuda", generator=g)[: rows * per_row]
    table = table.view(rows, per_row).to(torch.int32)
    kv = torch.randn((2, num_blocks, block_size, kv_heads, head_dim), device="cuda", dtype=dtype, generator=g)
    return kv[0], kv[1], table


def flash_paged():
    """A paged ``flash_attn_with_kvcache`` if importable: (name, fn) or (None, None)."""
    for name in ("vllm.vllm_flash_attn", "flash_attn"):
        try:
            module = __import__(name, fromlist=["flash_attn_with_kvcache"])
            return name, module.flash_attn_with_kvcache
        except Exception:  # noqa: BLE001  (absent or broken build: just skip it)
            continue
    return None, None


def bench_config(rows, live, q_heads, kv_heads, head_dim, block_size, dtype, iters, tiles):
    import torch
    import torch.nn.functional as F

    from tova_vllm.kernels import torch_ref
    from tova_vllm.kernels import triton_scoring as T

    kc, vc, bt = paged_cache(rows, live, kv_heads, head_dim, block_size, dtype)
    q = torch.randn((rows, q_heads, head_dim), device="cuda", dtype=dtype)
    lv = torch.full((rows,), live, dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    k_bytes = rows * live * kv_heads * head_dim * kc.element_size()
    result = {"rows": rows, "live": live, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "block_size": block_size, "dtype": str(dtype).split(".")[-1], "k_bytes": k_bytes}

    # correctness guard before timing
    want = torch_ref.paged_tova_scores(q, kc, bt, lv, scale)
    lse = T.paged_lse(q, kc, bt, lv, scale)
    got = T.paged_tova_scores(q, kc, bt, lv, scale, lse)
    result["max_rel_err"] = float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())
    del want

    # kernel times from CUDA-graph replays (eager launches of these small kernels are
    # host-bound: Triton's Python launch path costs tens of microseconds each)
    scores = torch.empty((rows, live), device="cuda")
    tile_times = {}
    for tile in tiles:
        tile_times[tile] = graph_time(lambda: T.paged_tova_scores(q, kc, bt, lv, scale, lse, out=scores, tile_n=tile), iters)
    best_tile = min(tile_times, key=tile_times.get)
    default = graph_time(lambda: T.paged_tova_scores(q, kc, bt, lv, scale, lse, out=scores), iters)
    lse_buf = torch.empty_like(lse)
    lse_time = graph_time(lambda: T.paged_lse(q, kc, bt, lv, scale, out=lse_buf), iters)
    lse_one_split = graph_time(lambda: T.paged_lse(q, kc, bt, lv, scale, out=lse_buf, splits=1), iters)
    two_pass = graph_time(lambda: T.paged_tova_scores(q, kc, bt, lv, scale, out=scores), iters)
    result.update({
        "default_tile": T._default_tile(rows, live, kc.device),
        "score_one_pass_s": default,
        "score_one_pass_eager_s": cuda_time(lambda: T.paged_tova_scores(q, kc, bt, lv, scale, lse, out=scores), iters),
        "score_one_pass_GBps": k_bytes / default / 1e9,
        "score_tiles_s": {str(t): s for t, s in tile_times.items()},
        "best_tile": best_tile,
        "lse_s": lse_time,
        "lse_splits": T._lse_splits(rows, kv_heads, live, 64, kc.device)[0],
        "lse_one_split_s": lse_one_split,
        "score_two_pass_s": two_pass,
        "score_two_pass_GBps": 2 * k_bytes / two_pass / 1e9,
        "argmin_s": graph_time(lambda: T.decode_drop_slot(scores, lv), iters),
    })
    drop = T.decode_drop_slot(scores, lv)
    src, dst, row = T.decode_moves(drop, lv)
    k2, v2 = kc.clone(), vc.clone()
    result["compact_s"] = graph_time(lambda: T.compact_paged(k2, v2, bt, src, dst, row), iters)

    result["decode_evict_s"] = graph_time(lambda: T.decode_evict(scores, lv, k2, v2, bt), iters)

    def evict_step(lse_in):  # what a decode step runs after attention: two launches
        s = T.paged_tova_scores(q, k2, bt, lv, scale, lse_in, out=scores)
        T.decode_evict(s, lv, k2, v2, bt)

    def evict_step_unfused(lse_in):
        s = T.paged_tova_scores(q, k2, bt, lv, scale, lse_in, out=scores)
        d = T.decode_drop_slot(s, lv)
        T.compact_paged(k2, v2, bt, *T.decode_moves(d, lv))

    result["evict_step_s"] = cuda_time(lambda: evict_step(lse), iters)
    result["evict_step_graph_s"] = graph_time(lambda: evict_step(lse), iters)
    result["evict_step_unfused_graph_s"] = graph_time(lambda: evict_step_unfused(lse), iters)
    result["evict_step_two_pass_graph_s"] = graph_time(lambda: evict_step(None), iters)
    result["lse_tiles_s"] = {
        str(t): graph_time(lambda: T.paged_lse(q, kc, bt, lv, scale, out=lse_buf, tile_n=t), iters) for t in (32, 64)
    }

    # attention alone, same step: SDPA over the gathered cache (gather not timed)
    keys = torch_ref.gather_keys(kc, bt, lv, live).contiguous()
    values = torch_ref.gather_keys(vc, bt, lv, live).contiguous()
    qs = q.unsqueeze(2)  # [rows, q_heads, 1, head_dim]
    try:
        attn = lambda: F.scaled_dot_product_attention(qs, keys, values, scale=scale, enable_gqa=True)  # noqa: E731
        attn()
    except (TypeError, RuntimeError):
        rep = q_heads // kv_heads
        keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        attn = lambda: F.scaled_dot_product_attention(qs, keys, values, scale=scale)  # noqa: E731
    result["sdpa_s"] = cuda_time(attn, iters)
    result["sdpa_graph_s"] = graph_time(attn, iters)
    del keys, values

    name, flash = flash_paged()
    if flash is not None:
        try:
            q4 = q.unsqueeze(1)  # [rows, 1, q_heads, head_dim]
            fa = lambda: flash(q4, kc, vc, cache_seqlens=lv, block_table=bt, softmax_scale=scale, causal=True)  # noqa: E731
            fa()
            result["flash_paged"] = name
            result["flash_paged_s"] = cuda_time(fa, iters)
        except Exception as exc:  # noqa: BLE001  (e.g. flash-attn's 256-token page minimum)
            result["flash_paged"] = f"{name}: {type(exc).__name__}: {str(exc)[:120]}"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--configs", default="1x4096,4x2048,16x4096,64x2048,128x1024",
                        help="comma-separated ROWSxLIVE (live = C + 1 in a decode step)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tiles", default="16,32,64,128", help="tile sizes to sweep for the one-pass kernel")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the Triton kernels only run compiled there); "
              "nothing to measure on this machine.")
        return 0

    dtype = getattr(torch, DTYPES[args.dtype])
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(f"device: {device}; torch {torch.__version__}")
    print(f"copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s")
    results = []
    header = (f"{'rows':>5} {'live':>5} | {'score 1p':>9} {'GB/s':>6} {'%copy':>6} {'tile':>4} | {'2-pass':>9} {'GB/s':>6} |"
              f" {'argmin':>8} {'compact':>8} | {'ev eager':>9} {'ev graph':>9} {'ev 2p gr':>9} |"
              f" {'sdpa':>9} {'sdpa gr':>9} {'ev/attn':>7} | {'relerr':>7}")
    print(f"dtype {args.dtype}, q_heads {args.q_heads}, kv_heads {args.kv_heads}, head_dim {args.head_dim}, "
          f"block_size {args.block_size}; times in microseconds")
    print(header)
    tiles = [int(t) for t in args.tiles.split(",") if t]
    for spec in args.configs.split(","):
        rows, live = (int(x) for x in spec.lower().split("x"))
        r = bench_config(rows, live, args.q_heads, args.kv_heads, args.head_dim, args.block_size, dtype,
                         args.iters, tiles)
        r["copy_GBps"] = copy_bw / 1e9
        results.append(r)
        us = lambda s: f"{s * 1e6:9.1f}"  # noqa: E731
        print(f"{rows:>5} {live:>5} | {us(r['score_one_pass_s'])} {r['score_one_pass_GBps']:6.0f}"
              f" {100 * r['score_one_pass_GBps'] * 1e9 / copy_bw:5.1f}% {r['default_tile']:>4} |"
              f" {us(r['score_two_pass_s'])} {r['score_two_pass_GBps']:6.0f} |"
              f" {r['argmin_s'] * 1e6:8.1f} {r['compact_s'] * 1e6:8.1f} |"
              f" {us(r['evict_step_s'])} {us(r['evict_step_graph_s'])} {us(r['evict_step_two_pass_graph_s'])} |"
              f" {us(r['sdpa_s'])} {us(r['sdpa_graph_s'])} {r['evict_step_graph_s'] / r['sdpa_graph_s']:7.2f} |"
              f" {r['max_rel_err']:7.1e}")
        if "flash_paged" in r:
            extra = f"{r['flash_paged_s'] * 1e6:.1f} us" if "flash_paged_s" in r else ""
            print(f"      paged flash attention ({r['flash_paged']}): {extra}")
        print("      one-pass tile sweep (us): " + ", ".join(f"{t}: {s * 1e6:.1f}" for t, s in r["score_tiles_s"].items())
              + f"; eager one-pass {r['score_one_pass_eager_s'] * 1e6:.1f}; lse pass {r['lse_s'] * 1e6:.1f}"
              f" ({r['lse_splits']} splits), {r['lse_one_split_s'] * 1e6:.1f} unsplit, by tile "
              + ", ".join(f"{t}: {s * 1e6:.1f}" for t, s in r["lse_tiles_s"].items())
              + f"; fused argmin+move {r['decode_evict_s'] * 1e6:.1f}; ev graph unfused"
              f" {r['evict_step_unfused_graph_s'] * 1e6:.1f}")
    print("Kernel columns are CUDA-graph replays.  score 1p: one pass over K with the attention kernel's "
          "log-sum-exp (default tile); 2-pass: computes it too (GB/s counts both reads).  "
          "ev = score + fused argmin/move (decode_evict) (eager, graph, graph two-pass).  "
          "ev/attn = ev graph (one-pass) / SDPA graph for the same step, gather excluded.  "
          "Small configs fit in L2 (repeated runs reuse it).")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "copy_GBps": copy_bw / 1e9, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
