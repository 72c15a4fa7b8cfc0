"""Triton kernels for TOVA on vLLM's CUDA paged KV cache: scoring, decode argmin, compaction.

Same signatures and results as the torch oracle in :mod:`.torch_ref` (read its docstring
for the layout and the conventions: scores ``[rows, S]`` fp32, padding columns +inf, tie
rules of :mod:`tova_vllm.policies.selection`).

Kernels
-------
``_tova_score_kernel`` (the decode hot path).  Grid ``(rows, cdiv(S, TILE_N))``: one
program per (row, tile of TILE_N cache positions).  It looks the tile's blocks up in the
block table once, then for each kv head loads the ``[TILE_N, head_dim]`` keys (one pass
over the row's paged K: every live key is read exactly once in the whole grid), computes
the logits of all query heads of that head's GQA group with one ``tl.dot``
(``[GROUP_P, head_dim] x [head_dim, TILE_N]``, the group padded to 16 rows for the tensor
cores; fp32 accumulation), turns them into weights ``exp(scale * q.k - lse[r, h])`` and
sums them over the group and over kv heads in registers.  The head sum is complete inside
the program, so no atomics and no second reduction are needed, and the result is
deterministic.  Tiles at or past ``live`` (and columns past ``live`` inside a tile) only
write +inf, so the output buffer needs no prior fill.

``_tova_lse_kernel`` (fallback when the attention kernel's log-sum-exp is not at hand).
Grid ``(rows, kv_heads, splits)``: each program streams one contiguous chunk of a row's
live keys with an online max / sum per query head of the group and writes the chunk's
partial log-sum-exp; ``torch.logsumexp`` over the splits gives ``lse [rows, q_heads]``
fp32 (no second launch when there is one split).  The split count is chosen on the host
from the shapes and the SM count, so that few long rows still fill the GPU.  The scoring
kernel then runs as above, so this mode reads K twice (two-pass).

``_tova_argmin_kernel``: grid ``(rows,)``; the lowest live score per row, ties -> the
highest slot (``policies.selection.position_to_drop``).  Top-C for prompt evictions is not a
kernel: it is the rare path and uses ``torch.sort`` on the scores
(:func:`.torch_ref.keep_slots`, stable, ties keep the lower slot), on the GPU.

``_tova_compact_kernel``: grid ``(moves,)``; copies K and V of all kv heads of
``(row, src)`` to ``(row, dst)`` through the block table.  Entries with ``row < 0`` or
``src == dst`` are no-ops.

``_tova_decode_evict_kernel``: grid ``(rows,)``; the decode step's argmin and its one
move (last live position into the dropped slot) fused in one program per row, so a decode
eviction is two launches (score, evict) after the attention kernel.

Precision and dtypes: caches fp16 / bf16 / fp32; the query is cast to the cache dtype
(vLLM hands them over in the same dtype).  fp16/bf16 dots run on the tensor cores with
exact products and fp32 accumulation; fp32 caches use ``input_precision="ieee"`` (no
TF32).  Softmax, sums and scores are fp32.  head_dim any power of two >= 16 is native
(64 and 128 are the tested ones); others are padded and masked.  Block size any power
of two (16 and 32 tested); tiles may span several blocks or part of one.

CUDA graphs: the wrappers never read device values on the host (no ``.item()``, no
data-dependent shapes): buffers are sized from arguments (``max_live`` or the block
table's width) and the loops over live positions run on the device.  Allocation goes
through torch's caching allocator (capturable); pass ``out=`` to reuse a buffer.

Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported in
the process) runs the kernels on CPU tensors; the tests do that on machines without CUDA.
Its ``tl.dot`` is wrong for bf16 operands (triton 3.9), so under the interpreter bf16
tiles are upcast and take the fp32 path; on a GPU bf16 uses the tensor cores.

Eager calls are host-bound (Triton's launch path costs tens of microseconds per kernel), so
the decode path is meant to be graphed.  Measured figures: README, "Benchmarks".
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import torch_ref
from .torch_ref import decode_moves, keep_slots, score_columns  # noqa: F401  (re-exported)

__all__ = [
    "paged_tova_scores",
    "paged_lse",
    "decode_drop_slot",
    "keep_slots",
    "compact_paged",
    "decode_moves",
    "decode_evict",
    "is_interpreted",
]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _group_logits(
    q_ptr,
    k_ptr,
    row_off,
    valid,
    r,
    h,
    scale,
    sq_r,
    sq_h,
    sq_d,
    sk_h,
    sk_d,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``scale * q.k`` for the query heads of kv head ``h`` and the tile's keys: ``[GROUP_P, TILE_N]``."""
    d = tl.arange(0, HEAD_DIM_P)
    dmask = d < HEAD_DIM
    g = tl.arange(0, GROUP_P)
    gmask = g < GROUP
    k = tl.load(
        k_ptr + row_off[:, None] + h * sk_h + d[None, :] * sk_d,
        mask=valid[:, None] & dmask[None, :],
        other=0.0,
    )
    q = tl.load(
        q_ptr + r * sq_r + (h * GROUP + g)[:, None] * sq_h + d[None, :] * sq_d,
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if DOT_FP32:
        logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        logits = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    return logits * scale


@triton.jit
def _tile_rows(bt_ptr, r, pos, valid, sbt_r, sbt_b, sk_b, sk_s, BLOCK_SIZE: tl.constexpr):
    """Element offset of each position's slot in the cache (int64), via the block table."""
    blk = tl.load(bt_ptr + r * sbt_r + (pos // BLOCK_SIZE) * sbt_b, mask=valid, other=0)
    return blk.to(tl.int64) * sk_b + (pos % BLOCK_SIZE).to(tl.int64) * sk_s


@triton.jit
def _tova_score_kernel(
    q_ptr,
    k_ptr,
    bt_ptr,
    live_ptr,
    lse_ptr,
    out_ptr,
    scale,
    inv_div,
    n_cols,
    sq_r,
    sq_h,
    sq_d,
    sk_b,
    sk_s,
    sk_h,
    sk_d,
    sbt_r,
    sbt_b,
    sl_r,
    sl_h,
    so_r,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    n = tl.load(live_ptr + r)
    pos = t * TILE_N + tl.arange(0, TILE_N)
    valid = pos < n
    acc = tl.zeros([TILE_N], dtype=tl.float32)
    if t * TILE_N < n:
        row_off = _tile_rows(bt_ptr, r, pos, valid, sbt_r, sbt_b, sk_b, sk_s, BLOCK_SIZE)
        g = tl.arange(0, GROUP_P)
        gmask = g < GROUP
        for h in range(NUM_KV_HEADS):
            logits = _group_logits(
                q_ptr, k_ptr, row_off, valid, r, h, scale, sq_r, sq_h, sq_d, sk_h, sk_d,
                GROUP, GROUP_P, HEAD_DIM, HEAD_DIM_P, DOT_FP32,
            )
            lse = tl.load(lse_ptr + r * sl_r + (h * GROUP + g) * sl_h, mask=gmask, other=0.0)
            p = tl.exp(logits - lse[:, None])
            p = tl.where(gmask[:, None] & valid[None, :], p, 0.0)
            acc += tl.sum(p, axis=0)
    score = tl.where(valid, acc * inv_div, float("inf"))
    tl.store(out_ptr + r * so_r + pos, score, mask=pos < n_cols)


@triton.jit
def _tova_lse_kernel(
    q_ptr,
    k_ptr,
    bt_ptr,
    live_ptr,
    lse_ptr,
    scale,
    n_cols,
    sq_r,
    sq_h,
    sq_d,
    sk_b,
    sk_s,
    sk_h,
    sk_d,
    sbt_r,
    sbt_b,
    sl_r,
    sl_h,
    sl_s,
    CHUNK: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.minimum(tl.load(live_ptr + r), n_cols)
    lo = split * CHUNK
    hi = tl.minimum(n, lo + CHUNK)
    g = tl.arange(0, GROUP_P)
    gmask = g < GROUP
    m = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    s = tl.zeros([GROUP_P], dtype=tl.float32)
    for start in range(lo, hi, TILE_N):
        pos = start + tl.arange(0, TILE_N)
        valid = pos < hi
        row_off = _tile_rows(bt_ptr, r, pos, valid, sbt_r, sbt_b, sk_b, sk_s, BLOCK_SIZE)
        logits = _group_logits(
            q_ptr, k_ptr, row_off, valid, r, h, scale, sq_r, sq_h, sq_d, sk_h, sk_d,
            GROUP, GROUP_P, HEAD_DIM, HEAD_DIM_P, DOT_FP32,
        )
        logits = tl.where(valid[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))  # finite: every tile has a live column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)  # -inf for an empty chunk
    tl.store(lse_ptr + r * sl_r + (h * GROUP + g) * sl_h + split * sl_s, lse, mask=gmask)


@triton.jit
def _row_argmin(s_ptr, r, n, ss_r, BLOCK: tl.constexpr):
    """Lowest of ``scores[r, :n]``, ties -> the highest slot; -1 when ``n == 0``."""
    best_val = tl.full([], float("inf"), dtype=tl.float32)
    best_idx = tl.full([], -1, dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(s_ptr + r * ss_r + offs, mask=ok, other=float("inf")).to(tl.float32)
        tile_min = tl.min(v, axis=0)
        tile_idx = tl.max(tl.where(ok & (v == tile_min), offs, -1), axis=0).to(tl.int32)
        # later tiles hold higher slots, so an equal minimum moves the choice up
        take = (tile_idx >= 0) & (tile_min <= best_val)
        best_idx = tl.where(take, tile_idx, best_idx)
        best_val = tl.where(take, tile_min, best_val)
    return best_idx


@triton.jit
def _move_slot(
    k_ptr, v_ptr, bt_ptr, row, src, dst,
    sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, sbt_r, sbt_b,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    HEAD_DIM_V_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Copy K and V (all kv heads) of cache position ``src`` of ``row`` to position ``dst``."""
    sb = tl.load(bt_ptr + row * sbt_r + (src // BLOCK_SIZE) * sbt_b).to(tl.int64)
    db = tl.load(bt_ptr + row * sbt_r + (dst // BLOCK_SIZE) * sbt_b).to(tl.int64)
    so = src % BLOCK_SIZE
    do = dst % BLOCK_SIZE
    hh = tl.arange(0, HEADS_P)
    hmask = hh < NUM_KV_HEADS
    d = tl.arange(0, HEAD_DIM_P)
    km = hmask[:, None] & (d < HEAD_DIM)[None, :]
    kofs = hh[:, None] * sk_h + d[None, :] * sk_d
    k = tl.load(k_ptr + sb * sk_b + so * sk_s + kofs, mask=km)
    tl.store(k_ptr + db * sk_b + do * sk_s + kofs, k, mask=km)
    dv = tl.arange(0, HEAD_DIM_V_P)
    vm = hmask[:, None] & (dv < HEAD_DIM_V)[None, :]
    vofs = hh[:, None] * sv_h + dv[None, :] * sv_d
    v = tl.load(v_ptr + sb * sv_b + so * sv_s + vofs, mask=vm)
    tl.store(v_ptr + db * sv_b + do * sv_s + vofs, v, mask=vm)


@triton.jit
def _tova_argmin_kernel(s_ptr, live_ptr, out_ptr, n_cols, ss_r, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(live_ptr + r), n_cols)
    best_idx = _row_argmin(s_ptr, r, n, ss_r, BLOCK)
    tl.store(out_ptr + r, best_idx.to(tl.int64))


@triton.jit
def _tova_compact_kernel(
    k_ptr, v_ptr, bt_ptr, src_ptr, dst_ptr, row_ptr,
    sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, sbt_r, sbt_b,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    HEAD_DIM_V_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(row_ptr + i).to(tl.int64)
    src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    if (row >= 0) & (src != dst):
        _move_slot(
            k_ptr, v_ptr, bt_ptr, row, src, dst,
            sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, sbt_r, sbt_b,
            NUM_KV_HEADS, HEADS_P, HEAD_DIM, HEAD_DIM_P, HEAD_DIM_V, HEAD_DIM_V_P, BLOCK_SIZE,
        )


@triton.jit
def _tova_decode_evict_kernel(
    s_ptr, live_ptr, evict_ptr, drop_ptr, k_ptr, v_ptr, bt_ptr, n_cols, ss_r,
    sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, sbt_r, sbt_b,
    HAS_EVICT: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    HEAD_DIM_V_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Argmin and the decode move of one row in one program: the last live position
    (``live - 1``) moves into the dropped slot."""
    r = tl.program_id(0).to(tl.int64)
    live = tl.load(live_ptr + r).to(tl.int64)
    best_idx = _row_argmin(s_ptr, r, tl.minimum(live, n_cols), ss_r, BLOCK).to(tl.int64)
    evicts = best_idx >= 0
    if HAS_EVICT:
        evicts = evicts & (tl.load(evict_ptr + r) != 0)
    tl.store(drop_ptr + r, tl.where(evicts, best_idx, -1))
    src = live - 1
    if evicts & (best_idx != src):
        _move_slot(
            k_ptr, v_ptr, bt_ptr, r, src, best_idx,
            sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, sbt_r, sbt_b,
            NUM_KV_HEADS, HEADS_P, HEAD_DIM, HEAD_DIM_P, HEAD_DIM_V, HEAD_DIM_V_P, BLOCK_SIZE,
        )


# ----------------------------------------------------------------------------- wrappers


def is_interpreted() -> bool:
    """Whether this module's kernels were built for Triton's interpreter."""
    return type(_tova_score_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a host-side property query, cached)."""
    if device.type != "cuda":
        return 132  # the interpreter: any plausible number
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _default_tile(rows: int, columns: int, device: torch.device) -> int:
    """Positions per scoring program: the widest tile that still gives every SM a
    program (few short rows get narrow tiles, so the GPU stays busy).  On an H100 the
    tile hardly matters once the grid is full (within 5% from 32 to 128)."""
    want = _sm_count(device)
    for tile in (128, 64, 32):
        if rows * triton.cdiv(columns, tile) >= want:
            return tile
    return 16


def _lse_splits(rows: int, kv_heads: int, columns: int, tile: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk) for the log-sum-exp pass: enough programs for the GPU, chunks of
    at least 256 positions (a multiple of the tile)."""
    splits = max(1, min(triton.cdiv(columns, 256), triton.cdiv(2 * _sm_count(device), rows * kv_heads)))
    chunk = triton.cdiv(triton.cdiv(columns, splits), tile) * tile
    return triton.cdiv(columns, chunk), chunk


def _check_common(query_last, key_cache, block_table, live):
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be [num_blocks, block_size, kv_heads, head_dim]")
    rows, q_heads, head_dim = query_last.shape
    _, block_size, kv_heads, k_dim = key_cache.shape
    if k_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != key head_dim {k_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if block_table.shape[0] != rows or live.shape != (rows,):
        raise ValueError("block_table [rows, max_blocks] and live [rows] must match the query rows")
    if block_table.dtype not in (torch.int32, torch.int64) or live.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table and live must be int32 or int64")
    if key_cache.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported cache dtype {key_cache.dtype}")
    return rows, q_heads, head_dim, block_size, kv_heads


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and is_interpreted())


def paged_lse(
    query_last: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    live: torch.Tensor,
    scale: float,
    *,
    max_live: Optional[int] = None,
    tile_n: Optional[int] = None,
    splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Natural log-sum-exp of ``scale * q.k`` over positions ``[0, live)``: ``[rows, q_heads]`` fp32.

    ``splits``: chunks each row's positions are cut into (default: by shapes and SM
    count); ``tile_n``: positions per inner step (default 64).  Rows with ``live == 0``
    get -inf.
    """
    rows, q_heads, head_dim, block_size, kv_heads = _check_common(query_last, key_cache, block_table, live)
    columns = score_columns(block_table, block_size, max_live)
    group = q_heads // kv_heads
    q = query_last.to(key_cache.dtype)
    if out is None:
        out = torch.empty((rows, q_heads), dtype=torch.float32, device=key_cache.device)
    if rows == 0 or columns == 0:
        return out.fill_(float("-inf"))
    tile = tile_n or 64
    if splits is None:
        splits, chunk = _lse_splits(rows, kv_heads, columns, tile, key_cache.device)
    else:
        chunk = triton.cdiv(triton.cdiv(columns, splits), tile) * tile
        splits = triton.cdiv(columns, chunk)
    if splits == 1:
        partial = out.unsqueeze(-1)
    else:
        partial = torch.empty((rows, q_heads, splits), dtype=torch.float32, device=key_cache.device)
    _tova_lse_kernel[(rows, kv_heads, splits)](
        q, key_cache, block_table, live, partial, float(scale), columns,
        q.stride(0), q.stride(1), q.stride(2),
        *key_cache.stride(),
        block_table.stride(0), block_table.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        CHUNK=chunk, GROUP=group, GROUP_P=_pow2(group, 16), HEAD_DIM=head_dim,
        HEAD_DIM_P=_pow2(head_dim, 16), BLOCK_SIZE=block_size, TILE_N=tile,
        DOT_FP32=_dot_fp32(key_cache.dtype),
    )
    if splits > 1:
        torch.logsumexp(partial, dim=-1, out=out)
    return out


def paged_tova_scores(
    query_last: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    live: torch.Tensor,
    scale: float,
    lse: Optional[torch.Tensor] = None,
    *,
    max_live: Optional[int] = None,
    total_q_heads: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    tile_n: Optional[int] = None,
) -> torch.Tensor:
    """Triton twin of :func:`.torch_ref.paged_tova_scores` (same arguments and result).

    ``lse`` given: one pass over K.  ``lse=None``: :func:`paged_lse` first (two passes).
    ``tile_n``: positions per program (16, 32, 64 or 128; default by problem size).
    """
    rows, q_heads, head_dim, block_size, kv_heads = _check_common(query_last, key_cache, block_table, live)
    columns = score_columns(block_table, block_size, max_live)
    group = q_heads // kv_heads
    if out is None:
        out = torch.empty((rows, columns), dtype=torch.float32, device=key_cache.device)
    elif out.shape != (rows, columns) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous fp32 [{rows}, {columns}] tensor")
    if rows == 0 or columns == 0:
        return out
    if lse is None:
        lse = paged_lse(query_last, key_cache, block_table, live, scale, max_live=columns)
    elif lse.shape != (rows, q_heads):
        raise ValueError(f"lse must be [{rows}, {q_heads}], got {tuple(lse.shape)}")
    lse = lse.float()
    q = query_last.to(key_cache.dtype)
    tile = tile_n or _default_tile(rows, columns, key_cache.device)
    divisor = total_q_heads if total_q_heads is not None else q_heads
    _tova_score_kernel[(rows, triton.cdiv(columns, tile))](
        q, key_cache, block_table, live, lse, out, float(scale), 1.0 / float(divisor), columns,
        q.stride(0), q.stride(1), q.stride(2),
        *key_cache.stride(),
        block_table.stride(0), block_table.stride(1),
        lse.stride(0), lse.stride(1),
        out.stride(0),
        NUM_KV_HEADS=kv_heads, GROUP=group, GROUP_P=_pow2(group, 16),
        HEAD_DIM=head_dim, HEAD_DIM_P=_pow2(head_dim, 16),
        BLOCK_SIZE=block_size, TILE_N=tile, DOT_FP32=_dot_fp32(key_cache.dtype),
    )
    return out


def decode_drop_slot(
    scores: torch.Tensor, live: torch.Tensor, *, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Triton twin of :func:`.torch_ref.decode_drop_slot`: ``[rows]`` int64, -1 for empty rows."""
    rows, columns = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    if out is None:
        out = torch.empty((rows,), dtype=torch.int64, device=scores.device)
    if rows == 0:
        return out
    _tova_argmin_kernel[(rows,)](
        scores, live, out, columns, scores.stride(0), BLOCK=min(1024, _pow2(columns, 16))
    )
    return out


def _cache_args(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor):
    """Strides and constexprs shared by the kernels that move cache slots."""
    if key_cache.shape[:3] != value_cache.shape[:3] or key_cache.dtype != value_cache.dtype:
        raise ValueError("key_cache and value_cache must share blocks, block size, heads and dtype")
    _, block_size, kv_heads, head_dim = key_cache.shape
    head_dim_v = value_cache.shape[3]
    strides = (*key_cache.stride(), *value_cache.stride(), block_table.stride(0), block_table.stride(1))
    consts = dict(
        NUM_KV_HEADS=kv_heads, HEADS_P=_pow2(kv_heads), HEAD_DIM=head_dim, HEAD_DIM_P=_pow2(head_dim),
        HEAD_DIM_V=head_dim_v, HEAD_DIM_V_P=_pow2(head_dim_v), BLOCK_SIZE=block_size,
    )
    return strides, consts


def compact_paged(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    row: torch.Tensor,
) -> None:
    """Triton twin of :func:`.torch_ref.compact_paged` (in place; same skip and no-chain rules)."""
    moves = row.numel()
    if src_pos.numel() != moves or dst_pos.numel() != moves:
        raise ValueError("src_pos, dst_pos and row must have one entry per move")
    if moves == 0:
        return
    strides, consts = _cache_args(key_cache, value_cache, block_table)
    src_pos, dst_pos, row = (x.reshape(-1).contiguous() for x in (src_pos, dst_pos, row))
    _tova_compact_kernel[(moves,)](key_cache, value_cache, block_table, src_pos, dst_pos, row, *strides, **consts)


def decode_evict(
    scores: torch.Tensor,
    live: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    evict: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton twin of :func:`.torch_ref.decode_evict`: argmin + decode move, one launch."""
    rows, columns = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    if out is None:
        out = torch.empty((rows,), dtype=torch.int64, device=scores.device)
    if rows == 0:
        return out
    strides, consts = _cache_args(key_cache, value_cache, block_table)
    if evict is not None and evict.dtype == torch.bool:
        evict = evict.view(torch.uint8)
    _tova_decode_evict_kernel[(rows,)](
        scores, live, evict if evict is not None else live, out, key_cache, value_cache, block_table,
        columns, scores.stride(0), *strides,
        HAS_EVICT=evict is not None, BLOCK=min(1024, _pow2(columns, 16)), **consts,
    )
    return out


# Keep the oracle reachable from here for callers that want both side by side.
oracle = torch_ref
