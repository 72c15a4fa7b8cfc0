"""Per-slot side state of the baseline policies, and their keep scores from it.

Shared by the CPU backend and the CUDA eviction mechanism (``paged_eviction.py``); no vLLM
import.  Slots are global cache slots ``block * block_size + offset``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..policies import EvictionPolicy
from . import native
from .device_copy import host_to_device


class SlotSideState:
    """Logical position (int32) and accumulated attention (fp32) of every cache slot of
    one layer: written with the K/V, moved by the same compaction.  One spare entry past
    the last slot absorbs the idle entries of fixed-shape move lists."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.positions = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        self.accumulated = torch.zeros(num_slots + 1, dtype=torch.float32, device=device)

    @classmethod
    def sized(cls, current: Optional["SlotSideState"], num_slots: int,
              device: torch.device) -> "SlotSideState":
        """``current`` when it covers ``num_slots``, else a fresh state (made on first use)."""
        if current is not None and current.num_slots == num_slots:
            return current
        return cls(num_slots, device)

    def write(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.positions[slots] = positions.to(torch.int32)
        self.accumulated[slots] = 0.0

    def write_ordinary(self, slot_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Record the positions of ``rows`` (``[E]`` bool) whose cache is still their
        ordinary blocks, where a position is its cache position (``slot_ids``: ``[E, S]``,
        padding columns on position 0's slot): blocks read from the prefix cache were
        written by other requests, whose side state may not have been kept.  Fixed shapes;
        every duplicate slot gets one value."""
        cache_positions = torch.arange(slot_ids.shape[1], device=slot_ids.device,
                                       dtype=self.positions.dtype)
        padding = slot_ids == slot_ids[:, :1]
        ordinary = torch.where(padding, 0, cache_positions)
        self.positions[slot_ids] = torch.where(rows.unsqueeze(1), ordinary,
                                               self.positions[slot_ids])

    def move(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        for side in (self.positions, self.accumulated):
            side[dst_slots] = side[src_slots]

    def move_rows(self, slot_ids: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  row: torch.Tensor, dst_slot_ids: Optional[torch.Tensor] = None) -> None:
        """Fixed-shape moves (no boolean indexing, so no wait for the device): entry i moves
        row ``row[i]``'s cache position ``src[i]`` to ``dst[i]`` (``slot_ids``: ``[rows,
        positions]`` global slots; ``dst_slot_ids``: those of the destination positions
        when they lie elsewhere, copy-on-write); idle entries (``row < 0`` or the same
        slot) copy the spare entry onto itself, so they can collide with no real move."""
        r = row.clamp(min=0)
        src_slots = slot_ids[r, src.clamp(min=0)]
        dst_slots = (slot_ids if dst_slot_ids is None else dst_slot_ids)[r, dst.clamp(min=0)]
        active = (row >= 0) & (src_slots != dst_slots)
        spare = torch.full_like(src, self.num_slots)
        self.move(torch.where(active, src_slots, spare), torch.where(active, dst_slots, spare))

    def add_attention(self, slots: torch.Tensor, increment: torch.Tensor) -> None:
        self.accumulated.index_put_((slots,), increment, accumulate=True)


PolicyGroups = list[tuple[EvictionPolicy, torch.Tensor]]


def group_rows(policies: list[EvictionPolicy], device: torch.device) -> PolicyGroups:
    """Each distinct policy with its eviction rows (on ``device``), in first-seen order;
    made once per phase, used by every layer."""
    members: dict[EvictionPolicy, list[int]] = {}
    for e, policy in enumerate(policies):
        members.setdefault(policy, []).append(e)
    return [(policy, host_to_device(torch.tensor(rows, dtype=torch.long), device))
            for policy, rows in members.items()]


def under_position_rules(groups: PolicyGroups) -> bool:
    """Whether every group's policy has a position rule (drops need no scores)."""
    return all(policy.position_rule is not None for policy, _ in groups)


def position_protect(groups: PolicyGroups, rows: int) -> Optional[torch.Tensor]:
    """``[rows]`` int64: each eviction row's ``position_rule`` (its keep score is its
    positions' plus PROTECTED below that), when every group's policy has one; else None."""
    if not under_position_rules(groups):
        return None
    rules = [policy.position_rule for policy, _ in groups]
    if len(rules) == 1:
        return torch.full((rows,), rules[0], dtype=torch.int64)
    protect = torch.empty(rows, dtype=torch.int64)
    for rule, (_, members) in zip(rules, groups):
        protect[members.cpu()] = rule
    return protect


def policy_keep_scores(
    groups: PolicyGroups,
    slot_ids: torch.Tensor,
    cache_size: torch.Tensor,
    query_position: torch.Tensor,
    side: Optional[SlotSideState],
    last_query_probs: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """fp64 keep scores ``[E, S]`` of eviction rows whose policies differ (exact positions
    need fp64), one group of rows (``group_rows``) at a time.  ``slot_ids``: ``[E, S]``
    cache slot of each row's positions; ``last_query_probs(rows)``: TOVA's scores of those
    rows."""
    scores = torch.empty(slot_ids.shape, dtype=torch.float64, device=slot_ids.device)
    for policy, rows in groups:
        inputs = {}
        if policy.needs_last_query_probs:
            inputs["last_query_probs"] = last_query_probs(rows)
        if policy.needs_positions or policy.needs_accumulated:
            if side is None:
                raise RuntimeError(f"tova-vllm: policy {policy.name} needs side state")
            if policy.needs_positions:
                inputs["positions"] = side.positions[slot_ids[rows]]
            if policy.needs_accumulated:
                inputs["accumulated"] = side.accumulated[slot_ids[rows]]
        scores[rows] = policy.keep_scores(
            cache_size=cache_size[rows], query_position=query_position[rows], **inputs
        ).double()
    return scores


def write_positions(sides, slots: torch.Tensor, positions: torch.Tensor) -> None:
    """Every layer's side state records the logical positions of the new slots."""
    if any(side is None for side in sides):
        raise RuntimeError("tova-vllm: a layer of a step with side state has none")
    arrays = [side.positions for side in sides]
    if not native.scatter_positions(arrays, slots, positions):
        for array in arrays:
            array[slots] = positions.to(array.dtype)
