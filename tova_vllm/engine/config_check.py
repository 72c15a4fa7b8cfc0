"""Start-up checks for an engine with TOVA enabled, run where the user builds the config.

Rejects what TOVA's cache-position layout cannot serve, with one message naming the
feature.  Prefix caching stays as the user set it: with it on, TOVA evicts copy-on-write
(``engine/spec.py``), so blocks written before a request's first eviction are shared as in
vanilla vLLM.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

from ..config import settings_from_additional_config

# Under vLLM's logger tree so vLLM's handler and level apply.
logger = logging.getLogger("vllm.tova_vllm")

EXPERIMENTAL_CUDA_ENV = "TOVA_VLLM_EXPERIMENTAL_CUDA"


class IncompatibleWithTova(Exception):
    """Not a ValueError, so pydantic's VllmConfig validation does not re-wrap it."""


def _reject(what: str, setting: str) -> None:
    raise IncompatibleWithTova(
        f"tova-vllm: {what} cannot be used with TOVA KV eviction "
        f'(additional_config["tova"]); unset {setting}, or remove additional_config["tova"]'
    )


def adjust_and_validate(vllm_config, before_post_init: bool) -> None:
    settings = settings_from_additional_config(vllm_config.additional_config)
    if settings is None:
        return
    if before_post_init:
        from .._patches import TOVA_CONFIG, apply_patches

        # Requests enter in this process: check per-request budgets here.
        apply_patches(TOVA_CONFIG)
        _check_model(vllm_config)
        _check_features(vllm_config)
        # Engine processes re-run this check on the config they were sent; the user reads
        # the line of the process that built the config.
        if multiprocessing.parent_process() is None:
            logger.info("%s", startup_line(
                settings, bool(vllm_config.cache_config.enable_prefix_caching),
                _cpu_scoring()))


