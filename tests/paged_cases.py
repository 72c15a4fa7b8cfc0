"""Random eviction cases on vLLM's FlashAttention KV layout, checked against a dense model.

Shared by ``test_paged_eviction.py`` (torch kernels) and ``test_kernels.py`` (Triton kernels,
interpreted on CPU).  The expected result is computed on dense per-row tensors read out of
the paged cache position by position, with the policy functions and plain index moves:
independent of block tables, slot arithmetic, the kernels and their compaction.
"""

from __future__ import annotations

from typing import Optional

import torch

from tova_vllm.engine.paged_eviction import PagedEvictor, split_flash_kv_cache
from tova_vllm.engine.side_state import SlotSideState, group_rows
from tova_vllm.engine.plan import EvictionBatch
from tova_vllm.policies import (
    EvictionPolicy,
    compaction_moves,
    head_summed_probs,
    position_to_drop,
    positions_to_keep,
)


def _eviction_batch(table: torch.Tensor, live: list[int], keep: list[int], query_index: list[int],
                    query_position: list[int], block_size: int) -> EvictionBatch:
    width = max(live)
    positions = torch.arange(width)
    live_t = torch.tensor(live)
    padded = torch.where(positions.unsqueeze(0) < live_t.unsqueeze(1), positions, 0)
    return EvictionBatch(
        rows=torch.arange(len(live)),
        query_index=torch.tensor(query_index),
        query_position=torch.tensor(query_position),
        block_ids=table.long()[torch.arange(len(live)).unsqueeze(1), padded // block_size],
        block_offsets=padded % block_size,
        live=live_t,
        keep=torch.tensor(keep),
        keep_list=list(keep),
        live_list=list(live),
        one_drop_each=all(lv == k + 1 for lv, k in zip(live, keep)),
    )


def run_case(*, backend: str, decode: bool, policies: Optional[list[str]], dtype=torch.float32,
             use_lse: bool = False, kv_heads: int = 2, group: int = 4, head_dim: int = 64,
             block_size: int = 16, seed: int = 0, device: str = "cpu",
             forbid_sync: bool = False) -> None:
    """Build on the host, evict on ``device``, compare on the host.  ``forbid_sync`` (CUDA):
    the eviction call fails if it makes the host wait for the device."""
    g = torch.Generator().manual_seed(seed)
    rows = 3 if policies is None else len(policies)
    keep = [int(k) for k in torch.randint(5, 40, (rows,), generator=g)]
    live = [k + 1 if decode else k + int(torch.randint(1, 30, (1,), generator=g)) for k in keep]
    q_heads = kv_heads * group
    blocks_per_row = [-(-lv // block_size) for lv in live]
    num_blocks = sum(blocks_per_row) + 5
    perm = torch.randperm(num_blocks, generator=g)
    width_blocks = max(blocks_per_row) + 2
    # Unused table entries hold other rows' block ids: stale ids must never be read.
    table = perm[torch.randint(0, num_blocks, (rows, width_blocks), generator=g)].to(torch.int32)
    start = 0
    for r, n in enumerate(blocks_per_row):
        table[r, :n] = perm[start:start + n]
        start += n
    kv_cache = (torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim, generator=g) * 2).to(dtype)
    key_cache, value_cache = split_flash_kv_cache(kv_cache, head_dim)
    num_tokens = rows + 2
    query = (torch.randn(num_tokens, q_heads, head_dim, generator=g) * 2).to(dtype)
    query_index = torch.randperm(num_tokens, generator=g)[:rows].tolist()
    scale = head_dim ** -0.5

    def dense(cache, r, n):
        return torch.stack([cache[int(table[r, p // block_size]), p % block_size] for p in range(n)])

    dense_k = [dense(key_cache, r, live[r]).clone() for r in range(rows)]
    dense_v = [dense(value_cache, r, live[r]).clone() for r in range(rows)]
    # Side state: distinct logical positions (gaps: earlier evictions), random weights.
    side = SlotSideState(num_blocks * block_size, torch.device("cpu"))
    dense_pos, dense_acc = [], []
    for r in range(rows):
        pos = torch.randperm(3 * live[r], generator=g)[: live[r]].to(torch.int32)
        acc = torch.rand(live[r], generator=g)
        slots = torch.tensor([int(table[r, p // block_size]) * block_size + p % block_size
                              for p in range(live[r])])
        side.positions[slots] = pos
        side.accumulated[slots] = acc
        dense_pos.append(pos)
        dense_acc.append(acc)

    lse = None
    probs = []
    for r in range(rows):
        q = query[query_index[r]].float()
        k = dense_k[r].float()  # [n, kv_heads, D]
        probs.append(head_summed_probs(q.unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0), scale)[0]
                     / q_heads)
    if use_lse:
        lse = torch.empty(rows, q_heads)
        for r in range(rows):
            q = query[query_index[r]].float().view(kv_heads, group, head_dim)
            logits = torch.einsum("kgd,nkd->kgn", q, dense_k[r].float()) * scale
            lse[r] = torch.logsumexp(logits, dim=-1).reshape(-1)

    names = policies or ["tova"] * rows
    expected = []
    for r in range(rows):
        policy = EvictionPolicy(names[r])
        score = policy.keep_scores(
            cache_size=torch.tensor([keep[r]]),
            query_position=dense_pos[r].max().view(1).long(),
            positions=dense_pos[r].unsqueeze(0), last_query_probs=probs[r].unsqueeze(0),
            accumulated=dense_acc[r].unsqueeze(0),
        )[0]
        if decode:
            drop = int(position_to_drop(score.unsqueeze(0), torch.tensor([live[r]]))[0])
            src, dst = torch.tensor([live[r] - 1]), torch.tensor([drop])
        else:
            src, dst = compaction_moves(positions_to_keep(score, keep[r]), keep[r])
        state = [t.clone() for t in (dense_k[r], dense_v[r], dense_pos[r], dense_acc[r])]
        for t in state:
            t[dst] = t[src].clone()
        expected.append([t[: keep[r]] for t in state])

    ev = _eviction_batch(table, live, keep, query_index,
                         [int(p.max()) for p in dense_pos], block_size)
    dev = torch.device(device)
    kv_dev = kv_cache.to(dev)
    side_dev = SlotSideState(side.num_slots, dev)
    side_dev.positions.copy_(side.positions)
    side_dev.accumulated.copy_(side.accumulated)
    evictor = PagedEvictor(dev, q_heads, scale, backend=backend)
    query_dev, lse_dev = query.to(dev), None if lse is None else lse.to(dev)
    groups = None if policies is None else group_rows([EvictionPolicy(n) for n in policies], dev)
    guard = forbid_sync and dev.type == "cuda"
    if guard:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        evictor.evict(query_dev, split_flash_kv_cache(kv_dev, head_dim), ev, lse=lse_dev,
                      groups=groups,
                      side=None if policies is None else side_dev)
    finally:
        if guard:
            torch.cuda.set_sync_debug_mode(0)
    key_cache, value_cache = split_flash_kv_cache(kv_dev.cpu(), head_dim)
    side.positions.copy_(side_dev.positions.cpu())
    side.accumulated.copy_(side_dev.accumulated.cpu())
    for r in range(rows):
        k, v = dense(key_cache, r, keep[r]), dense(value_cache, r, keep[r])
        slots = torch.tensor([int(table[r, p // block_size]) * block_size + p % block_size
                              for p in range(keep[r])])
        got = [k, v] + ([side.positions[slots], side.accumulated[slots]] if policies else [])
        for name, a, b in zip(("keys", "values", "positions", "accumulated"), got, expected[r]):
            assert torch.equal(a, b), (f"row {r} ({names[r]}, live {live[r]}, keep {keep[r]}): "
                                       f"{name} differ")
