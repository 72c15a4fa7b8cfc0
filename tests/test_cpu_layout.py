"""The probed CPU page layout against vLLM's own cache-write op and attention kernel.

``probe_page_layout`` learns where ``ops.cpu_attn_reshape_and_cache`` stores each K/V
element; ``gather`` and ``copy_slots`` then read and move cache positions with plain
indexing.  These tests write random K/V through vLLM's op into a multi-block cache (viewed
exactly as the TOVA backend views it) and check, for every supported dtype and a grid of
block sizes, head sizes and KV-head counts (the ISA is whatever vLLM picks on this host:
``vec``/``vec16`` without AMX, ``amx`` for bf16 on AMX hosts):

* ``gather`` returns exactly what was written, and nothing else was touched;
* ``copy_slots`` moves exactly the requested positions (K and V, every head);
* vLLM's attention kernel, reading the cache after the writes *and after a compaction by
  ``copy_slots``*, agrees with a plain torch attention over the tokens the test
  expects at those positions: the layout we write in is the layout the kernel reads.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from tova_vllm.engine.cpu_evictor import copy_slots, slot_elements
from tova_vllm.engine.cpu_layout import _BASE, HalfPageLayout, _decode_half, probe_page_layout

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRID = [
    (dtype, block_size, head_size, kv_heads)
    for dtype in DTYPES
    for block_size in (32, 64)
    for head_size in (32, 64, 128)
    for kv_heads in (1, 2)
] + [
    (torch.bfloat16, 128, 128, 2),
    (torch.float32, 128, 64, 1),
    # Head sizes that are multiples of 16 but not 32 select vLLM's other ISA, "vec16".
    (torch.float32, 32, 80, 2),
    (torch.bfloat16, 64, 112, 1),
    (torch.float16, 32, 80, 1),
]
IDS = [f"{str(d).split('.')[-1]}-bs{b}-D{h}-H{k}" for d, b, h, k in GRID]
NUM_BLOCKS = 5
# Kernel vs torch attention: atol, rtol per dtype (the K/V are the same stored values).
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.5e-2, 1e-2),
             torch.float16: (1e-3, 1e-3)}


def _cache(dtype, block_size, head_size, kv_heads, gen):
    """A random-filled cache and the backend's views of it."""
    cache = torch.randn(NUM_BLOCKS, kv_heads, block_size, 2 * head_size, generator=gen).to(dtype)
    pages = cache.view(NUM_BLOCKS, kv_heads, 2 * block_size, head_size)
    key_cache, value_cache = pages.chunk(2, dim=2)
    return cache, pages, key_cache, value_cache


def _isa_layout(dtype, block_size, head_size):
    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    return isa, probe_page_layout(isa, dtype, block_size, head_size)


def _write(key, value, key_cache, value_cache, slots, isa):
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")


def gather(pages: torch.Tensor, half: HalfPageLayout, block_ids: torch.Tensor,
           block_offsets: torch.Tensor) -> torch.Tensor:
    """The test's reader: K (or V) of the cache positions given as ``[E, S]`` blocks and in-block offsets.

    ``pages`` is the layer cache viewed ``[num_blocks, kv_heads, 2 * bs, D]``; returns
    ``[E, kv_heads, S, D]``.
    """
    heads = torch.arange(pages.shape[1]).view(1, -1, 1, 1)
    rows = half.rows[block_offsets].unsqueeze(1)  # [E, 1, S, D]
    cols = half.cols[block_offsets].unsqueeze(1)
    return pages[block_ids[:, None, :, None], heads, rows, cols]


