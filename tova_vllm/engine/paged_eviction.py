"""Eviction on vLLM's FlashAttention KV layout, on whatever device the cache lives.

The CUDA backend's mechanism, kept free of vLLM imports so it runs (and is tested) on CPU
tensors too: with the torch kernels, and with the Triton kernels under
``TRITON_INTERPRET=1``.  ``tova_vllm.kernels.select_backend`` picks Triton on CUDA.

The platform half of :class:`~.evictor.Evictor` (the shared half selects, moves side state
and accumulates).  Per layer and phase, for the phase's eviction rows
(``plan.EvictionBatch``):

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

from typing import Callable, Optional

import torch

from ..kernels import select_backend
from ..kernels.torch_ref import gather_keys
from .evictor import AllReduce, Evictor
from .plan import EvictionBatch, QueryBatch


def split_flash_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.32's FlashAttention layer cache ``[num_blocks, kv_heads, block_size, 2 * D]``
    as ``(key_cache, value_cache)`` views ``[num_blocks, block_size, kv_heads, D]``."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


class PagedEvictor(Evictor):
    """``kv_cache`` is the ``(key_cache, value_cache)`` pair of :func:`split_flash_kv_cache`."""

    def __init__(self, device: torch.device, total_q_heads: int, scale: float,
                 all_reduce: Optional[AllReduce] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(total_q_heads, scale, all_reduce)
        self.kernels = select_backend(device, backend)

    def block_size(self, kv_cache) -> int:
        return kv_cache[0].shape[1]

    def tova_scores(self, query, kv_cache, ev: EvictionBatch, lse, select):
        table, live, qidx = ev.block_table, ev.live, ev.query_index
        if select is not None:
            table, live, qidx = table[select], live[select], qidx[select]
            lse = None if lse is None else lse[select]
        scores = self.kernels.paged_tova_scores(
            query[qidx], kv_cache[0], table, live, self.scale, lse,
            max_live=max(ev.live_list), total_q_heads=self.total_q_heads,
        )
        if self.all_reduce is not None:  # each rank summed its heads over the global count
            scores = self.all_reduce(scores)
        return scores

    def decode_evict_fused(self, scores, kv_cache, ev: EvictionBatch) -> bool:
        self.kernels.decode_evict(scores, ev.live, *kv_cache, ev.block_table)
        return True

    def decode_moves(self, drop, live):
        return self.kernels.decode_moves(drop, live)

    def compact(self, kv_cache, ev: EvictionBatch, src, dst, row) -> None:
        self.kernels.compact_paged(*kv_cache, ev.block_table, src, dst, row)

    def copy_slots(self, kv_cache, src, dst) -> None:
        # Once per request (its first eviction): plain indexing, one gather then one scatter
        # per half, is enough.
        block_size = self.block_size(kv_cache)
        for half in kv_cache:
            half[dst // block_size, dst % block_size] = half[src // block_size, src % block_size]

    def query_logits(self, kv_cache, batch: QueryBatch) -> Callable[[torch.Tensor], torch.Tensor]:
        block_size = self.block_size(kv_cache)
        width = batch.slot_ids.shape[1]
        table = (batch.slot_ids[:, ::block_size] // block_size).to(torch.int32)
        keys = gather_keys(kv_cache[0], table, batch.in_use.sum(dim=1), width).float()
        kv_heads, head_dim = keys.shape[1], keys.shape[3]

        def logits(queries: torch.Tensor) -> torch.Tensor:
            rows, num_q = queries.shape[:2]
            q = queries.float().view(rows, num_q, kv_heads, -1, head_dim).permute(0, 2, 3, 1, 4)
            return torch.einsum("ekgld,eksd->ekgls", q, keys) * self.scale

        return logits
