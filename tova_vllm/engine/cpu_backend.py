"""The TOVA attention backend for vLLM's CPU platform.

It subclasses vLLM's own CPU backend and keeps its attention kernel; the phase loop is
``phase_loop.TovaImplMixin`` (shared with the CUDA backend) and eviction is
``cpu_evictor.CpuEvictor`` over vLLM's CPU pages.  Layers that TOVA does not manage (and
every layer when TOVA is off) go through the stock code.
"""

from __future__ import annotations

from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from .cpu_evictor import CpuEvictor
from .layer_setup import customize_tova_spec
from .phase_loop import TovaImplMixin
from .phased_builder import TovaPhasedBuilder


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
    batches_layers = True
    # vLLM 0.32's CPU build (cpu_attn.py:199-283) reads only its inputs: the kernel's work
    # split comes from seq_lens and query_start_loc, the rest are the inputs themselves.
    stock_metadata_is_pure = True


class TovaCPUImpl(TovaImplMixin, CPUAttentionBackendImpl):
    def _tova_unsupported(self):
        return (
            ("ALiBi", self.alibi_slopes is not None),
            ("attention sinks", self.sinks is not None),
            ("logit soft-capping", bool(self.logits_soft_cap)),
            ("sliding-window attention", self.sliding_window != -1),
            ("a quantized KV cache", self.is_fp8_kv_cache),
            # Each layer evicts its own cache by its own scores; a layer reading another
            # layer's cache would evict it a second time.
            ("a KV cache shared between layers", self.kv_sharing_target_layer_name is not None),
        )

    def _attend_and_score(self, q, cache, phase, out, batch, side) -> bool:
        if batch.attention_inputs is None:
            # What vLLM's kernel reads: each row's blocks up to the longest row (the
            # runner's table is as wide as the model's context).
            attention = phase.attention
            rows, block_size = q.shape[0], self._evictor.block_size(cache)
            blocks = -(-attention.max_seq_len // block_size)
            batch.attention_inputs = (attention.block_table[:rows, :blocks].contiguous(),
                                      attention.seq_lens[:rows])
        return self._evictor.attend_and_score(q, cache, *batch.attention_inputs, out, batch,
                                              side)

    def _make_evictor(self, layer, kv_cache) -> CpuEvictor:
        return CpuEvictor(layer.isa, self.head_size, self._tp.total_q_heads, self.scale,
                          self._all_reduce())

    def _evictor_cache(self, kv_cache):
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        return kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)

    def _write_kv(self, layer, key, value, kv_cache, slots) -> None:
        key_cache, value_cache = self._evictor_cache(kv_cache).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, slots, layer.isa,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
