"""How TOVA selects its CUDA backend at start-up, with the platform mocked (no GPU here):
refused without the experimental opt-in, routed to the CUSTOM FlashAttention subclass with
it, and refused next to another attention backend or the V2 model runner."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tova_vllm.engine import config_check


@pytest.fixture
def cuda(monkeypatch):
    from vllm.platforms import current_platform

    import tova_vllm

    tova_vllm.register()
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.delenv(config_check.EXPERIMENTAL_CUDA_ENV, raising=False)


def _config(backend=None, use_ubatching=False):
    return SimpleNamespace(
        speculative_config=None, kv_transfer_config=None,
        cache_config=SimpleNamespace(kv_offloading_size=None, cache_dtype="auto"),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1,
                                        prefill_context_parallel_size=1,
                                        use_ubatching=use_ubatching),
        attention_config=SimpleNamespace(backend=backend),
    )


def test_cuda_needs_the_experimental_opt_in(cuda):
    with pytest.raises(NotImplementedError, match=config_check.EXPERIMENTAL_CUDA_ENV):
        config_check._check_features(_config())


def test_cuda_routes_attention_to_the_tova_flash_backend(cuda, monkeypatch):
    import os

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from tova_vllm import CUDA_BACKEND

    monkeypatch.setenv(config_check.EXPERIMENTAL_CUDA_ENV, "1")
    for chosen in (None, AttentionBackendEnum.FLASH_ATTN):
        config = _config(chosen)
        config_check._check_features(config)
        assert config.attention_config.backend is AttentionBackendEnum.CUSTOM
        assert AttentionBackendEnum.CUSTOM.get_path() == CUDA_BACKEND
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    with pytest.raises(config_check.IncompatibleWithTova, match="FLASHINFER"):
        config_check._check_features(_config(AttentionBackendEnum.FLASHINFER))
    with pytest.raises(config_check.IncompatibleWithTova, match="micro-batching"):
        config_check._check_features(_config(use_ubatching=True))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(config_check.IncompatibleWithTova, match="V2_MODEL_RUNNER"):
        config_check._check_features(_config())


def test_cuda_backend_classes_keep_vllm_flash_attention():
    """The module imports without CUDA and subclasses vLLM's own backend pieces."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends import flash_attn

    from tova_vllm.engine import cuda_backend as cb

    backend = cb.TovaFlashAttentionBackend
    assert issubclass(backend, flash_attn.FlashAttentionBackend)
    assert issubclass(backend.get_impl_cls(), flash_attn.FlashAttentionImpl)
    builder = backend.get_builder_cls()
    assert issubclass(builder, flash_attn.FlashAttentionMetadataBuilder)
    assert builder._cudagraph_support is AttentionCGSupport.NEVER
    assert builder.supports_update_block_table is False