def _gather_slots(pages, layout, slots):
    """K and V at ``slots`` (flat block * bs + offset), as ``[N, kv_heads, D]``."""
    block_size = pages.shape[2] // 2
    ids, offs = (slots // block_size).view(1, -1), (slots % block_size).view(1, -1)
    return tuple(gather(pages, half, ids, offs)[0].transpose(0, 1)
                 for half in (layout.key, layout.value))


def _attention(query, key, value, scale):
    """One query ``[Q, D]`` over ``key/value [S, kv_heads, D]``, in float32."""
    group = query.shape[0] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    probs = torch.softmax(torch.einsum("hd,shd->hs", query.float(), k) * scale, dim=-1)
    return torch.einsum("hs,shd->hd", probs, v)


def _kernel_attention(query, key_cache, value_cache, block_table, seq_len, isa, scale):
    """vLLM's CPU attention for one request with one query (the last position)."""
    num_heads, head_size = query.shape
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=num_heads, num_kv_heads=key_cache.shape[1], head_dim=head_size,
        seq_lens=seq_lens, dtype=query.dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False, kv_cache_dtype="auto",
    )
    out = torch.zeros(1, num_heads, head_size, dtype=query.dtype)
    ops.cpu_attention_with_kv_cache(
        query=query.unsqueeze(0), key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=block_table, softcap=0.0,
        scheduler_metadata=metadata, s_aux=None, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto",
    )
    return out[0].float()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype,block_size,head_size,kv_heads", GRID, ids=IDS)
def test_probed_layout_is_a_permutation_of_each_half(dtype, block_size, head_size, kv_heads):
    _, layout = _isa_layout(dtype, block_size, head_size)
    for half, first_row in ((layout.key, 0), (layout.value, block_size)):
        assert half.rows.shape == half.cols.shape == (block_size, head_size)
        flat = (half.rows - first_row) * head_size + half.cols
        assert torch.equal(flat.flatten().sort().values, torch.arange(block_size * head_size))


