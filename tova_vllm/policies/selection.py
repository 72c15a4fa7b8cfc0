"""Which cache slots survive, and how survivors are packed to the front of the cache.

Tie-break (documented, deterministic, identical in the engine and the reference): slots
are ranked by score, highest first, and equal scores rank by cache slot, lowest first.
So among tokens with exactly equal lowest scores the one in the highest cache slot is
dropped.  Cache slots are in *compaction order*: after each eviction, survivors sitting at
slots >= budget move, in ascending order, into the holes below the budget in ascending
order.  The plain-PyTorch reference keeps its tensors in that same slot order, so both
break ties the same way (and sum attention in the same order).
"""

from __future__ import annotations

import torch


def slots_to_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending slot indices of the ``keep`` best slots of a 1-D score vector."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def slot_to_drop(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Batched decode rule: for each row the lowest-scoring live slot (ties: highest slot).

    ``scores`` is ``[rows, slots]``; slots at or past ``live[row]`` are padding.
    """
    slot_ids = torch.arange(scores.shape[-1], device=scores.device)
    valid = slot_ids.unsqueeze(0) < live.unsqueeze(1)
    masked = scores.masked_fill(~valid, float("inf"))
    lowest = masked.min(dim=-1, keepdim=True).values
    is_lowest = (masked == lowest) & valid
    return torch.where(is_lowest, slot_ids, -1).max(dim=-1).values


def compaction_moves(kept: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)`` slot pairs that pack the ascending ``kept`` slots into ``[0, keep)``."""
    sources = kept[kept >= keep]
    is_hole = torch.ones(keep, dtype=torch.bool, device=kept.device)
    is_hole[kept[kept < keep]] = False
    holes = torch.nonzero(is_hole).flatten()
    return sources, holes
