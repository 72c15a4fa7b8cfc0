"""The TOVA attention backend for vLLM's CUDA platform (FlashAttention).  EXPERIMENTAL.

Same design as the CPU backend (``cpu_backend.py``): a subclass of vLLM's FlashAttention
backend that keeps its kernel, runs the shared phase loop (``phase_loop.py``) over the step
plan (``phased_builder.py``), and evicts on the GPU after each phase with
``paged_eviction.PagedEvictor`` (Triton kernels: one-pass scoring from the attention
kernel's log-sum-exp, fused argmin + move for decode).

Host waits: the builder plans from the runner's host copies (seq_lens, block table; see
``step_context.host_block_table``) and sends the plan through pinned memory
(``device_copy.py``), and eviction uses fixed-shape move lists (``paged_eviction.py``), so
no step makes the host wait for the GPU, whatever the policies and phases.

Where the log-sum-exp comes from: for phases that evict, and with FlashAttention 2/3 and a
plain configuration (no DCP, no sliding window, no soft-cap, no quantized cache: all
refused with TOVA anyway), the phase's attention is the same ``flash_attn_varlen_func`` call
vLLM makes, asked for ``return_softmax_lse=True``; the LSE of each evicting row's last query
goes to the scoring kernel.  Otherwise vLLM's own ``forward`` runs and the scoring kernel
computes the softmax itself (a second pass over the keys).

Enabled only with ``TOVA_VLLM_EXPERIMENTAL_CUDA=1`` (``config_check.py``); what has run
where (and what has not) is in the README's set-up section.
"""

from __future__ import annotations

from typing import Optional

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends import flash_attn as vllm_fa
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
from vllm.v1.kv_cache_interface import AttentionSpec

from .layer_setup import customize_tova_spec
from .paged_eviction import PagedEvictor, split_flash_kv_cache
from .phase_loop import TovaImplMixin
from .phased_builder import TovaPhasedBuilder, TovaPhaseMetadata


class TovaFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type["TovaFlashAttentionImpl"]:
        return TovaFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["TovaFlashAttentionMetadataBuilder"]:
        return TovaFlashAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return customize_tova_spec(super().customize_spec(spec))


class TovaFlashAttentionMetadataBuilder(TovaPhasedBuilder, FlashAttentionMetadataBuilder):
    # A TOVA step is several kernel launches per phase with host-made plans: no full CUDA
    # graphs (vLLM falls back to piecewise graphs, where attention runs eagerly anyway).
    _cudagraph_support = AttentionCGSupport.NEVER
    # Metadata holds per-phase block tables; vLLM must not patch one in place.
    supports_update_block_table: bool = False


class TovaFlashAttentionImpl(TovaImplMixin, FlashAttentionImpl):
    def _tova_unsupported(self):
        return (
            ("ALiBi", self.alibi_slopes is not None),
            ("attention sinks", getattr(self, "sinks", None) is not None),
            ("logit soft-capping", bool(self.logits_soft_cap)),
            ("sliding-window attention", tuple(self.sliding_window) != (-1, -1)),
            ("a quantized KV cache", str(self.kv_cache_dtype).startswith("fp8")),
            ("decode context parallelism", getattr(self, "dcp_world_size", 1) > 1),
            ("a KV cache shared between layers", self.kv_sharing_target_layer_name is not None),
        )

    def _make_evictor(self, layer, kv_cache) -> PagedEvictor:
        return PagedEvictor(kv_cache.device, self._tp.total_q_heads, self.scale,
                            self._all_reduce())

    def _evictor_cache(self, kv_cache):
        return split_flash_kv_cache(kv_cache, self.head_size)

    def _write_kv(self, layer, key, value, kv_cache, slots) -> None:
        self.do_kv_cache_update(layer, key, value, kv_cache, slots)

    def _kernel_returns_lse(self, md) -> bool:
        """Whether the phase's attention can be one plain ``flash_attn_varlen_func`` call
        asked for the log-sum-exp: FA2/3, causal, none of the masks vLLM adds itself."""
        return (
            self.vllm_flash_attn_version in (2, 3)
            and md.causal is True
            and getattr(md, "rswa_prefix_lens", None) is None
            and getattr(md, "mm_prefix_query_range_tensor", None) is None
        )

    def _attend(self, layer, q, k, v, kv_cache, phase: TovaPhaseMetadata,
                out) -> Optional[torch.Tensor]:
        """Attention of one phase into ``out``; the per-token log-sum-exp ``[q_heads,
        tokens]`` when the phase evicts and the kernel can return it, else None."""
        md = phase.attention
        if phase.evictions is None or not self._kernel_returns_lse(md):
            return super()._attend(layer, q, k, v, kv_cache, phase, out)
        # As vLLM's forward: FA3's TMA needs canonical strides on size-1 dims (one KV head).
        key_cache, value_cache = (canonicalize_singleton_dim_strides(c) for c in
                                  split_flash_kv_cache(kv_cache, self.head_size))
        _, lse = vllm_fa.flash_attn_varlen_func(
            q=q, k=key_cache, v=value_cache, out=out,
            cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
            seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len,
            softmax_scale=self.scale, causal=True, block_table=md.block_table,
            scheduler_metadata=md.scheduler_metadata, fa_version=self.vllm_flash_attn_version,
            num_splits=md.max_num_splits, return_softmax_lse=True,
        )
        return lse
