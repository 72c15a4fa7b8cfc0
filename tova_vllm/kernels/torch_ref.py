"""TOVA scoring, decode selection and compaction on vLLM's CUDA paged layout, in plain torch.

This module is the oracle the Triton kernels (:mod:`.triton_scoring`) are tested against,
and the implementation :func:`tova_vllm.kernels.select_backend` returns off CUDA.  Every
function here has a Triton twin with the same signature.

Layout (vLLM's FlashAttention layout, one layer):

* ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``
  (any strides; vLLM hands out views of ``kv_cache[:, 0]`` / ``kv_cache.unbind(0)``).
* ``block_table``: ``[rows, max_blocks]`` int32; cache position ``p`` of row ``r`` lives in
  block ``block_table[r, p // block_size]`` at offset ``p % block_size``.
* ``live``: ``[rows]`` int32, the number of live cache positions of each row: the live
  tokens sit at positions ``[0, live)``.  Block-table entries past a row's live blocks may
  hold anything (stale ids, the null block): they are never read.

Scores (:func:`paged_tova_scores`) are ``[rows, S]`` fp32 with ``S = max_live`` when given,
else ``max_blocks * block_size``.  Column ``p < live[r]`` holds the mean over all query
heads of the softmax weight the row's query gives position ``p``; **padding columns
``p >= live[r]`` hold +inf**, so an argmin never picks them.  The selection helpers below
do not rely on that: they mask by ``live`` themselves (top-C masks padding to -inf).

Tie rules are those of :mod:`tova_vllm.policies.selection`: decode drops the lowest score,
ties -> the highest slot; prompt eviction keeps the top C by a stable descending sort,
ties -> the lower slot.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..policies.scoring import head_summed_probs

__all__ = [
    "paged_tova_scores",
    "decode_drop_slot",
    "keep_slots",
    "compact_paged",
    "decode_moves",
    "decode_evict",
    "score_columns",
]


def score_columns(block_table: torch.Tensor, block_size: int, max_live: Optional[int]) -> int:
    """Width of the scores buffer: ``max_live`` if given, else all the block table can address."""
    if max_live is not None:
        return int(max_live)
    return int(block_table.shape[1]) * int(block_size)


def _positions_to_slots(
    block_table: torch.Tensor, block_size: int, positions: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, in-block offset) of ``positions`` ``[rows, n]``; invalid ones map to block 0."""
    page = torch.where(valid, positions // block_size, 0).long()
    blocks = torch.gather(block_table.long(), 1, page)
    blocks = torch.where(valid, blocks, 0)
    return blocks, positions % block_size


def gather_keys(
    key_cache: torch.Tensor, block_table: torch.Tensor, live: torch.Tensor, columns: int
) -> torch.Tensor:
    """The rows' keys at positions ``[0, columns)`` as ``[rows, kv_heads, columns, head_dim]``.

    Padding positions (``>= live``) read block 0; callers mask them.
    """
    rows = block_table.shape[0]
    block_size = key_cache.shape[1]
    pos = torch.arange(columns, device=key_cache.device).expand(rows, columns)
    valid = pos < live.to(key_cache.device).long().unsqueeze(1)
    blocks, offsets = _positions_to_slots(block_table.to(key_cache.device), block_size, pos, valid)
    keys = key_cache[blocks, offsets]  # [rows, columns, kv_heads, head_dim]
    return keys.permute(0, 2, 1, 3)


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
) -> torch.Tensor:
    """TOVA scores of every live cache position: ``[rows, S]`` fp32 (padding +inf).

    ``query_last``: ``[rows, q_heads, head_dim]``, each row's last query (after RoPE).
    Query head ``h`` reads kv head ``h // (q_heads // kv_heads)``.
    ``lse``: optional ``[rows, q_heads]`` fp32 natural log-sum-exp of ``scale * q.k`` over
    positions ``[0, live)`` (what the attention kernel returns for that query).  With it a
    weight is ``exp(scale * q.k - lse)``; without it the softmax is computed here in fp32.
    ``total_q_heads``: the divisor (default ``q_heads``).  Under tensor parallelism pass
    the global head count: each rank then returns its heads' sum over the global count,
    and an all-reduce (sum) of the ranks' scores gives the mean over all heads.
    ``out``: optional ``[rows, S]`` fp32 buffer to write into (returned).
    """
    rows, q_heads, _ = query_last.shape
    columns = score_columns(block_table, key_cache.shape[1], max_live)
    live_l = live.to(key_cache.device).long()
    keys = gather_keys(key_cache, block_table, live_l, columns)
    if lse is None:
        summed = head_summed_probs(query_last, keys, scale, live_l)
    else:
        kv_heads = keys.shape[1]
        group = q_heads // kv_heads
        q = query_last.float().view(rows, kv_heads, group, -1)
        logits = torch.einsum("rkgd,rksd->rkgs", q, keys.float()) * scale
        probs = torch.exp(logits - lse.float().view(rows, kv_heads, group, 1))
        pad = torch.arange(columns, device=keys.device).view(1, 1, 1, -1) >= live_l.view(-1, 1, 1, 1)
        summed = probs.masked_fill(pad, 0.0).sum(dim=(1, 2))
    scores = summed / float(total_q_heads if total_q_heads is not None else q_heads)
    pad = torch.arange(columns, device=scores.device).unsqueeze(0) >= live_l.unsqueeze(1)
    scores = scores.masked_fill(pad, float("inf"))
    if out is not None:
        out.copy_(scores)
        return out
    return scores


