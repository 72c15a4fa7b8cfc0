"""Eviction on vLLM's FlashAttention KV layout, on whatever device the cache lives.

The CUDA backend's mechanism, kept free of vLLM imports so it runs (and is tested) on CPU
tensors too: with the torch kernels, and with the Triton kernels under
``TRITON_INTERPRET=1``.  ``tova_vllm.kernels.select_backend`` picks Triton on CUDA.

Per layer and phase, for the phase's eviction rows (``plan.EvictionBatch``):

* TOVA only (the common case): ``paged_tova_scores`` from the attention kernel's
  log-sum-exp when the backend has it (one pass over K; otherwise the kernel computes the
  softmax itself), then ``decode_evict`` (argmin + move, one launch) for steady decode,
  or top-C for all rows at once (``policies.prompt_eviction_moves``) + the compaction
  kernel for prompt evictions;
* other policies: their keep scores (``policies/eviction.py``) from the per-slot side
  state, the shared selection rules, and the same compaction kernel; the side state moves
  with the K/V.

Every move list has a fixed shape (idle entries: row -1) and the plan reaches the device
through pinned memory, so no eviction makes the host wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..kernels import select_backend
from ..kernels.torch_ref import gather_keys
from ..policies import (
    accumulated_from_logits,
    prompt_eviction_moves,
    slot_to_drop,
)
from .device_copy import host_to_device
from .plan import EvictionBatch, QueryBatch
from .side_state import PolicyGroups, SlotSideState, policy_keep_scores


def split_flash_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.32's FlashAttention layer cache ``[num_blocks, kv_heads, block_size, 2 * D]``
    as ``(key_cache, value_cache)`` views ``[num_blocks, block_size, kv_heads, D]``."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


@dataclass
class _DeviceRows:
    table: torch.Tensor  # [E, blocks] block table of each eviction row
    live: torch.Tensor  # [E] int32
    query_index: torch.Tensor
    query_position: torch.Tensor
    keep: torch.Tensor
    #: [E, S] global cache slot of each row's positions; made when a policy needs it.
    slot_ids: Optional[torch.Tensor] = None


def _device_rows(ev: EvictionBatch, block_size: int, device: torch.device) -> _DeviceRows:
    """The eviction rows' tensors on ``device``, made once per phase, shared by all layers."""
    cache = ev.__dict__.setdefault("_device_rows", {})
    if device not in cache:
        # Positions 0, bs, 2bs, ... of each row: the row's block table up to its live end
        # (padding positions map to position 0's block, valid memory that is never read).
        table = ev.block_ids[:, ::block_size].to(torch.int32)
        cache[device] = _DeviceRows(
            table=host_to_device(table, device),
            live=host_to_device(ev.live.to(torch.int32), device),
            query_index=host_to_device(ev.query_index, device),
            query_position=host_to_device(ev.query_position, device),
            keep=host_to_device(ev.keep, device),
        )
    return cache[device]


class PagedEvictor:
    """Scores, selects and compacts one layer's eviction rows."""

    def __init__(self, device: torch.device, total_q_heads: int, scale: float,
                 all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 backend: Optional[str] = None) -> None:
        self.kernels = select_backend(device, backend)
        self.total_q_heads = total_q_heads
        self.scale = scale
        self.all_reduce = all_reduce

    def _tova_scores(self, query, key_cache, rows: _DeviceRows, width: int,
                     lse: Optional[torch.Tensor], select: Optional[torch.Tensor] = None):
        table, live, qidx = rows.table, rows.live, rows.query_index
        if select is not None:
            table, live, qidx = table[select], live[select], qidx[select]
            lse = None if lse is None else lse[select]
        scores = self.kernels.paged_tova_scores(
            query[qidx], key_cache, table, live, self.scale, lse,
            max_live=width, total_q_heads=self.total_q_heads,
        )
        if self.all_reduce is not None:  # each rank summed its heads over the global count
            scores = self.all_reduce(scores)
        return scores

    def evict(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              ev: EvictionBatch, lse: Optional[torch.Tensor] = None,
              groups: Optional[PolicyGroups] = None,
              side: Optional[SlotSideState] = None) -> None:
        """``lse``: ``[E, q_heads]`` fp32 log-sum-exp of each eviction row's last query,
        or None.  ``groups``: eviction rows by policy (``side_state.group_rows``), None
        when all are TOVA."""
        block_size = key_cache.shape[1]
        rows = _device_rows(ev, block_size, key_cache.device)
        width = max(ev.live_list)
        if groups is None:
            scores = self._tova_scores(query, key_cache, rows, width, lse)
            if ev.one_drop_each:
                self.kernels.decode_evict(scores, rows.live, key_cache, value_cache, rows.table)
                return
        else:
            if rows.slot_ids is None:
                rows.slot_ids = host_to_device(ev.slot_ids(block_size), key_cache.device)
            slot_ids = rows.slot_ids
            scores = policy_keep_scores(
                groups, slot_ids, rows.keep, rows.query_position, side,
                lambda select: self._tova_scores(query, key_cache, rows, width, lse, select))
        # Fixed-shape move lists (idle entries: row -1), so neither decode nor prompt
        # evictions make the host wait for the device.
        if ev.one_drop_each:
            drop = slot_to_drop(scores, rows.live.long())
            src, dst, row = self.kernels.decode_moves(drop, rows.live)
        else:
            src, dst, row = prompt_eviction_moves(scores, rows.live, rows.keep,
                                                  max(ev.keep_list))
        if groups is not None and side is not None:
            side.move_rows(slot_ids, src, dst, row)
        self.kernels.compact_paged(key_cache, value_cache, rows.table, src, dst, row)

    def accumulate(self, query: torch.Tensor, key_cache: torch.Tensor, batch: QueryBatch,
                   side: SlotSideState, query_block: int = 64) -> None:
        """H2O: add every query's head-mean softmax weights to the slots it attends to."""
        device = key_cache.device
        block_size = key_cache.shape[1]
        cache = batch.__dict__.setdefault("_on_device", {})  # copied once, for all layers
        if device not in cache:
            cache[device] = tuple(host_to_device(t, device) for t in (
                batch.slot_ids, batch.in_use, batch.query_index, batch.visible))
        slot_ids, in_use, query_index, visible = cache[device]
        width = slot_ids.shape[1]
        table = (slot_ids[:, ::block_size] // block_size).to(torch.int32)
        live = in_use.sum(dim=1)
        keys = gather_keys(key_cache, table, live, width).float()  # [E, H, S, D]
        kv_heads, head_dim = keys.shape[1], keys.shape[3]
        total = None
        for first in range(0, query_index.shape[1], query_block):
            part = slice(first, first + query_block)
            q = query[query_index[:, part]].float()  # [E, L, Hq, D]
            rows, num_q = q.shape[:2]
            q = q.view(rows, num_q, kv_heads, -1, head_dim).permute(0, 2, 3, 1, 4)
            logits = torch.einsum("ekgld,eksd->ekgls", q, keys) * self.scale
            summed = accumulated_from_logits(logits, visible[:, part])
            total = summed if total is None else total + summed
        if self.all_reduce is not None:
            total = self.all_reduce(total)
        # Fixed shapes (no boolean indexing, so no wait for the device): padding positions
        # are visible to no query, so they add exactly 0.0 to position 0's slot.
        increment = total / self.total_q_heads
        side.add_attention(slot_ids.flatten(), increment.flatten())
