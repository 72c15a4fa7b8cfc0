"""The TOVA attention backend for vLLM's CPU platform.

It subclasses vLLM's own CPU backend and keeps its attention kernel: for each phase of the
step plan (``plan.py``) it writes the new K/V at their cache positions with vLLM's write op,
runs vLLM's kernel over the live cache positions, then scores and compacts.  Layers that
TOVA does not manage (and every layer when TOVA is off) go through the stock code.

Policies other than TOVA (``policies/eviction.py``) need per-slot side state that vLLM's
cache does not hold: each slot's logical position and, for H2O, its accumulated attention.
Each layer keeps them in two flat tensors indexed by global cache slot (block * block_size
+ offset), allocated on first use (8 bytes per slot, next to 2 * kv_heads * head_dim
elements of K/V), written with the K/V and moved by the same compaction.
"""

from __future__ import annotations

from typing import Optional

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from ..policies import (
    accumulated_from_logits,
    head_summed_probs_from_logits,
    prompt_eviction_moves,
    slot_to_drop,
    tova_scores,
)
from .cpu_layout import copy_positions, last_query_logits, many_query_logits, probe_page_layout
from .layer_setup import customize_tova_spec, setup_tova_impl
from .phased_builder import TovaPhasedBuilder, TovaStepMetadata
from .plan import EvictionBatch, QueryBatch
from .side_state import PolicyGroups, SlotSideState, policy_keep_scores

# H2O scores every query of a prompt chunk; bound the fp32 logits it materializes.
_ACCUMULATE_QUERY_BLOCK = 64


class TovaCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type["TovaCPUImpl"]:
        return TovaCPUImpl

    @staticmethod
    def get_builder_cls() -> type["TovaCPUMetadataBuilder"]:
        return TovaCPUMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return customize_tova_spec(super().customize_spec(spec))


class TovaCPUMetadataBuilder(TovaPhasedBuilder, CPUAttentionMetadataBuilder):
    pass


class TovaCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tova = setup_tova_impl(self, (
            ("ALiBi", self.alibi_slopes is not None),
            ("attention sinks", self.sinks is not None),
            ("logit soft-capping", bool(self.logits_soft_cap)),
            ("sliding-window attention", self.sliding_window != -1),
            ("a quantized KV cache", self.is_fp8_kv_cache),
        ))
        self.side: Optional[SlotSideState] = None  # see the module docstring

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not isinstance(attn_metadata, TovaStepMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
        key_cache, value_cache = pages.chunk(2, dim=2)
        num_tokens = attn_metadata.num_actual_tokens
        if attn_metadata.side_state:
            self.side = SlotSideState.sized(self.side, num_blocks * block_size, kv_cache.device)
        for i, phase in enumerate(attn_metadata.phases):
            if phase.token_index is None:
                q, k, v, out = query[:num_tokens], key[:num_tokens], value[:num_tokens], output
            else:
                idx = phase.token_index
                q, k, v = query[idx], key[idx], value[idx]
                out = torch.empty_like(output[: idx.numel()])
            if i > 0:  # vLLM's own cache update already wrote the first phase
                ops.cpu_attn_reshape_and_cache(
                    k, v, key_cache, value_cache, phase.slots, layer.isa,
                    k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                    kv_cache_dtype=self.kv_cache_dtype,
                )
            if attn_metadata.side_state:
                self.side.write(phase.slots, phase.positions)
            super().forward(layer, q, k, v, kv_cache, phase.kernel, out)
            if phase.token_index is not None:
                output[phase.token_index] = out
            if phase.accumulate is not None:
                self._accumulate(layer.isa, query, pages, phase.accumulate)
            if phase.evictions is not None:
                self._evict(layer.isa, query, pages, phase.evictions, phase.eviction_groups)
        return output

    def _head_mean(self, head_sum: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's query heads -> mean over all of the layer's query heads."""
        if self.tp_group is not None:
            head_sum = self.tp_group.all_reduce(head_sum)
        return tova_scores(head_sum, self.total_q_heads)

    def _accumulate(self, isa: str, query: torch.Tensor, pages: torch.Tensor,
                    batch: QueryBatch) -> None:
        """H2O: add every query's head-mean softmax weights to the slots it attends to."""
        block_size = pages.shape[2] // 2
        layout = probe_page_layout(isa, pages.dtype, block_size, self.head_size)
        block_ids, block_offsets = batch.slot_ids // block_size, batch.slot_ids % block_size
        total = None
        for first in range(0, batch.query_index.shape[1], _ACCUMULATE_QUERY_BLOCK):
            part = slice(first, first + _ACCUMULATE_QUERY_BLOCK)
            logits = many_query_logits(pages, layout, block_ids, block_offsets,
                                       query[batch.query_index[:, part]], self.scale)
            summed = accumulated_from_logits(logits, batch.visible[:, part])
            total = summed if total is None else total + summed
        increment = self._head_mean(total)
        self.side.add_attention(batch.slot_ids[batch.in_use], increment[batch.in_use])

    def _evict(self, isa: str, query: torch.Tensor, pages: torch.Tensor, ev: EvictionBatch,
               groups: Optional[PolicyGroups]) -> None:
        block_size = pages.shape[2] // 2
        layout = probe_page_layout(isa, pages.dtype, block_size, self.head_size)
        if groups is None:
            scores = self._last_query_probs(query, pages, layout, ev)
        else:
            slot_ids = ev.slot_ids(block_size)
            scores = policy_keep_scores(
                groups, slot_ids, ev.keep, ev.query_position, self.side,
                lambda rows: self._last_query_probs(query, pages, layout, ev, rows))

        if ev.one_drop_each:
            rows = torch.arange(len(ev.keep_list))
            src, dst = ev.keep, slot_to_drop(scores, ev.live)
        else:
            src, dst, rows = prompt_eviction_moves(scores, ev.live, ev.keep, max(ev.keep_list))
            moving = rows >= 0
            rows, src, dst = rows[moving], src[moving], dst[moving]
        copy_positions(pages, layout, ev.block_ids[rows, src], ev.block_offsets[rows, src],
                       ev.block_ids[rows, dst], ev.block_offsets[rows, dst])
        if groups is not None:
            self.side.move_rows(slot_ids, src, dst, rows)

    def _last_query_probs(self, query, pages, layout, ev: EvictionBatch,
                          rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """TOVA's score of the eviction rows ``rows`` (all by default): ``[E, S]`` fp32."""
        if rows is None:
            block_ids, block_offsets, qidx, live = (ev.block_ids, ev.block_offsets,
                                                    ev.query_index, ev.live)
        else:
            block_ids, block_offsets = ev.block_ids[rows], ev.block_offsets[rows]
            qidx, live = ev.query_index[rows], ev.live[rows]
        logits = last_query_logits(pages, layout, block_ids, block_offsets, query[qidx],
                                   self.scale)
        return self._head_mean(head_summed_probs_from_logits(logits, live))
