"""What one layer does after a phase's attention, on any platform: score, select, compact.

The phase loop (``phase_loop.py``) calls an evictor per layer and phase.  This base class
holds everything that does not depend on the KV layout: which scores each policy group
needs, the shared selection rules, side-state moves and H2O's accumulation.  A platform
supplies the layout-bound pieces (:meth:`Evictor.tova_scores`, :meth:`Evictor.query_logits`,
:meth:`Evictor.compact`, optionally a fused decode eviction): ``cpu_evictor.CpuEvictor``
for vLLM's CPU pages, ``paged_eviction.PagedEvictor`` for FlashAttention's layout.

No vLLM import.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..policies import (
    ACCUMULATE_QUERY_BLOCK,
    accumulated_from_logits,
    head_mean,
    position_to_drop,
    prompt_eviction_moves,
)
from .plan import EvictionBatch, QueryBatch
from .side_state import PolicyGroups, SlotSideState, policy_keep_scores

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class Evictor:
    """One layer's eviction (per attention impl).  ``kv_cache`` below is whatever the
    platform's attention hands over; subclasses know how to read it."""

    def __init__(self, total_q_heads: int, scale: float,
                 all_reduce: Optional[AllReduce] = None) -> None:
        self.total_q_heads = total_q_heads
        self.scale = scale
        self.all_reduce = all_reduce

    # ---------------------------------------------------------------- platform hooks

    def block_size(self, kv_cache) -> int:
        raise NotImplementedError

    def tova_scores(self, query: torch.Tensor, kv_cache, ev: EvictionBatch,
                    lse: Optional[torch.Tensor], select: Optional[torch.Tensor]) -> torch.Tensor:
        """TOVA's keep scores ``[E, S]`` (mean over all query heads, all ranks reduced) of
        the eviction rows ``select`` (all when None)."""
        raise NotImplementedError

    def query_logits(self, kv_cache, batch: QueryBatch
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
        """For ``batch``'s rows: a function from queries ``[E, L, q_heads, D]`` to fp32
        logits ``[E, kv_heads, group, L, S]`` over each row's cache positions."""
        raise NotImplementedError

    def compact(self, kv_cache, ev: EvictionBatch, src: torch.Tensor, dst: torch.Tensor,
                row: torch.Tensor) -> None:
        """Move K/V of row ``row[i]``'s cache position ``src[i]`` to ``dst[i]`` (entries
        with ``row < 0`` are idle)."""
        raise NotImplementedError

    def copy_slots(self, kv_cache, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V of global slot ``src[i]`` onto ``dst[i]`` (1-D, fixed shape; sources
        and destinations disjoint, or equal pairs): copy-on-write's gather."""
        raise NotImplementedError

    def decode_moves(self, drop: torch.Tensor, live: torch.Tensor):
        raise NotImplementedError

    def attend_and_score(self, query: torch.Tensor, kv_cache, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, out: torch.Tensor, batch,
                         side: Optional[SlotSideState] = None) -> bool:
        """Decode attention, one query per row (``query`` ``[rows, q_heads, D]``) over the
        row's first ``seq_lens[r]`` cache positions in ``block_table`` ``[rows, blocks]``
        (what the stock kernel would read), into ``out``, writing the softmax weights it
        used, summed over each kv head's query heads, into
        ``batch.scores_of_next_layer``; False (nothing written) when the platform has no
        such kernel for this cache, and the stock kernel runs.  It may also evict the
        batch's rows right away (``batch.row_evictions_of_next_layer``), leaving nothing
        for ``evict_layers``; rows under position rules (``batch.protect``) then drop by
        the layer's side state ``side``."""
        return False

    def decode_evict_fused(self, scores: torch.Tensor, kv_cache, ev: EvictionBatch) -> bool:
        """Drop + move for steady decode in one go, when the platform has it."""
        return False

    # ---------------------------------------------------------------- shared mechanism

    def head_mean(self, head_sum: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's query heads -> mean over all of the layer's query heads."""
        if self.all_reduce is not None:
            head_sum = self.all_reduce(head_sum)
        return head_mean(head_sum, self.total_q_heads)

    def evict(self, query: torch.Tensor, kv_cache, ev: EvictionBatch,
              lse: Optional[torch.Tensor] = None, groups: Optional[PolicyGroups] = None,
              side: Optional[SlotSideState] = None) -> None:
        """Evict ``ev``'s rows.  ``lse``: ``[E, q_heads]`` fp32 log-sum-exp of each row's
        last query, or None.  ``groups``: rows by policy (``side_state.group_rows``), None
        when all are TOVA.  Every move list has a fixed shape (idle entries: row -1), so
        no eviction makes the host wait for the device."""
        if ev.slots is None:  # a batch not prepared by the builder (direct callers)
            ev = ev.prepared(self.block_size(kv_cache), query.device)

        def tova(select: Optional[torch.Tensor] = None) -> torch.Tensor:
            return self.tova_scores(query, kv_cache, ev, lse, select)

        if groups is None:
            scores = tova()
            if ev.one_drop_each and self.decode_evict_fused(scores, kv_cache, ev):
                return
        else:
            if ev.relocate is not None and side is not None:
                side.write_ordinary(ev.slots, ev.relocate)
            scores = policy_keep_scores(groups, ev.slots, ev.keep, ev.query_position, side,
                                        tova)
        if ev.one_drop_each:
            drop = position_to_drop(scores, ev.live, ev.padding)
            src, dst, row = self.decode_moves(drop, ev.live)
        else:
            src, dst, row = prompt_eviction_moves(scores, ev.live, ev.keep, max(ev.keep_list),
                                                  ev.relocate)
        if groups is not None and side is not None:
            side.move_rows(ev.slots, src, dst, row, ev.dest_slots)
        if ev.relocate is None:
            self.compact(kv_cache, ev, src, dst, row)
        else:
            self.copy_slots(kv_cache, *relocation_slots(ev, src, dst, row))

    def evict_layers(self, queries: list[torch.Tensor], kv_caches: list, ev: EvictionBatch,
                     groups: Optional[PolicyGroups] = None,
                     sides: Optional[list[Optional[SlotSideState]]] = None,
                     scores: Optional[torch.Tensor] = None,
                     new_positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steady decode's eviction of every layer of a step at once (``layer_batch.py``):
        ``queries[l]`` ``[E, q_heads, D]`` are the eviction rows' last queries in layer l,
        whose cache is ``kv_caches[l]`` and side state ``sides[l]``; every row drops one
        token, by TOVA's score (``groups`` None) or by its group's policy (none of which
        accumulates).  ``scores``: ``[L, E, kv_heads, W]`` TOVA's head-summed weights as
        the layers' attention gave them (``attend_and_score``), instead of the queries.
        ``new_positions``: ``(slots, positions)`` of the step's new tokens, written into
        every layer's side state first (the layers of a batched step do not write them).
        Returns the moves' slots ``(src [E], dst [L, E])``.  Only platforms whose builder
        sets ``batches_layers`` are asked."""
        raise NotImplementedError

    def accumulate(self, query: torch.Tensor, kv_cache, batch: QueryBatch,
                   side: SlotSideState) -> None:
        """H2O: add every query's head-mean softmax weights to the slots it attends to."""
        logits_of = self.query_logits(kv_cache, batch)
        total = None
        for first in range(0, batch.query_index.shape[1], ACCUMULATE_QUERY_BLOCK):
            part = slice(first, first + ACCUMULATE_QUERY_BLOCK)
            summed = accumulated_from_logits(logits_of(query[batch.query_index[:, part]]),
                                             batch.visible[:, part])
            total = summed if total is None else total + summed
        # Fixed shapes (no boolean indexing, so no wait for the device): padding positions
        # are visible to no query, so they add exactly 0.0 to position 0's slot.
        increment = self.head_mean(total)
        side.add_attention(batch.slot_ids.flatten(), increment.flatten())


def relocation_slots(ev: EvictionBatch, src: torch.Tensor, dst: torch.Tensor,
                     row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``(source, destination)`` slots of moves whose destinations may lie in other
    blocks (``ev.dest_slots``).  Idle entries copy one slot onto itself: row 0's last live
    position, which no move writes (in place, holes are below the budget; a relocating
    row writes only its private blocks), so no collision with a real move."""
    r = row.clamp(min=0)
    idle = row < 0
    unwritten = ev.slots[0, ev.live[0].long() - 1]
    return (torch.where(idle, unwritten, ev.slots[r, src]),
            torch.where(idle, unwritten, ev.dest_slots[r, dst]))