def decode_drop_slot(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Per row, the live slot to drop: lowest score, ties -> highest slot.  ``[rows]`` int64.

    Same rule as :func:`tova_vllm.policies.selection.position_to_drop`; columns at or past
    ``live`` are ignored whatever they hold.  A row with ``live == 0`` gives -1.
    """
    slot_ids = torch.arange(scores.shape[-1], device=scores.device)
    valid = slot_ids.unsqueeze(0) < live.to(scores.device).long().unsqueeze(1)
    masked = scores.float().masked_fill(~valid, float("inf"))
    lowest = masked.min(dim=-1, keepdim=True).values
    is_lowest = (masked == lowest) & valid
    return torch.where(is_lowest, slot_ids, -1).max(dim=-1).values


def keep_slots(scores: torch.Tensor, live: torch.Tensor, keep: int) -> torch.Tensor:
    """Prompt eviction: per row, the ascending slots of the ``keep`` best live positions.

    ``[rows, keep]`` int64.  Stable descending sort (ties keep the lower slot), like
    :func:`tova_vllm.policies.selection.positions_to_keep`.  Padding columns are masked to
    -inf, so rows must have ``live >= keep`` (rows with fewer live positions get padding
    slots at the end of their list).  This is the rare path: both backends use this torch
    code (a sort over ``[rows, S]``), on whatever device the scores are.
    """
    slot_ids = torch.arange(scores.shape[-1], device=scores.device)
    valid = slot_ids.unsqueeze(0) < live.to(scores.device).long().unsqueeze(1)
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[:, :keep], dim=-1).values


def compact_paged(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    row: torch.Tensor,
) -> None:
    """Move K and V (all kv heads) of ``(row[i], src_pos[i])`` to ``(row[i], dst_pos[i])``.

    In place.  Entries with ``row < 0`` or ``src_pos == dst_pos`` are skipped, so a
    decode step can pass one (possibly idle) move per row with static shapes.  The moves
    must not chain (no destination is also a source), which holds for
    :func:`tova_vllm.policies.selection.compaction_moves` (sources >= C > destinations)
    and for the decode move (slot C -> the dropped slot): all moves then read the
    pre-move cache, whatever order they run in.
    """
    device = key_cache.device
    row = row.to(device).long()
    src = src_pos.to(device).long()
    dst = dst_pos.to(device).long()
    active = (row >= 0) & (src != dst)
    row, src, dst = row[active], src[active], dst[active]
    if row.numel() == 0:
        return
    bt = block_table.to(device).long()
    block_size = key_cache.shape[1]
    src_blk, src_off = bt[row, src // block_size], src % block_size
    dst_blk, dst_off = bt[row, dst // block_size], dst % block_size
    k = key_cache[src_blk, src_off].clone()
    v = value_cache[src_blk, src_off].clone()
    key_cache[dst_blk, dst_off] = k
    value_cache[dst_blk, dst_off] = v


def decode_moves(
    drop: torch.Tensor, live: torch.Tensor, evict: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode step's compaction, as ``(src_pos, dst_pos, row)`` for :func:`compact_paged`.

    A row that evicts holds ``live = C + 1`` tokens; the one at the last position
    ``live - 1`` moves into the dropped slot (a no-op when the dropped slot is that last
    position).  ``evict``: optional ``[rows]`` bool, rows that do not evict this step get
    ``row = -1``; by default every row with a dropped slot (``drop >= 0``) evicts.
    All on the device, static shapes (graph-capturable).
    """
    drop = drop.long()
    if evict is None:
        evict = drop >= 0
    rows = torch.arange(drop.shape[0], device=drop.device)
    row = torch.where(evict.to(drop.device) & (drop >= 0), rows, -1)
    return live.to(drop.device).long() - 1, drop, row


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
    """The decode step after scoring: drop each evicting row's lowest slot and move the
    last live position into it.  Returns the dropped slots ``[rows]`` int64, -1 for rows
    that do not evict (``evict`` false, or ``live == 0``).  In place on the caches;
    equals :func:`decode_drop_slot`, then :func:`decode_moves`, then :func:`compact_paged`.
    """
    drop = decode_drop_slot(scores, live)
    if evict is not None:
        drop = torch.where(evict.to(drop.device), drop, -1)
    compact_paged(key_cache, value_cache, block_table, *decode_moves(drop, live))
    if out is not None:
        out.copy_(drop)
        return out
    return drop