def _cpu_scoring() -> str:
    """How this machine's CPU scorer reads K (building the C reader now, once, so a
    missing compiler shows at start-up rather than at the first eviction)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return ""
    from .native import library

    lib = library()
    return (f"K read in place by {lib._name} ({lib.tova_vector_floats()}-float vectors)"
            if lib is not None else
            "K copied by torch (slower: no C reader, see the warning above)")


def startup_line(settings, prefix_caching: bool, cpu_scoring: str = "") -> str:
    """Everything TOVA changes, in one log line (the budget, the policy, what is off)."""
    mode = settings.prompt_mode + (f" (prompt_chunk={settings.prompt_chunk}: peak C + "
                                   f"{settings.prompt_chunk} per request)"
                                   if settings.prompt_mode == "chunked" else
                                   " (a prompt is held whole until its last token)")
    policy = settings.policy + {
        "sink_window": f" (sinks={settings.sinks})",
        "h2o": f" (recent={settings.recent})" if settings.recent is not None else "",
    }.get(settings.policy, "")
    return (
        f"tova-vllm: TOVA enabled: cache_size={settings.cache_size} tokens per request and "
        f"layer (decoding requests hold ceil((cache_size + 1) / block_size) KV blocks), "
        f"policy={policy}, prompt_mode={mode}; prefix caching "
        + ("on (copy-on-write: blocks written before a request's first eviction are shared "
           "and cached as usual; that eviction gathers the survivors into private blocks)"
           if prefix_caching else "off")
        + (f"; CPU scoring: {cpu_scoring}" if cpu_scoring else "")
        + '. Per request: vllm_xargs / extra_args "tova_cache_size" (<= cache_size), '
        '"tova_policy"'
    )


def _check_features(vllm_config) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        _select_cuda_backend(vllm_config)
    elif not current_platform.is_cpu():
        raise NotImplementedError(
            "tova-vllm: TOVA runs on vLLM's CPU platform, and experimentally on CUDA; "
            f"not on {current_platform.device_name}"
        )
    if vllm_config.speculative_config is not None:
        _reject("speculative decoding (its draft tokens would enter the eviction)",
                "--speculative-config")
    if vllm_config.kv_transfer_config is not None:
        _reject("a KV connector (it assumes token position == cache position)",
                "--kv-transfer-config")
    cache = vllm_config.cache_config
    if cache.kv_offloading_size:
        _reject("KV offloading (it assumes token position == cache position)",
                "--kv-offloading-size")
    if cache.cache_dtype not in ("auto", None) and not str(cache.cache_dtype).startswith("auto"):
        _reject(f"kv_cache_dtype={cache.cache_dtype!r} (scores are computed from an unquantized cache)",
                "--kv-cache-dtype (use auto)")
    parallel = vllm_config.parallel_config
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or getattr(
        parallel, "prefill_context_parallel_size", 1
    ) > 1:
        _reject("context parallelism (each rank would score a shard of the tokens)",
                "--decode-context-parallel-size / --prefill-context-parallel-size")
    if getattr(parallel, "use_ubatching", False):
        _reject("micro-batching (enable_dbo / ubatch_size: each micro-batch's metadata is "
                "built for a slice of the batch, which TOVA's planner reads whole)",
                "--enable-dbo / --ubatch-size")


def _check_model(vllm_config) -> None:
    model = vllm_config.model_config
    if model is None:
        return
    text = model.hf_text_config
    layer_kind = None
    if model.use_mla:
        layer_kind = "multi-head latent attention (MLA)"
    elif model.is_encoder_decoder:
        layer_kind = "encoder-decoder cross-attention"
    elif model.is_hybrid or model.is_attention_free:
        layer_kind = "hybrid or attention-free (Mamba/linear) layers"
    elif model.get_sliding_window() is not None or "sliding_attention" in (
        getattr(text, "layer_types", None) or ()
    ):
        layer_kind = "sliding-window attention"
    elif getattr(text, "attention_chunk_size", None):
        layer_kind = "chunked local attention"
    elif model.uses_alibi:
        layer_kind = "ALiBi attention"
    if layer_kind is not None:
        raise IncompatibleWithTova(
            f"tova-vllm: model {model.model!r} has {layer_kind}; TOVA supports decoder-only "
            "models whose layers all use full causal attention; serve another --model, or "
            'remove additional_config["tova"]'
        )


def _select_cuda_backend(vllm_config) -> None:
    """Route attention to TOVA's FlashAttention subclass (registered as CUSTOM).

    Experimental: that backend has never run inside vLLM on a GPU (it runs in vLLM's
    engine on CPU over torch stand-ins for FlashAttention's ops, and its Triton kernels ran
    on a GPU stand-alone), so it needs an explicit opt-in.
    """
    if os.environ.get(EXPERIMENTAL_CUDA_ENV) != "1":
        raise NotImplementedError(
            "tova-vllm: the CUDA path of TOVA is experimental: its Triton kernels are "
            "tested on a GPU, but the attention backend has not been validated inside vLLM "
            f"on CUDA yet. Set {EXPERIMENTAL_CUDA_ENV}=1 to try it, or use the CPU build"
        )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    chosen = attention.backend
    if chosen not in (None, AttentionBackendEnum.FLASH_ATTN, AttentionBackendEnum.CUSTOM):
        _reject(f"attention backend {chosen.name} (TOVA's CUDA path is built on FLASH_ATTN)",
                "--attention-backend")
    from .. import CUDA_BACKEND

    if AttentionBackendEnum.CUSTOM.get_path() != CUDA_BACKEND:
        _reject(f"another plugin's CUSTOM attention backend "
                f"({AttentionBackendEnum.CUSTOM.get_path()})", "the other plugin (VLLM_PLUGINS)")
    attention.backend = AttentionBackendEnum.CUSTOM
    # Only the V1 model runner's metadata path is wired; engine processes read this at
    # start-up, after this check.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        _reject("VLLM_USE_V2_MODEL_RUNNER=1 (TOVA's CUDA path is wired for the V1 model runner)",
                "VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    logger.warning(
        "tova-vllm: EXPERIMENTAL CUDA path enabled (%s=1): FlashAttention backend with "
        "TOVA eviction, V1 model runner", EXPERIMENTAL_CUDA_ENV,
    )
