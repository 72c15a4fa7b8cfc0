"""Steady-decode eviction cases on vLLM's CPU pages, shared by the evictor tests
(``test_layer_batch.py``, ``test_native.py``)."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from tova_vllm.engine.cpu_evictor import CpuEvictor
from tova_vllm.engine.plan import EvictionBatch


def layer_caches(num_layers, num_blocks, kv_heads, block_size, head_size, dtype, isa, gen):
    """Caches filled through vLLM's own write op (so in the ISA's real layout)."""
    caches = []
    for _ in range(num_layers):
        pages = torch.zeros(num_blocks, kv_heads, 2 * block_size, head_size, dtype=dtype)
        key_cache, value_cache = pages.chunk(2, dim=2)
        n = num_blocks * block_size
        ops.cpu_attn_reshape_and_cache(
            torch.randn(n, kv_heads, head_size, generator=gen).to(dtype),
            torch.randn(n, kv_heads, head_size, generator=gen).to(dtype),
            key_cache, value_cache, torch.arange(n), isa, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")
        caches.append(pages)
    return caches


def decode_batch(budgets, block_size, num_blocks, gen) -> EvictionBatch:
    """Steady decode: row e holds budgets[e] + 1 live positions on a shuffled block table."""
    rows = len(budgets)
    live = [c + 1 for c in budgets]
    width = max(live)
    per_row = -(-width // block_size)
    table = torch.randperm(num_blocks, generator=gen)[: rows * per_row].view(rows, per_row)
    positions = torch.arange(width)
    padded = torch.where(positions < torch.tensor(live).unsqueeze(1), positions, 0)
    return EvictionBatch(
        rows=torch.arange(rows), query_index=torch.arange(rows),
        query_position=torch.tensor(budgets) + 100,
        block_ids=table.gather(1, padded // block_size), block_offsets=padded % block_size,
        live=torch.tensor(live), keep=torch.tensor(budgets), keep_list=list(budgets),
        live_list=live, one_drop_each=True,
    ).prepared(block_size, torch.device("cpu"))


def decode_case(dtype, block_size, head_size, q_heads, kv_heads, num_layers, budgets, gen,
                query_scale=1.0):
    """(evictor, caches, queries, batch) of one steady-decode step over ``num_layers``
    layers; ``query_scale`` > 1 peaks the attention so the dropped token is clear of
    near-ties."""
    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    num_blocks = len(budgets) * (-(-(max(budgets) + 1) // block_size)) + 3
    ev = decode_batch(budgets, block_size, num_blocks, gen)
    caches = layer_caches(num_layers, num_blocks, kv_heads, block_size, head_size, dtype,
                          isa, gen)
    queries = [(query_scale * torch.randn(len(budgets), q_heads, head_size, generator=gen))
               .to(dtype) for _ in range(num_layers)]
    return CpuEvictor(isa, head_size, q_heads, head_size ** -0.5), caches, queries, ev
