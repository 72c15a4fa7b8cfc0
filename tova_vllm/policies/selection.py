"""Which cache positions survive, and how survivors are packed to the front of the cache.

Tie-break (documented, deterministic, identical in the engine and the reference): cache
positions are ranked by score, highest first, and equal scores rank by cache position,
lowest first.  So among tokens with exactly equal lowest scores the one at the highest
cache position is dropped.  Cache positions are in *compaction order*: after each eviction,
survivors sitting at positions >= budget move, in ascending order, into the holes below the
budget in ascending order.  The plain-PyTorch reference keeps its tensors in that same
order, so both break ties the same way (and sum attention in the same order).
"""

from __future__ import annotations

import torch


def positions_to_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending cache positions of the ``keep`` best of a 1-D score vector."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def position_to_drop(scores: torch.Tensor, live: torch.Tensor,
                     padding: torch.Tensor | None = None) -> torch.Tensor:
    """Batched decode rule: for each row the lowest-scoring live cache position (ties: the
    highest position); -1 for a row with nothing live.

    ``scores`` is ``[rows, positions]``, or ``[..., rows, positions]`` for several batches
    sharing ``live`` (``[rows]``); positions at or past ``live[row]`` are padding
    (``padding``: that ``[rows, positions]`` mask, when the caller already has it).
    """
    width = scores.shape[-1]
    if padding is None:
        padding = torch.arange(width, device=scores.device).unsqueeze(0) >= live.unsqueeze(1)
    # argmin returns the first of equal minima: searching the columns in reverse makes it
    # the highest position, in two operations instead of a min, a compare and a max.
    last_lowest = scores.masked_fill(padding, float("inf")).flip(-1).argmin(dim=-1)
    return ((width - 1) - last_lowest).masked_fill(live <= 0, -1)


def compaction_moves(kept: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)`` cache-position pairs that pack the ascending ``kept`` positions into
    ``[0, keep)``."""
    sources = kept[kept >= keep]
    is_hole = torch.ones(keep, dtype=torch.bool, device=kept.device)
    is_hole[kept[kept < keep]] = False
    holes = torch.nonzero(is_hole).flatten()
    return sources, holes


def prompt_eviction_moves(scores: torch.Tensor, live: torch.Tensor, keep: torch.Tensor,
                          max_keep: int, relocate: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched prompt eviction with fixed shapes (no data-dependent sizes, so a device
    never has to report back): row e keeps the ``keep[e]`` best of its ``live[e]`` positions,
    ranked as :func:`positions_to_keep` does, and packs them as :func:`compaction_moves` does.

    ``scores``: ``[rows, positions]`` (columns at or past ``live`` are padding); ``max_keep``:
    a host bound ``>= keep.max()``.  Returns ``(src, dst, row)``, each ``[rows * max_keep]``;
    entries with ``row == -1`` are not moves.

    ``relocate`` (``[rows]`` bool): rows whose survivors are gathered into other blocks
    (copy-on-write).  Every kept position of such a row moves, to the cache position that
    compaction gives it (its own below ``keep``, its hole above), so the layout is the same
    as in place.  Entry ``i`` of a row is then its ``i``-th kept position.
    """
    rows, width = scores.shape
    max_keep = min(max_keep, width)  # keep <= live <= width
    device = scores.device
    live, keep = live.to(device).long(), keep.to(device).long()
    slot_ids = torch.arange(width, device=device)
    padding = slot_ids.unsqueeze(0) >= live.unsqueeze(1)
    order = torch.sort(scores.masked_fill(padding, float("-inf")), dim=-1, descending=True,
                       stable=True).indices[:, :max_keep]
    rank = torch.arange(max_keep, device=device).unsqueeze(0)
    in_row = rank < keep.unsqueeze(1)
    # Kept slots ascending; the `width` sentinel fills ranks past the row's keep.
    kept = torch.sort(torch.where(in_row, order, width), dim=-1).values
    below = kept < keep.unsqueeze(1)
    is_source = in_row & ~below
    # Holes: positions below the row's keep that no kept slot occupies (one spare column
    # takes the scatter of kept slots that are not below it).
    hole = torch.ones(rows, max_keep + 1, dtype=torch.bool, device=device)
    hole.scatter_(1, torch.where(below, kept, max_keep), False)
    is_hole = hole[:, :max_keep] & in_row

    def by_rank(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # The i-th True entry of each row goes to column i; the rest to the spare column.
        column = torch.where(mask, mask.long().cumsum(dim=1) - 1, max_keep)
        out = torch.zeros(rows, max_keep + 1, dtype=torch.long, device=device)
        return out.scatter_(1, column, values)[:, :max_keep]

    holes = by_rank(is_hole, rank.expand(rows, -1))
    row_ids = torch.arange(rows, device=device).unsqueeze(1)
    if relocate is None:
        src = by_rank(is_source, kept)
        moves = is_source.sum(dim=1, keepdim=True)
        row = torch.where(rank < moves, row_ids, -1)
        return src.flatten(), holes.flatten(), row.flatten()
    # Kept positions ascending: those below keep come first, so the i-th one at or above
    # keep is entry i - (number below) and takes the hole of that rank.
    num_below = (in_row & below).sum(dim=1, keepdim=True)
    hole_of = holes.gather(1, (rank - num_below).clamp(min=0))
    dst = torch.where(below, kept, hole_of)
    moving = in_row & (relocate.to(device).unsqueeze(1) | ~below)
    row = torch.where(moving, row_ids, -1)
    return (torch.where(moving, kept, 0).flatten(), torch.where(moving, dst, 0).flatten(),
            row.flatten())