@pytest.mark.parametrize("dtype,block_size,head_size,kv_heads", GRID, ids=IDS)
def test_gather_reads_what_vllm_wrote(dtype, block_size, head_size, kv_heads):
    gen = torch.Generator().manual_seed(block_size * 1000 + head_size * 10 + kv_heads)
    isa, layout = _isa_layout(dtype, block_size, head_size)
    _, pages, key_cache, value_cache = _cache(dtype, block_size, head_size, kv_heads, gen)
    all_slots = torch.arange(NUM_BLOCKS * block_size)
    before_k, before_v = _gather_slots(pages, layout, all_slots)

    # A shuffled ~60% of the slots, spread over every block, written in random order.
    order = torch.randperm(all_slots.numel(), generator=gen)
    written, untouched = order[: all_slots.numel() * 3 // 5], order[all_slots.numel() * 3 // 5:]
    key = torch.randn(written.numel(), kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(written.numel(), kv_heads, head_size, generator=gen).to(dtype)
    _write(key, value, key_cache, value_cache, written, isa)

    got_k, got_v = _gather_slots(pages, layout, written)
    assert torch.equal(got_k, key)
    assert torch.equal(got_v, value)
    rest_k, rest_v = _gather_slots(pages, layout, untouched)
    assert torch.equal(rest_k, before_k[untouched])
    assert torch.equal(rest_v, before_v[untouched])


@pytest.mark.parametrize("dtype,block_size,head_size,kv_heads",
                         [GRID[i] for i in (0, 15, -3, -2)], ids=[IDS[i] for i in (0, 15, -3, -2)])
def test_write_op_skips_negative_slots(dtype, block_size, head_size, kv_heads):
    """The backend hands vLLM's own KV write a slot mapping with -1 for tokens of later
    phases; the op must leave the cache alone for those tokens."""
    gen = torch.Generator().manual_seed(3 + block_size + head_size + kv_heads)
    isa, layout = _isa_layout(dtype, block_size, head_size)
    cache, pages, key_cache, value_cache = _cache(dtype, block_size, head_size, kv_heads, gen)
    raw_before = cache.clone()
    n = NUM_BLOCKS * block_size
    slots = torch.randperm(n, generator=gen)[:12]
    skipped = torch.tensor([0, 3, 4, 9, 11])
    slots[skipped] = -1
    key = torch.randn(12, kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(12, kv_heads, head_size, generator=gen).to(dtype)
    _write(key, value, key_cache, value_cache, slots, isa)

    written = slots >= 0
    got_k, got_v = _gather_slots(pages, layout, slots[written])
    assert torch.equal(got_k, key[written]) and torch.equal(got_v, value[written])
    others = torch.ones(n, dtype=torch.bool)
    others[slots[written]] = False
    before_k, before_v = _gather_slots(raw_before.view_as(pages), layout, torch.arange(n))
    after_k, after_v = _gather_slots(pages, layout, torch.arange(n))
    assert torch.equal(after_k[others], before_k[others])
    assert torch.equal(after_v[others], before_v[others])


@pytest.mark.parametrize("dtype,block_size,head_size,kv_heads", GRID, ids=IDS)
def test_copy_slots_moves_exactly_the_requested_positions(dtype, block_size, head_size,
                                                              kv_heads):
    gen = torch.Generator().manual_seed(7 + block_size * 1000 + head_size * 10 + kv_heads)
    isa, layout = _isa_layout(dtype, block_size, head_size)
    cache, pages, key_cache, value_cache = _cache(dtype, block_size, head_size, kv_heads, gen)
    n = NUM_BLOCKS * block_size
    key = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
    _write(key, value, key_cache, value_cache, torch.randperm(n, generator=gen), isa)
    all_slots = torch.arange(n)
    before_k, before_v = _gather_slots(pages, layout, all_slots)
    raw_before = cache.clone()

    order = torch.randperm(n, generator=gen)
    moves = block_size + 3  # crosses blocks, and within blocks
    src, dst = order[:moves], order[moves: 2 * moves]
    copy_slots(pages, slot_elements(layout, kv_heads), src, dst)

    after_k, after_v = _gather_slots(pages, layout, all_slots)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    expected_k[dst], expected_v[dst] = before_k[src], before_v[src]
    assert torch.equal(after_k, expected_k)
    assert torch.equal(after_v, expected_v)
    # Exactly 2 * moves * kv_heads * D raw elements may change (fewer if values repeat).
    changed = int((cache != raw_before).sum())
    assert 0 < changed <= 2 * moves * kv_heads * head_size


@pytest.mark.parametrize("dtype,block_size,head_size,kv_heads", GRID, ids=IDS)
def test_vllm_kernel_reads_the_layout_we_write_and_compact(dtype, block_size, head_size,
                                                           kv_heads):
    """TOVA's cycle on one request: write, attend, compact, attend over the kept prefix."""
    gen = torch.Generator().manual_seed(11 + block_size * 1000 + head_size * 10 + kv_heads)
    isa, layout = _isa_layout(dtype, block_size, head_size)
    _, pages, key_cache, value_cache = _cache(dtype, block_size, head_size, kv_heads, gen)
    atol, rtol = TOLERANCE[dtype]
    scale = head_size**-0.5
    num_heads = 2 * kv_heads

    # Cache positions [0, live) on a shuffled block table that spans 3 blocks.
    live = 2 * block_size + 7
    block_table = (torch.randperm(NUM_BLOCKS, generator=gen)[:3]).to(torch.int32).view(1, -1)
    positions = torch.arange(live)
    slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
    key = torch.randn(live, kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(live, kv_heads, head_size, generator=gen).to(dtype)
    shuffle = torch.randperm(live, generator=gen)
    _write(key[shuffle], value[shuffle], key_cache, value_cache, slots[shuffle], isa)
    query = (2 * torch.randn(num_heads, head_size, generator=gen)).to(dtype)

    got = _kernel_attention(query, key_cache, value_cache, block_table, live, isa, scale)
    torch.testing.assert_close(got, _attention(query, key, value, scale), atol=atol, rtol=rtol)
    gathered_k, gathered_v = _gather_slots(pages, layout, slots)
    torch.testing.assert_close(got, _attention(query, gathered_k, gathered_v, scale),
                               atol=atol, rtol=rtol)

    # Compact to ``keep``: every token at a position >= keep moves into a random hole.
    keep = live - block_size // 2 - 5
    src = torch.arange(keep, live)
    dst = torch.randperm(keep, generator=gen)[: src.numel()].sort().values
    copy_slots(pages, slot_elements(layout, kv_heads), slots[src], slots[dst])
    token_at = torch.arange(keep)
    token_at[dst] = src
    got = _kernel_attention(query, key_cache, value_cache, block_table, keep, isa, scale)
    expected = _attention(query, key[token_at], value[token_at], scale)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    # The check has teeth: without the compaction the kept prefix attends very differently.
    stale = _attention(query, key[:keep], value[:keep], scale)
    assert (stale - expected).abs().max() > 10 * atol


# --------------------------------------------------------------------------- the decoder


def _passes_for(codes: torch.Tensor, digits: int) -> list[torch.Tensor]:
    """What the probe would read back if flat offset o held element ``codes[o]``."""
    return [((codes // _BASE**i) % _BASE + 1).to(torch.bfloat16) for i in range(digits)]


@pytest.mark.parametrize("block_size,head_size", [(32, 32), (64, 128)])
def test_decoder_inverts_a_permutation(block_size, head_size):
    gen = torch.Generator().manual_seed(block_size + head_size)
    size = block_size * head_size
    codes = torch.randperm(size, generator=gen)
    half = _decode_half(_passes_for(codes, 4), block_size, head_size, "K", "test", block_size)
    # Element (t, d) has code t * D + d and sits at the offset o with codes[o] == code.
    offset = torch.empty(size, dtype=torch.long)
    offset[codes] = torch.arange(size)
    offset = offset.view(block_size, head_size)
    assert torch.equal(half.rows, block_size + offset // head_size)
    assert torch.equal(half.cols, offset % head_size)


def test_decoder_rejects_an_element_stored_twice():
    block_size, head_size = 32, 32
    codes = torch.arange(block_size * head_size)
    codes[100] = codes[200]  # element 100 is lost, element 200 is stored twice
    with pytest.raises(RuntimeError, match="exactly once"):
        _decode_half(_passes_for(codes, 3), block_size, head_size, "K", "test", 0)


def test_decoder_rejects_an_unwritten_element():
    block_size, head_size = 32, 32
    passes = _passes_for(torch.arange(block_size * head_size), 3)
    passes[1][17] = 0  # the write op never touched this offset in pass 1
    with pytest.raises(RuntimeError, match="out of range"):
        _decode_half(passes, block_size, head_size, "V", "test", block_size)


@pytest.mark.parametrize("dtype,block_size,head_size,kv_heads", GRID, ids=IDS)
def test_last_query_logits_fast_path_equals_written_keys(dtype, block_size, head_size,
                                                          kv_heads, k_reader):
    """The scorer (K read in place, or a matmul against each copied block's raw K) gives
    the logits of the keys vLLM's op wrote, for ragged rows over shuffled blocks; the
    padding positions past ``live`` are the engine's to mask, so only live positions are
    compared."""
    from tova_vllm.engine.cpu_evictor import last_query_logits
    from tova_vllm.policies import gqa_logits

    gen = torch.Generator().manual_seed(7 + block_size + head_size + kv_heads)
    isa, layout = _isa_layout(dtype, block_size, head_size)
    _, pages, key_cache, value_cache = _cache(dtype, block_size, head_size, kv_heads, gen)
    live = torch.tensor([2 * block_size + 3, block_size, 1])
    width = int(live.max())
    # Each row owns distinct shuffled blocks; position p of row r lives in block p // bs.
    perm = torch.randperm(NUM_BLOCKS, generator=gen)
    table = torch.stack([perm[:3], perm[3].repeat(3), perm[4].repeat(3)])
    positions = torch.arange(width)
    padded = torch.where(positions.view(1, -1) < live.view(-1, 1), positions, 0)
    block_ids = table.gather(1, padded // block_size)
    offsets = padded % block_size
    keys = torch.randn(3, width, kv_heads, head_size, generator=gen).to(dtype)
    for r in range(3):
        slots = block_ids[r, : live[r]] * block_size + offsets[r, : live[r]]
        _write(keys[r, : live[r]], keys[r, : live[r]], key_cache, value_cache, slots, isa)
    query = torch.randn(3, kv_heads * 2, head_size, generator=gen).to(dtype)

    layouts = [layout]
    if layout.key_kind == "other":
        # AMX packs K in tiles (read through a permuted view); any other permutation takes
        # the element-order gather: check both.
        assert isa != "amx" or layout.key_tiles is not None
        layouts.append(dataclasses.replace(layout, key_tiles=None))
    for tested in layouts:
        got = last_query_logits(pages, tested, block_ids, offsets, query, 0.125)
        for r in range(3):
            n = int(live[r])
            expected = gqa_logits(query[r : r + 1], keys[r : r + 1, :n].transpose(1, 2), 0.125)
            torch.testing.assert_close(got[r : r + 1, ..., :n], expected, atol=1e-4, rtol=1e-4)
    assert layout.key_kind in ("transposed", "rows", "other")
