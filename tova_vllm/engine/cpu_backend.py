"""The TOVA attention backend for vLLM's CPU platform.

It subclasses vLLM's own CPU backend and keeps its attention kernel: for each phase of the
step plan (``plan.py``) it writes the new K/V at their cache positions with vLLM's write op,
runs vLLM's kernel over the live cache positions, then scores and compacts.  Layers that
TOVA does not manage (and every layer when TOVA is off) go through the stock code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from ..config import TovaSettings, settings_from_additional_config
from ..policies import (
    compaction_moves,
    head_summed_probs_from_logits,
    slot_to_drop,
    slots_to_keep,
    tova_scores,
)
from .cpu_layout import copy_positions, last_query_logits, probe_page_layout
from .plan import EvictionBatch, RequestStep, plan_step
from .spec import TovaSpec
from .step_context import batch_rows

# Set when this worker builds its first TOVA layer: vLLM asks ``customize_spec`` for the
# layers' KV specs at a point where no current config is set, so it reads this instead.
_worker_settings: Optional[TovaSettings] = None


class UnsupportedLayerError(RuntimeError):
    pass


@dataclass
class TovaPhaseMetadata:
    kernel: CPUAttentionMetadata  # vLLM's own metadata for this phase's tokens
    token_index: Optional[torch.Tensor]
    slots: torch.Tensor
    evictions: Optional[EvictionBatch]


@dataclass
class TovaCPUMetadata:
    phases: list[TovaPhaseMetadata]
    num_actual_tokens: int


class TovaCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type["TovaCPUImpl"]:
        return TovaCPUImpl

    @staticmethod
    def get_builder_cls() -> type["TovaCPUMetadataBuilder"]:
        return TovaCPUMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        spec = super().customize_spec(spec)
        if _worker_settings is None:
            return spec
        if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
            raise UnsupportedLayerError(
                f"tova-vllm: TOVA supports full causal decoder attention only; this model has "
                f"a layer with KV spec {type(spec).__name__} (sliding window "
                f"{getattr(spec, 'sliding_window', None)}, chunk "
                f"{getattr(spec, 'attention_chunk_size', None)})"
            )
        return TovaSpec.from_full_attention(
            spec, _worker_settings.cache_size, _worker_settings.eviction_chunk
        )


class TovaCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tova_spec = kv_cache_spec if isinstance(kv_cache_spec, TovaSpec) else None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        if self.tova_spec is None:
            return super().build(common_prefix_len, cm, fast_build)
        seq_lens = cm.seq_lens[:num_reqs].tolist()
        prompt_lens, budgets = batch_rows(num_reqs, self.tova_spec.tova_cache_size)
        if all(n <= c for n, c in zip(seq_lens, budgets)):
            # Nothing has been or will be evicted this step: cache positions are logical
            # positions, and vLLM's own metadata and KV write are exactly right.
            return super().build(common_prefix_len, cm, fast_build)
        query_start = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        requests = []
        for row in range(num_reqs):
            num_new = query_start[row + 1] - query_start[row]
            requests.append(
                RequestStep(
                    num_computed=seq_lens[row] - num_new,
                    num_new=num_new,
                    prompt_len=prompt_lens[row],
                    cache_size=budgets[row],
                    prompt_chunk=self.tova_spec.prompt_chunk,
                )
            )
        block_table = cm.block_table_tensor[:num_reqs]
        plan = plan_step(requests, block_table, self.block_size)
        # vLLM's own KV write (before attention, same slot tensor, updated in place) stores
        # the first phase; later phases are written in forward(), after their eviction.
        vllm_slots = cm.slot_mapping[: cm.num_actual_tokens]
        if plan[0].token_index is None:
            vllm_slots.copy_(plan[0].slots)
        else:
            vllm_slots.fill_(-1)  # negative slots are skipped by the write op
            vllm_slots[plan[0].token_index] = plan[0].slots
        phases = []
        for phase in plan:
            max_seq_len = int(phase.cache_lens.max())
            if phase.token_index is None:
                phase_cm = cm.replace(seq_lens=phase.cache_lens, max_seq_len=max_seq_len,
                                      slot_mapping=phase.slots)
            else:
                rows = torch.tensor(phase.rows, dtype=torch.long)
                phase_cm = cm.replace(
                    query_start_loc=phase.query_start_loc,
                    query_start_loc_cpu=phase.query_start_loc,
                    seq_lens=phase.cache_lens,
                    num_reqs=len(phase.rows),
                    num_actual_tokens=int(phase.slots.numel()),
                    max_query_len=phase.max_query_len,
                    max_seq_len=max_seq_len,
                    block_table_tensor=block_table[rows],
                    slot_mapping=phase.slots,
                    is_prefilling=None,
                    positions=None,
                )
            kernel = super().build(common_prefix_len, phase_cm, fast_build)
            phases.append(TovaPhaseMetadata(kernel, phase.token_index, phase.slots, phase.evictions))
        return TovaCPUMetadata(phases=phases, num_actual_tokens=cm.num_actual_tokens)


class TovaCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        global _worker_settings
        settings = settings_from_additional_config(get_current_vllm_config().additional_config)
        self.tova = settings if self.attn_type == AttentionType.DECODER else None
        if self.attn_type == AttentionType.DECODER:
            # Every engine built in this process resets it: no budget leaks into the next.
            _worker_settings = settings
        if self.tova is None:
            return
        for what, unsupported in (
            ("ALiBi", self.alibi_slopes is not None),
            ("attention sinks", self.sinks is not None),
            ("logit soft-capping", bool(self.logits_soft_cap)),
            ("sliding-window attention", self.sliding_window != -1),
            ("a quantized KV cache", self.is_fp8_kv_cache),
        ):
            if unsupported:
                raise UnsupportedLayerError(f"tova-vllm: TOVA does not support layers with {what}")
        from .._patches import apply_patch

        apply_patch("runner_publishes_batch")
        from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_group = get_tp_group() if self.tp_size > 1 else None
        self.total_q_heads = self.num_heads * self.tp_size

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not isinstance(attn_metadata, TovaCPUMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
        key_cache, value_cache = pages.chunk(2, dim=2)
        num_tokens = attn_metadata.num_actual_tokens
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
            super().forward(layer, q, k, v, kv_cache, phase.kernel, out)
            if phase.token_index is not None:
                output[phase.token_index] = out
            if phase.evictions is not None:
                self._evict(layer.isa, query, pages, phase.evictions)
        return output

    def _evict(self, isa: str, query: torch.Tensor, pages: torch.Tensor, ev: EvictionBatch) -> None:
        block_size = pages.shape[2] // 2
        layout = probe_page_layout(isa, pages.dtype, block_size, self.head_size)
        logits = last_query_logits(pages, layout, ev.block_ids, ev.block_offsets,
                                   query[ev.query_index], self.scale)
        head_sum = head_summed_probs_from_logits(logits, ev.live)
        if self.tp_group is not None:
            head_sum = self.tp_group.all_reduce(head_sum)
        scores = tova_scores(head_sum, self.total_q_heads)

        if ev.one_drop_each:
            rows = torch.arange(len(ev.keep_list))
            src, dst = ev.keep, slot_to_drop(scores, ev.live)
        else:
            rows_l, src_l, dst_l = [], [], []
            for e, (live, keep) in enumerate(zip(ev.live_list, ev.keep_list)):
                src_e, dst_e = compaction_moves(slots_to_keep(scores[e, :live], keep), keep)
                rows_l.append(torch.full_like(src_e, e))
                src_l.append(src_e)
                dst_l.append(dst_e)
            rows, src, dst = torch.cat(rows_l), torch.cat(src_l), torch.cat(dst_l)
        copy_positions(pages, layout, ev.block_ids[rows, src], ev.block_offsets[rows, src],
                       ev.block_ids[rows, dst], ev.block_offsets[rows, dst])
