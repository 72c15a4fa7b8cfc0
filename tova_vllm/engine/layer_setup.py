"""What every TOVA attention backend does when vLLM builds its layers, on any platform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from ..config import settings_from_additional_config
from . import handoff
from .spec import TovaSpec


class UnsupportedLayerError(RuntimeError):
    pass


@dataclass(frozen=True)
class TensorParallel:
    """A layer's tensor-parallel facts that eviction needs: each rank holds
    ``num_heads`` of the layer's ``total_q_heads`` query heads, and TOVA's head mean is
    over all of them (summed across ranks by ``all_reduce``)."""

    size: int
    group: Any  # vLLM's tensor-parallel GroupCoordinator; None when size == 1
    total_q_heads: int

    @property
    def all_reduce(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        return None if self.group is None else self.group.all_reduce


def customize_tova_spec(spec):
    """The layer's KV spec as a ``TovaSpec`` carrying the budget, when TOVA is on."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    settings = handoff.worker_settings.read()
    if settings is None:
        return spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise UnsupportedLayerError(
            f"tova-vllm: TOVA supports full causal decoder attention only; this model has "
            f"a layer with KV spec {type(spec).__name__} (sliding window "
            f"{getattr(spec, 'sliding_window', None)}, chunk "
            f"{getattr(spec, 'attention_chunk_size', None)})"
        )
    return TovaSpec.from_full_attention(spec, settings.cache_size, settings.eviction_chunk,
                                        copy_on_write=handoff.worker_settings.copy_on_write)


def setup_tova_impl(impl, unsupported: Iterable[tuple[str, bool]]) -> Optional[TensorParallel]:
    """Publish the settings for a freshly built attention impl and return the
    tensor-parallel facts eviction needs; None when TOVA does not manage this layer.
    ``unsupported``: (feature, present) pairs that refuse the layer."""
    from vllm.config import get_current_vllm_config
    from vllm.v1.attention.backend import AttentionType

    vllm_config = get_current_vllm_config()
    settings = settings_from_additional_config(vllm_config.additional_config)
    # Every impl of a TOVA backend publishes, so that customize_spec can tell "TOVA off"
    # from "asked too early" (handoff.WorkerSettings).
    handoff.worker_settings.publish(
        settings, copy_on_write=bool(vllm_config.cache_config.enable_prefix_caching))
    if settings is None or impl.attn_type != AttentionType.DECODER:
        return None
    for what, present in unsupported:
        if present:
            raise UnsupportedLayerError(f"tova-vllm: TOVA does not support layers with {what}")
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    from .._patches import TOVA_WORKER, apply_patches

    apply_patches(TOVA_WORKER)
    size = get_tensor_model_parallel_world_size()
    return TensorParallel(size=size, group=get_tp_group() if size > 1 else None,
                          total_q_heads=impl.num_heads * size)
