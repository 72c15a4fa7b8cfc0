"""vLLM's FlashAttention backend on CPU tensors, so TOVA's CUDA backend runs inside a
real vLLM engine here (vLLM's CUDA build cannot be installed on these machines).

``with flash_attention_on_cpu():`` replaces the two compiled ops vLLM's FlashAttention
backend calls, ``flash_attn_varlen_func`` (paged, varlen, causal, optionally returning the
softmax log-sum-exp) and ``reshape_and_cache_flash`` (KV write by slot), with plain-torch
versions of their documented contracts, reports FlashAttention version 2, and makes the CPU
platform's attention choice resolve to ``tova_vllm.engine.cuda_backend``.  Everything else is
vLLM's own FlashAttention code (builder, metadata, impl, KV layout) and TOVA's CUDA backend,
which runs its eviction with the torch kernels (``kernels.select_backend`` on CPU) or, with
``kernels="triton"``, the Triton kernels under the interpreter.

The stand-ins refuse every FlashAttention feature they do not implement (windows, soft-cap,
ALiBi, sinks, mask mods, non-unit descales), so a call that needs one fails loudly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                            k_scale, v_scale) -> None:
    """Write token i's K/V at cache slot ``slot_mapping[i]`` (skipped when negative); the
    number of tokens is ``slot_mapping``'s length, as in vLLM's op."""
    assert kv_cache_dtype == "auto", kv_cache_dtype
    num_tokens = slot_mapping.shape[0]
    slots = slot_mapping.long()
    written = slots >= 0
    block_size = key_cache.shape[1]
    blocks, offsets = slots[written] // block_size, slots[written] % block_size
    key_cache[blocks, offsets] = key[:num_tokens][written]
    value_cache[blocks, offsets] = value[:num_tokens][written]


def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, *,
                           seqused_k, block_table, softmax_scale, causal, out=None,
                           return_softmax_lse=False, window_size=None, softcap=0.0,
                           alibi_slopes=None, s_aux=None, dynamic_causal=None, mask_mod=None,
                           aux_tensors=None, q_descale=None, k_descale=None, v_descale=None,
                           fa_version=2, scheduler_metadata=None, num_splits=0,
                           cu_seqlens_k=None):
    """Paged varlen attention: request r's queries ``q[cu_seqlens_q[r]:cu_seqlens_q[r+1]]``
    attend to the first ``seqused_k[r]`` positions of its block table, causally aligned to
    the end (the last query sees every key).  ``k``/``v``: ``[num_blocks, block_size,
    kv_heads, D]``; query head h reads kv head ``h // (q_heads // kv_heads)``.  Returns
    ``out`` or ``(out, lse)`` with ``lse`` ``[q_heads, tokens]`` fp32 (natural log; the
    layout vLLM's own DCP path reads: ``context_lse.transpose(0, 1)`` before combining)."""
    assert cu_seqlens_k is None and block_table is not None and seqused_k is not None
    assert window_size in (None, [-1, -1], (-1, -1)), window_size
    assert not softcap and alibi_slopes is None and s_aux is None
    assert dynamic_causal is None and mask_mod is None and aux_tensors is None
    assert scheduler_metadata is None and fa_version == 2
    for descale in (q_descale, k_descale, v_descale):
        assert descale is None or bool((descale == 1).all())
    starts = cu_seqlens_q.tolist()
    lengths = seqused_k.tolist()
    assert max(b - a for a, b in zip(starts, starts[1:])) <= max_seqlen_q
    assert max(lengths) <= max_seqlen_k
    if out is None:
        out = torch.empty_like(q)
    q_heads, kv_heads, block_size = q.shape[1], k.shape[2], k.shape[1]
    group = q_heads // kv_heads
    lse = torch.full((q_heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for r, seq_len in enumerate(lengths):
        first, last = starts[r], starts[r + 1]
        num_q = last - first
        if num_q == 0:
            continue
        positions = torch.arange(seq_len, device=q.device)
        blocks = block_table[r, positions // block_size].long()
        offsets = positions % block_size
        keys = k[blocks, offsets].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = v[blocks, offsets].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,shd->hqs", q[first:last].float(), keys) * softmax_scale
        if causal:
            visible_to = seq_len - num_q + torch.arange(num_q, device=q.device)  # last key
            hidden = positions[None, :] > visible_to[:, None]
            logits = logits.masked_fill(hidden[None], float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)  # [Hq, num_q]
        probs = torch.exp(logits - row_lse[..., None])
        out[first:last] = torch.einsum("hqs,shd->qhd", probs, values).to(out.dtype)
        lse[:, first:last] = row_lse
    return (out, lse) if return_softmax_lse else out


@contextmanager
def flash_attention_on_cpu(kernels: Optional[str] = None):
    """While open, the CPU platform's attention resolves to TOVA's CUDA backend over the
    stand-ins above.  ``kernels``: force "torch" or "triton" eviction kernels."""
    import pytest
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import flash_attn as vllm_fa
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, _ATTN_OVERRIDES

    import tova_vllm
    from tova_vllm.engine import paged_eviction

    tova_vllm.register()  # first: register() maps CPU_ATTN to the CPU backend itself
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_fa, "get_flash_attn_version", lambda *a, **k: 2)
        patch.setattr(vllm_fa, "flash_attn_varlen_func", flash_attn_varlen_func, raising=False)
        patch.setattr(vllm_fa, "reshape_and_cache_flash", reshape_and_cache_flash,
                      raising=False)
        patch.setitem(_ATTN_OVERRIDES, AttentionBackendEnum.CPU_ATTN, tova_vllm.CUDA_BACKEND)
        if kernels is not None:
            original = paged_eviction.PagedEvictor.__init__

            def with_kernels(self, *args, **kwargs):
                kwargs["backend"] = kernels
                original(self, *args, **kwargs)

            patch.setattr(paged_eviction.PagedEvictor, "__init__", with_kernels)
        selector._cached_get_attn_backend.cache_clear()  # it memoizes the chosen class
        try:
            yield
        finally:
            selector._cached_get_attn_backend.cache_clear()
