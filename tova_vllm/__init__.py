"""tova-vllm: TOVA (Token Omission Via Attention) KV-cache eviction as a vLLM plugin.

Enable with ``LLM(..., additional_config={"tova": {"cache_size": 512}})`` or
``vllm serve MODEL --additional-config '{"tova": {"cache_size": 512}}'``.
Without that key the plugin changes nothing.
"""

__version__ = "0.1.0"

_registered = False
CUDA_BACKEND = "tova_vllm.engine.cuda_backend.TovaFlashAttentionBackend"


def register() -> None:
    """The ``vllm.general_plugins`` entry point; vLLM calls it in every process it starts.

    Cheap and idempotent: it registers the backend by import path (loaded only when a
    layer is built), the KV-cache spec, and the config check.  Nothing here reads settings:
    no config exists yet in any process when vLLM loads plugins.
    """
    global _registered
    if _registered:
        return
    from . import _patches

    _patches.apply_patches(_patches.ALWAYS)
    try:
        _patches.check_vllm_version()
    except _patches.UnsupportedVllmVersion:
        # Stay inert; enabling TOVA then fails in the config check with this message.
        _registered = True
        return

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from .engine.spec import TovaManager, TovaSpec

    register_backend(AttentionBackendEnum.CPU_ATTN, "tova_vllm.engine.cpu_backend.TovaCPUBackend")
    # CUDA: selected only when TOVA is enabled (the config check sets the CUSTOM backend);
    # never over another plugin's CUSTOM backend (the config check then refuses TOVA).
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES

    if AttentionBackendEnum.CUSTOM not in _ATTN_OVERRIDES:
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)
    # Without this, registering first leaves the built-in specs without managers here.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(TovaSpec, TovaManager, uniform_type_base_spec=FullAttentionSpec)
    _patches.apply_patches(_patches.PLUGIN_LOAD)
    _registered = True
