"""Eviction on vLLM's CPU KV pages: the CPU platform's :class:`~.evictor.Evictor`.

Reads and moves K/V through the page layout that ``cpu_layout.py`` probes from vLLM's own
write op, so any ISA's layout that is a permutation of the elements works.  No vLLM import.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.torch_ref import decode_moves
from ..policies import head_summed_probs_from_logits, position_to_drop
from .cpu_layout import PageLayout, probe_page_layout
from .evictor import AllReduce, Evictor
from . import native
from .plan import EvictionBatch, QueryBatch
from .side_state import position_protect, write_positions


class CpuEvictor(Evictor):
    """``kv_cache`` is the layer's pages ``[num_blocks, kv_heads, 2 * bs, D]`` (K rows
    first, in the probed layout of instruction set ``isa``)."""

    def __init__(self, isa: str, head_size: int, total_q_heads: int, scale: float,
                 all_reduce: Optional[AllReduce] = None) -> None:
        super().__init__(total_q_heads, scale, all_reduce)
        self.isa = isa
        self.head_size = head_size
        #: The layout's ``slot_elements``, made on first use.
        self._elements_of: Optional[tuple[PageLayout, torch.Tensor]] = None
        #: Whether ``native.decode_attention`` reads this layer's pages (asked once).
        self._attends: Optional[bool] = None

    def block_size(self, pages: torch.Tensor) -> int:
        return pages.shape[2] // 2

    def layout(self, pages: torch.Tensor) -> PageLayout:
        return probe_page_layout(self.isa, pages.dtype, self.block_size(pages), self.head_size)

    def tova_scores(self, query, pages, ev: EvictionBatch, lse, select):
        block_ids, block_offsets, qidx = ev.block_ids, ev.block_offsets, ev.query_index
        table, padding = ev.block_table, ev.padding
        if select is not None:
            block_ids, block_offsets = block_ids[select], block_offsets[select]
            qidx, table, padding = qidx[select], table[select], padding[select]
        width = block_ids.shape[1]
        live = ev.live if select is None else ev.live[select]
        logits = native.key_logits(pages, self.layout(pages), table, query[qidx], self.scale,
                                   live=live)
        if logits is not None:  # padding already -inf
            return self.head_mean(head_summed_probs_from_logits(logits))[:, :width]
        logits = last_query_logits(pages, self.layout(pages), block_ids, block_offsets,
                                   query[qidx], self.scale, table)
        return self.head_mean(head_summed_probs_from_logits(logits, padding=padding))

    def attend_and_score(self, query, pages, block_table, seq_lens, out, batch,
                         side=None) -> bool:
        if self._attends is None:
            self._attends = native.attends(self.layout(pages), pages)
        if not self._attends:
            return False
        rows, per_row = block_table.shape
        width = per_row * self.block_size(pages)
        scores = batch.scores_of_next_layer(
            lambda shape: _scratch("attention_scores", shape, torch.float32),
            (rows, pages.shape[1], width))
        logits = _scratch("attention_logits", (rows * query.shape[1] * width,), torch.float32)
        evictions = None
        if self.all_reduce is None:  # (tensor parallel: the head sums need every rank's)
            evicts, src, dst = batch.row_evictions_of_next_layer(rows)
            by_position = {}
            if batch.protect is not None:  # position rules: drops by the side state
                if side is None:
                    raise RuntimeError("tova-vllm: a layer of a step with side state has none")
                by_position = dict(zip(("protect", "new_slots", "new_positions"),
                                       batch.position_inputs(rows)), positions=side.positions)
            evictions = native.RowEvictions(evicts, self.total_q_heads, src, dst,
                                            **by_position)
        return native.decode_attention(pages, self.layout(pages), block_table, query,
                                       self.scale, seq_lens, out, scores, logits, evictions)

    def evict_layers(self, queries, kv_caches, ev: EvictionBatch, groups=None,
                     sides=None, scores=None, new_positions=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        pages = kv_caches[0]
        num_layers, rows = len(kv_caches), ev.block_ids.shape[0]
        moves = None
        if new_positions is not None:
            protect = None if groups is None else position_protect(groups, rows)
            if protect is not None:  # choice and side-state moves from positions alone
                moves = native.position_drops([side.positions for side in sides], ev.live,
                                              ev.slots, protect, *new_positions)
            if moves is None:
                write_positions(sides, *new_positions)
        if moves is None:
            moves = self._choose_by_scores(queries, kv_caches, ev, groups, sides, scores)
        src, dst = moves
        elements = self._elements(pages)
        if not native.copy_slots(kv_caches, elements, src, dst):
            src_index = slot_index(elements, src, pages)
            dst_index = slot_index(elements, dst, pages)
            for layer, layer_pages in enumerate(kv_caches):
                flat = layer_pages.view(-1)
                flat[dst_index[layer]] = flat[src_index]
        return src, dst

    def _choose_by_scores(self, queries, kv_caches, ev: EvictionBatch, groups, sides, scores
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``evict_layers``' drops from scores, and the side states' moves: ``(src [E],
        dst [L, E])``."""
        num_layers, rows = len(kv_caches), ev.block_ids.shape[0]
        # Layer l's row e is row l * E + e of one batch of L * E rows.
        if scores is not None:
            width = ev.block_ids.shape[1]
            scores = self.head_mean(scores.sum(2).view(num_layers * rows, -1))[:, :width]
        elif groups is None:
            scores = self._layer_tova_scores(queries, kv_caches, ev.block_table, ev.live,
                                             ev.padding)
        else:
            scores = self._layer_policy_scores(queries, kv_caches, ev, groups, sides)
        # Decode rule: the last live position moves into the dropped one.
        scores = scores.view(num_layers, rows, -1)
        moves = native.decode_drops(scores, ev.live, ev.slots)
        if moves is None:
            # Every layer's rows share live and padding: broadcast over the layer axis.
            drop = position_to_drop(scores, ev.live, ev.padding)
            row_ids = torch.arange(rows)
            moves = (ev.slots[row_ids, ev.live.long() - 1],
                     ev.slots[row_ids.expand(num_layers, rows), drop])
        if groups is not None:
            _move_side_states(sides, *moves)
        return moves

    def _layer_tova_scores(self, queries, kv_caches, block_table, live, padding):
        """TOVA's scores ``[L * E, S]`` of rows whose queries are ``queries[l]`` in layer
        l (``padding``: ``[E, S]``)."""
        pages = kv_caches[0]
        layout = self.layout(pages)
        num_layers, width = len(kv_caches), padding.shape[1]
        logits = _layer_logits_in_place(kv_caches, layout, block_table, queries, self.scale,
                                        live)
        if logits is not None:  # padding already -inf
            return self.head_mean(head_summed_probs_from_logits(logits))[:, :width]
        table = block_table.reshape(-1)
        blocks = _scratch("blocks", (num_layers, table.numel()) + pages.shape[1:2]
                          + (pages.shape[2] // 2, pages.shape[3]), pages.dtype)
        for layer, layer_pages in enumerate(kv_caches):
            copy_key_blocks(layer_pages, table, blocks[layer])
        logits = logits_from_key_blocks(blocks.view(-1, *blocks.shape[2:]), layout,
                                        torch.cat(queries), self.scale, width)
        return self.head_mean(head_summed_probs_from_logits(
            logits, padding=padding.repeat(num_layers, 1)))

    def _layer_policy_scores(self, queries, kv_caches, ev: EvictionBatch, groups, sides):
        """fp64 keep scores ``[L * E, S]`` of rows whose policies differ, every layer at
        once: ``side_state.policy_keep_scores`` over a batch of L layers."""
        num_layers, (rows, width) = len(kv_caches), ev.block_ids.shape
        if len(groups) == 1:  # one policy for every row (rows in order): no gathers
            (policy, _), = groups
            return self._group_scores(policy, queries, kv_caches, ev, sides, None)
        scores = torch.empty(num_layers, rows, width, dtype=torch.float64)
        for policy, members in groups:
            scores[:, members] = self._group_scores(policy, queries, kv_caches, ev, sides,
                                                    members).view(num_layers, -1, width)
        return scores.view(num_layers * rows, width)

    def _group_scores(self, policy, queries, kv_caches, ev: EvictionBatch, sides,
                      members: Optional[torch.Tensor]) -> torch.Tensor:
        """fp64 keep scores ``[L * n, S]`` of one policy's rows ``members`` (None: every
        row) in every layer."""
        if policy.needs_accumulated:
            raise ValueError(f"tova-vllm: {policy.name} accumulates attention; its rows "
                             "evict layer by layer")
        num_layers, width = len(kv_caches), ev.block_ids.shape[1]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if members is None else t[members]

        inputs = {}
        if policy.needs_last_query_probs:
            inputs["last_query_probs"] = self._layer_tova_scores(
                [pick(q) for q in queries], kv_caches, pick(ev.block_table), pick(ev.live),
                pick(ev.padding))
        if policy.needs_positions:
            if any(side is None for side in sides):
                raise RuntimeError(f"tova-vllm: policy {policy.name} needs side state")
            slots = pick(ev.slots)
            inputs["positions"] = torch.stack(
                [side.positions[slots] for side in sides]).view(-1, width)
        # (``cat`` of L copies: a third of ``repeat``'s cost on these few elements.)
        return policy.keep_scores(
            cache_size=torch.cat([pick(ev.keep)] * num_layers),
            query_position=torch.cat([pick(ev.query_position)] * num_layers), **inputs,
        ).double()

    def query_logits(self, pages, batch: QueryBatch) -> Callable[[torch.Tensor], torch.Tensor]:
        layout, block_size = self.layout(pages), self.block_size(pages)
        block_ids, block_offsets = batch.slot_ids // block_size, batch.slot_ids % block_size
        return lambda queries: many_query_logits(pages, layout, block_ids, block_offsets,
                                                 queries, self.scale)

    def decode_moves(self, drop, live):
        return decode_moves(drop, live)

    def compact(self, pages, ev: EvictionBatch, src, dst, row) -> None:
        moving = row >= 0  # the host is the device here: no wait to avoid
        if not bool(moving.all()):
            row, src, dst = row[moving], src[moving], dst[moving]
        copy_slots(pages, self._elements(pages), ev.slots[row, src], ev.slots[row, dst])

    def copy_slots(self, pages, src, dst) -> None:
        copy_slots(pages, self._elements(pages), src, dst)

    def _elements(self, pages: torch.Tensor) -> torch.Tensor:
        layout = self.layout(pages)
        if self._elements_of is None or self._elements_of[0] is not layout:
            self._elements_of = (layout, slot_elements(layout, pages.shape[1]))
        return self._elements_of[1]


#: ``slot_elements`` of a side-state tensor: one element per slot, at the slot.
_SIDE_ELEMENT = torch.zeros(1, 1, dtype=torch.long)


def _move_side_states(sides, src: torch.Tensor, dst: torch.Tensor) -> None:
    """The decode moves of every layer's side state: slot ``src[e]`` onto ``dst[l, e]``.
    Positions only: no row of a batched step accumulates attention (``LayerBatch``)."""
    tensors = [side.positions for side in sides]
    if not native.copy_slots(tensors, _SIDE_ELEMENT, src, dst):
        for tensor, layer_dst in zip(tensors, dst):
            tensor[layer_dst] = tensor[src]


def slot_elements(layout: PageLayout, kv_heads: int) -> torch.Tensor:
    """``[block_size, 2 * kv_heads * D]``: where K and V of in-block offset o, every head
    and dim, sit in a block's pages flattened (``[kv_heads, 2 * bs, D]``), so that moving a
    cache position is one gather and one scatter over the flat cache, whatever the ISA's
    layout."""
    rows_per_page, head_size = 2 * layout.key.rows.shape[0], layout.key.rows.shape[1]
    page = torch.arange(kv_heads).view(1, -1, 1) * (rows_per_page * head_size)
    halves = [(half.rows * head_size + half.cols).unsqueeze(1) + page  # [bs, H, D]
              for half in (layout.key, layout.value)]
    return torch.cat(halves, dim=1).flatten(1)


def slot_index(elements: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor
               ) -> torch.Tensor:
    """Flat indices into ``pages`` of K and V, every head and dim, of each slot
    (``block * bs + offset``): ``slots.shape + [2 * kv_heads * D]``."""
    block_size = elements.shape[0]
    return (slots // block_size * pages[0].numel()).unsqueeze(-1) + elements[slots % block_size]


def copy_slots(pages: torch.Tensor, elements: torch.Tensor, src_slots: torch.Tensor,
               dst_slots: torch.Tensor) -> None:
    """Copy K and V, all heads, of each source slot onto its destination slot (1-D).
    Sources and destinations must be disjoint sets (or equal pairs): all reads happen
    before any write."""
    if native.copy_slots(pages, elements, src_slots, dst_slots):
        return
    flat = pages.view(-1)
    flat[slot_index(elements, dst_slots, pages)] = flat[slot_index(elements, src_slots, pages)]


def last_query_logits(pages: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor,
                      block_offsets: torch.Tensor, query: torch.Tensor, scale: float,
                      block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 ``q.k * scale`` for each row's cache positions: ``[E, kv_heads, group, S]``.

    ``block_ids``/``block_offsets``: ``[E, S]`` per cache position, positions laid out
    block after block (as ``EvictionBatch`` gives them).  For the plain layouts whole
    blocks are copied once and multiplied in place (a matmul against K or K^T); only an
    unusual layout pays for an element-wise gather.
    """
    rows, width = block_ids.shape
    block_size = pages.shape[2] // 2
    per_row = -(-width // block_size)
    # Each row's blocks (``block_table``, when the caller has it: ``EvictionBatch``).
    table = block_ids[:, ::block_size] if block_table is None else block_table
    in_place = native.key_logits(pages, layout, table[:, :per_row], query, scale)
    if in_place is not None:
        return in_place[..., :width]
    blocks = _scratch("blocks", (1, rows * per_row) + pages.shape[1:2] + (block_size, pages.shape[3]),
                      pages.dtype)
    copy_key_blocks(pages, table[:, :per_row].reshape(-1), blocks[0])
    return logits_from_key_blocks(blocks.view(rows * per_row, *blocks.shape[2:]), layout,
                                  query, scale, width)


def _layer_logits_in_place(kv_caches: list[torch.Tensor], layout: PageLayout,
                           block_table: torch.Tensor, queries: list[torch.Tensor],
                           scale: float, live: torch.Tensor) -> Optional[torch.Tensor]:
    """The layer batch's logits ``[L * E, kv_heads, group, blocks * bs]`` read in place
    (padding -inf) by one call over all layers; None when the in-place reader cannot run."""
    pages = kv_caches[0]
    rows, per_row = block_table.shape
    kv_heads, block_size = pages.shape[1], pages.shape[2] // 2
    group = queries[0].shape[1] // kv_heads
    out = _scratch("layer_logits", (len(kv_caches), rows, kv_heads, group,
                                    per_row * block_size), torch.float32)
    if native.key_logits(kv_caches, layout, block_table, torch.stack(queries), scale,
                         live=live, out=out) is None:
        return None
    return out.view(-1, kv_heads, group, per_row * block_size)


def copy_key_blocks(pages: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """The K halves of ``blocks`` (1-D) into ``out`` ``[len(blocks), kv_heads, bs, D]``.

    Into a reused buffer: allocating a fresh K-sized tensor per layer costs more
    (first-touch page faults) than the copy itself."""
    torch.index_select(pages[:, :, : pages.shape[2] // 2, :], 0, blocks, out=out)


def logits_from_key_blocks(blocks: torch.Tensor, layout: PageLayout, query: torch.Tensor,
                           scale: float, width: int) -> torch.Tensor:
    """fp32 logits ``[E, kv_heads, group, width]`` of one query per row (``query`` ``[E,
    q_heads, D]``) over the row's copied K blocks (``[E * n, kv_heads, bs, D]`` raw pages
    of a ``"rows"`` or ``"transposed"`` layout, n blocks per row, in cache order)."""
    rows = query.shape[0]
    num, kv_heads, block_size, head_size = blocks.shape
    per_row = num // rows
    raw = blocks
    kind = layout.key_kind
    if kind == "other" and layout.key_tiles is not None and layout.key_tiles[1] == (0, 2, 1, 3):
        return _logits_from_amx_tiles(raw, layout.key_tiles[0], query, scale, width)
    if kind == "other":
        # Any other permutation: one gather per copied block puts K in row order.
        raw = torch.index_select(raw.view(num, kv_heads, -1), 2, layout.key_order)
        kind = "rows"
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


def _logits_from_amx_tiles(raw: torch.Tensor, storage: tuple[int, ...], query: torch.Tensor,
                           scale: float, width: int) -> torch.Tensor:
    """Logits over K blocks stored as tiles ``[bs // T, D // P, T, P]`` (AMX's VNNI
    packing), without reordering K: per tile, the ``[D // P, T * P]`` matrix is multiplied
    by every (query dim-group offset) pair, and the pairs whose offsets match are summed
    (P times the FLOPs of a plain matmul, none of the strided copies)."""
    rows = query.shape[0]
    num, kv_heads = raw.shape[:2]
    tiles, groups, tile, group = storage
    per_row = num // rows
    k = raw.view(rows, per_row, kv_heads, tiles, groups, tile * group)
    if k.dtype != torch.float32:
        k = _scratch("blocks_fp32", k.shape, torch.float32).copy_(k)
    q = query.float().view(rows, kv_heads, -1, groups, group)  # [E, H, g, D/P, P]
    g = q.shape[2]
    q = q.permute(0, 1, 2, 4, 3).reshape(rows, 1, kv_heads, 1, g * group, groups)
    products = torch.matmul(q, k).view(rows, per_row, kv_heads, tiles, g, group, tile, group)
    logits = torch.diagonal(products, dim1=-3, dim2=-1).sum(-1) * scale  # [E,n,H,tiles,g,T]
    logits = logits.permute(0, 2, 4, 1, 3, 5).reshape(rows, kv_heads, g, -1)
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
