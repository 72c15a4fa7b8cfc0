"""What every TOVA attention backend does when vLLM builds its layers, on any platform."""

from __future__ import annotations

from typing import Iterable, Optional

from ..config import TovaSettings, settings_from_additional_config
from .spec import TovaSpec

# Set when this worker builds its first decoder layer: vLLM asks ``customize_spec`` for the
# layers' KV specs at a point where no current config is set, so it reads this instead.
_worker_settings: Optional[TovaSettings] = None


class UnsupportedLayerError(RuntimeError):
    pass


def customize_tova_spec(spec):
    """The layer's KV spec as a ``TovaSpec`` carrying the budget, when TOVA is on."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

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


def setup_tova_impl(impl, unsupported: Iterable[tuple[str, bool]]) -> Optional[TovaSettings]:
    """Read the settings for a freshly built attention impl and give it the tensor-parallel
    facts eviction needs (``tp_group``, ``total_q_heads``).  Returns None when TOVA does not
    manage this layer.  ``unsupported``: (feature, present) pairs that refuse the layer."""
    global _worker_settings
    from vllm.config import get_current_vllm_config
    from vllm.v1.attention.backend import AttentionType

    settings = settings_from_additional_config(get_current_vllm_config().additional_config)
    if impl.attn_type != AttentionType.DECODER:
        return None
    # Every engine built in this process resets it: no budget leaks into the next.
    _worker_settings = settings
    if settings is None:
        return None
    for what, present in unsupported:
        if present:
            raise UnsupportedLayerError(f"tova-vllm: TOVA does not support layers with {what}")
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    from .._patches import TOVA_WORKER, apply_patches

    apply_patches(TOVA_WORKER)
    impl.tp_size = get_tensor_model_parallel_world_size()
    impl.tp_group = get_tp_group() if impl.tp_size > 1 else None
    impl.total_q_heads = impl.num_heads * impl.tp_size
    return settings
