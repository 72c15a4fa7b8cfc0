"""Eviction on vLLM's CPU KV pages: the CPU platform's :class:`~.evictor.Evictor`.

Reads and moves K/V through the page layout that ``cpu_layout.py`` probes from vLLM's own
write op, so any ISA's layout that is a permutation of the elements works.  No vLLM import.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.torch_ref import decode_moves
from ..policies import gqa_logits, head_summed_probs_from_logits
from .cpu_layout import HalfPageLayout, PageLayout, probe_page_layout
from .evictor import AllReduce, Evictor
from .plan import EvictionBatch, QueryBatch


class CpuEvictor(Evictor):
    """``kv_cache`` is the layer's pages ``[num_blocks, kv_heads, 2 * bs, D]`` (K rows
    first, in the probed layout of instruction set ``isa``)."""

    def __init__(self, isa: str, head_size: int, total_q_heads: int, scale: float,
                 all_reduce: Optional[AllReduce] = None) -> None:
        super().__init__(total_q_heads, scale, all_reduce)
        self.isa = isa
        self.head_size = head_size

    def block_size(self, pages: torch.Tensor) -> int:
        return pages.shape[2] // 2

    def layout(self, pages: torch.Tensor) -> PageLayout:
        return probe_page_layout(self.isa, pages.dtype, self.block_size(pages), self.head_size)

    def tova_scores(self, query, pages, ev: EvictionBatch, lse, select):
        block_ids, block_offsets, qidx, live = (ev.block_ids, ev.block_offsets,
                                                ev.query_index, ev.live)
        if select is not None:
            block_ids, block_offsets = block_ids[select], block_offsets[select]
            qidx, live = qidx[select], live[select]
        logits = last_query_logits(pages, self.layout(pages), block_ids, block_offsets,
                                   query[qidx], self.scale)
        return self.head_mean(head_summed_probs_from_logits(logits, live))

    def query_logits(self, pages, batch: QueryBatch) -> Callable[[torch.Tensor], torch.Tensor]:
        layout, block_size = self.layout(pages), self.block_size(pages)
        block_ids, block_offsets = batch.slot_ids // block_size, batch.slot_ids % block_size
        return lambda queries: many_query_logits(pages, layout, block_ids, block_offsets,
                                                 queries, self.scale)

    def decode_moves(self, drop, live):
        return decode_moves(drop, live)

    def compact(self, pages, ev: EvictionBatch, src, dst, row) -> None:
        moving = row >= 0  # the host is the device here: no wait to avoid
        row, src, dst = row[moving], src[moving], dst[moving]
        copy_positions(pages, self.layout(pages), ev.block_ids[row, src],
                       ev.block_offsets[row, src], ev.block_ids[row, dst],
                       ev.block_offsets[row, dst])


def gather(pages: torch.Tensor, half: HalfPageLayout, block_ids: torch.Tensor,
           block_offsets: torch.Tensor) -> torch.Tensor:
    """K (or V) of the cache positions given as ``[E, S]`` blocks and in-block offsets.

    ``pages`` is the layer cache viewed ``[num_blocks, kv_heads, 2 * bs, D]``; returns
    ``[E, kv_heads, S, D]``.
    """
    heads = torch.arange(pages.shape[1]).view(1, -1, 1, 1)
    rows = half.rows[block_offsets].unsqueeze(1)  # [E, 1, S, D]
    cols = half.cols[block_offsets].unsqueeze(1)
    return pages[block_ids[:, None, :, None], heads, rows, cols]


def copy_positions(pages: torch.Tensor, layout: PageLayout, src_block: torch.Tensor,
                   src_offset: torch.Tensor, dst_block: torch.Tensor,
                   dst_offset: torch.Tensor) -> None:
    """Copy K and V, all heads, of each source position onto its destination (1-D args).

    Sources and destinations must be disjoint sets (or equal pairs): all reads happen
    before any write.
    """
    heads = torch.arange(pages.shape[1]).view(1, -1, 1)
    src_block, dst_block = src_block.view(-1, 1, 1), dst_block.view(-1, 1, 1)
    for half in (layout.key, layout.value):
        dst = (dst_block, heads, half.rows[dst_offset].unsqueeze(1), half.cols[dst_offset].unsqueeze(1))
        src = (src_block, heads, half.rows[src_offset].unsqueeze(1), half.cols[src_offset].unsqueeze(1))
        pages[dst] = pages[src]


def last_query_logits(pages: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor,
                      block_offsets: torch.Tensor, query: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """fp32 ``q.k * scale`` for each row's cache positions: ``[E, kv_heads, group, S]``.

    ``block_ids``/``block_offsets``: ``[E, S]`` per cache position, positions laid out
    block after block (as ``EvictionBatch`` gives them).  For the plain layouts whole
    blocks are copied once and multiplied in place (a matmul against K or K^T); only an
    unusual layout pays for an element-wise gather.
    """
    kind = layout.key_kind
    if kind == "other":
        return gqa_logits(query, gather(pages, layout.key, block_ids, block_offsets), scale)
    rows, width = block_ids.shape
    num_blocks, kv_heads, double_bs, head_size = pages.shape
    block_size = double_bs // 2
    per_row = -(-width // block_size)
    first = block_ids[:, ::block_size][:, :per_row].reshape(-1)
    # Copy the K halves of the rows' blocks into a reused buffer: allocating a fresh
    # K-sized tensor per layer costs more (first-touch page faults) than the copy itself.
    raw = _scratch("blocks", (first.numel(), kv_heads, block_size, head_size), pages.dtype)
    torch.index_select(pages[:, :, :block_size, :], 0, first, out=raw)
    if raw.dtype != torch.float32:
        raw = _scratch("blocks_fp32", raw.shape, torch.float32).copy_(raw)
    q = query.float().view(rows, 1, kv_heads, -1, head_size)  # [E, 1, H, g, D]
    if kind == "transposed":
        k_t = raw.view(rows, per_row, kv_heads, head_size, block_size)
    else:
        k_t = raw.view(rows, per_row, kv_heads, block_size, head_size).transpose(-1, -2)
    logits = torch.matmul(q, k_t) * scale  # [E, n, H, g, bs]
    logits = logits.permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, -1, per_row * block_size)
    return logits[..., :width]


_SCRATCH: dict[str, torch.Tensor] = {}


def _scratch(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A buffer reused by every layer and step of this process (layers run one at a time);
    it grows to the largest eviction batch seen and is never shrunk."""
    numel = 1
    for n in shape:
        numel *= n
    buffer = _SCRATCH.get(name)
    # A buffer made under inference mode (the engine) cannot be written outside it.
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or stale or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        _SCRATCH[name] = buffer
    return buffer[:numel].view(shape)


def many_query_logits(pages: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor,
                      block_offsets: torch.Tensor, queries: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """fp32 logits of several queries per row: ``queries`` ``[E, L, q_heads, D]`` ->
    ``[E, kv_heads, group, L, S]``.

    The L queries ride along as extra query heads of their KV group, so the block copy and
    the matmul are the single-query ones.
    """
    rows, num_queries, q_heads, head_size = queries.shape
    kv_heads = pages.shape[1]
    group = q_heads // kv_heads
    folded = (queries.view(rows, num_queries, kv_heads, group, head_size)
              .permute(0, 2, 3, 1, 4).reshape(rows, kv_heads * group * num_queries, head_size))
    logits = last_query_logits(pages, layout, block_ids, block_offsets, folded, scale)
    return logits.view(rows, kv_heads, group, num_queries, -1)
