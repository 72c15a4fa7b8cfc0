"""TOVA's score: the last query's softmax attention, averaged over all query heads."""

from __future__ import annotations

import torch


def head_summed_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax weights of one query per row over its keys, summed over query heads.

    ``query``: ``[rows, q_heads, head_dim]`` (after RoPE); ``keys``:
    ``[rows, kv_heads, slots, head_dim]``; query head ``h`` reads kv head
    ``h // (q_heads // kv_heads)`` (GQA).  ``live``: per-row count of valid slots (the rest
    is padding and gets weight 0).  The softmax is taken in fp32 over all live slots.
    Returns ``[rows, slots]`` fp32.  The sum, not the mean, is returned so that tensor
    parallel ranks, each holding some of the heads, can all-reduce it before dividing by
    the total head count.
    """
    rows, q_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    q = query.float().view(rows, kv_heads, group, head_dim)
    logits = torch.einsum("rkgd,rksd->rkgs", q, keys.float()) * scale
    if live is not None:
        slot_ids = torch.arange(keys.shape[2], device=keys.device)
        pad = slot_ids.view(1, 1, 1, -1) >= live.view(-1, 1, 1, 1)
        logits = logits.masked_fill(pad, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2))


def tova_scores(head_sum: torch.Tensor, total_q_heads: int) -> torch.Tensor:
    """Turn head-summed weights (already reduced over all ranks) into the mean."""
    return head_sum / total_q_heads
