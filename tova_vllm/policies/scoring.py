"""Attention weights as eviction scores: the last query's softmax (TOVA's score, averaged
over all query heads) and the logits behind it."""

from __future__ import annotations

import torch


def gqa_logits(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``q.k * scale`` of one query per row: ``[rows, kv_heads, group, slots]``.

    ``query``: ``[rows, q_heads, head_dim]`` (after RoPE); ``keys``:
    ``[rows, kv_heads, slots, head_dim]``; query head ``h`` reads kv head
    ``h // (q_heads // kv_heads)`` (GQA).
    """
    rows, q_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    q = query.float().view(rows, kv_heads, q_heads // kv_heads, head_dim)
    return torch.einsum("rkgd,rksd->rkgs", q, keys.float()) * scale


def head_summed_probs_from_logits(logits: torch.Tensor, live: torch.Tensor | None = None,
                                  padding: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over each row's first ``live`` slots (the rest is padding and gets weight
    0), summed over all query heads: ``[rows, kv_heads, group, slots]`` -> ``[rows, slots]``.
    ``padding``: the ``[rows, slots]`` mask of the slots at or past ``live``, when the
    caller already has it.

    The sum, not the mean, is returned so that tensor-parallel ranks, each holding some of
    the heads, can all-reduce it before dividing by the total head count.
    """
    if padding is None and live is not None:
        slot_ids = torch.arange(logits.shape[-1], device=logits.device)
        padding = slot_ids.view(1, -1) >= live.view(-1, 1)
    if padding is not None:
        logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2))


def head_summed_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax weights of one query per row over its keys (fp32), summed over query heads.

    See :func:`gqa_logits` for shapes and :func:`head_summed_probs_from_logits` for
    ``live`` and why this is a sum.  Returns ``[rows, slots]`` fp32.
    """
    return head_summed_probs_from_logits(gqa_logits(query, keys, scale), live)


def head_mean(head_sum: torch.Tensor, total_q_heads: int) -> torch.Tensor:
    """Head-summed weights (already reduced over all ranks) -> the mean over all query
    heads: TOVA's score (from :func:`head_summed_probs`) or H2O's increment."""
    return head_sum / total_q_heads
