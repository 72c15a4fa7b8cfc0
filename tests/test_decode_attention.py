"""Decode attention that gives TOVA's scores (``native.decode_attention``) against vLLM's
own CPU attention kernel and a float64 torch reference, over a grid of batch shapes.

K/V are written by vLLM's own cache-write op into its ``vec``/``vec16`` pages, so the
layout is the one the engine reads.  Rows are ragged (live lengths 1, a block's worth,
a block plus one, ...), blocks shuffled; the query-head groups take every register
blocking path (1, 2, 3, 4, 7, 8 and 71 heads per kv head); head sizes 32 to 128.
Then: the scores drive ``CpuEvictor.evict_layers`` to the same drops and moves as the
scores it computes from the queries; bad block ids and live lengths raise; a layout the
kernel does not read is refused (the stock kernel runs).
"""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from tova_vllm.engine import native
from tova_vllm.engine.cpu_evictor import CpuEvictor, copy_slots, slot_elements, slot_index
from tova_vllm.engine.cpu_layout import probe_page_layout
from tova_vllm.engine.layer_batch import LayerBatch
from tova_vllm.engine.plan import EvictionBatch
from tova_vllm.policies import position_to_drop

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _case(dtype, block_size, head_size, q_heads, kv_heads, live, seed=0):
    """Pages written by vLLM's op, a shuffled block table, queries; and the float64 K, V
    ``[E, W, kv_heads, D]`` the pages hold."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(live)
    per_row = -(-max(live) // block_size)
    width = per_row * block_size
    num_blocks = rows * per_row + 3
    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    layout = probe_page_layout(isa, dtype, block_size, head_size)
    cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_size, dtype=dtype)
    pages = cache.view(num_blocks, kv_heads, 2 * block_size, head_size)
    key_cache, value_cache = pages.chunk(2, dim=2)
    table = (torch.randperm(num_blocks - 1, generator=gen)[: rows * per_row] + 1
             ).view(rows, per_row).to(torch.int32)
    keys = torch.randn(rows, width, kv_heads, head_size, generator=gen).to(dtype)
    values = torch.randn(rows, width, kv_heads, head_size, generator=gen).to(dtype)
    slots = (table.long().repeat_interleave(block_size, 1) * block_size
             + torch.arange(width) % block_size)
    ops.cpu_attn_reshape_and_cache(keys.reshape(-1, kv_heads, head_size),
                                   values.reshape(-1, kv_heads, head_size), key_cache,
                                   value_cache, slots.reshape(-1), isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    query = torch.randn(rows, q_heads, head_size, generator=gen).to(dtype)
    return isa, layout, pages, table, query, keys.double(), values.double()


def _reference(query, keys, values, live, scale):
    """float64 attention output ``[E, q_heads, D]`` and per-kv-head summed weights."""
    rows, width, kv_heads, head_size = keys.shape
    group = query.shape[1] // kv_heads
    q = query.double().view(rows, kv_heads, group, head_size)
    logits = torch.einsum("ehgd,ewhd->ehgw", q, keys) * scale
    past = torch.arange(width).view(1, -1) >= torch.tensor(live).view(-1, 1)
    probs = torch.softmax(logits.masked_fill(past[:, None, None, :], float("-inf")), -1)
    out = torch.einsum("ehgw,ewhd->ehgd", probs, values).reshape(rows, -1, head_size)
    return out, probs.sum(2)


def _vllm_attention(isa, pages, table, query, live, scale):
    rows, q_heads, head_size = query.shape
    kv_heads = pages.shape[1]
    key_cache, value_cache = pages.chunk(2, dim=2)
    seq_lens = torch.tensor(live, dtype=torch.int32)
    starts = torch.arange(rows + 1, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=rows, num_heads=q_heads, num_kv_heads=kv_heads, head_dim=head_size,
        seq_lens=seq_lens, dtype=query.dtype, query_start_loc=starts, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False, kv_cache_dtype="auto")
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=starts, seq_lens=seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
        scheduler_metadata=metadata, s_aux=None, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto")
    return out


def _fused(layout, pages, table, query, live, scale):
    rows, per_row = table.shape
    width = per_row * (pages.shape[2] // 2)
    out = torch.empty_like(query)
    scores = torch.full((rows, pages.shape[1], width), float("nan"))
    logits = torch.empty(rows * query.shape[1] * width)
    assert native.decode_attention(pages, layout, table, query, scale,
                                   torch.tensor(live), out, scores, logits)
    return out, scores


GRID = [
    # dtype, block size, head size, q heads, kv heads, live per row
    (torch.float32, 32, 128, 32, 8, [513, 480, 33, 1]),
    (torch.float32, 16, 64, 9, 3, [64, 16, 17, 5, 40]),
    (torch.float32, 32, 32, 8, 8, [90, 32]),
    (torch.float32, 16, 48, 14, 2, [20, 31]),
    (torch.float32, 32, 64, 8, 1, [70]),
    (torch.float32, 16, 64, 71, 1, [40, 3]),  # MQA with Falcon-7B's 71 query heads
    (torch.bfloat16, 32, 128, 32, 8, [257, 100, 2]),
    (torch.bfloat16, 16, 64, 9, 3, [64, 1, 48]),
    (torch.float16, 32, 64, 4, 2, [65, 9]),
]


@pytest.mark.parametrize("dtype,block_size,head_size,q_heads,kv_heads,live", GRID)
def test_output_and_scores_equal_the_references(dtype, block_size, head_size, q_heads,
                                                kv_heads, live):
    assert native.library() is not None
    isa, layout, pages, table, query, keys, values = _case(
        dtype, block_size, head_size, q_heads, kv_heads, live)
    if not native.attends(layout, pages):
        pytest.fail(f"isa {isa} ({dtype}) is not read by the fused kernel")
    scale = head_size ** -0.5
    out, scores = _fused(layout, pages, table, query, live, scale)
    ref_out, ref_scores = _reference(query, keys, values, live, scale)
    width = scores.shape[-1]
    past = torch.arange(width).view(1, 1, -1) >= torch.tensor(live).view(-1, 1, 1)
    assert bool((scores[past.expand_as(scores)] == 0).all())
    torch.testing.assert_close(scores.double(), ref_scores, rtol=2e-5, atol=1e-7)
    # The output in the query's dtype: as close to the float64 result as vLLM's kernel.
    stock = _vllm_attention(isa, pages, table, query, live, scale)
    ours_err = (out.double() - ref_out).abs().max().item()
    stock_err = (stock.double() - ref_out).abs().max().item()
    tolerance = 2e-6 if dtype == torch.float32 else 4e-3
    assert ours_err <= max(tolerance, 1.5 * stock_err), (ours_err, stock_err)


def test_threads_split_rows_without_changing_bits():
    _, layout, pages, table, query, _, _ = _case(torch.float32, 32, 128, 32, 8,
                                                 [513, 300, 257, 64])
    one = _fused(layout, pages, table, query, [513, 300, 257, 64], 0.1)
    torch.set_num_threads(2)
    try:
        two = _fused(layout, pages, table, query, [513, 300, 257, 64], 0.1)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_bad_block_ids_and_live_lengths_raise():
    _, layout, pages, table, query, _, _ = _case(torch.float32, 16, 64, 8, 2, [20, 31])
    bad = table.clone()
    bad[1, 0] = pages.shape[0]
    with pytest.raises(IndexError):
        _fused(layout, pages, bad, query, [20, 31], 0.1)
    for live in ([0, 31], [20, 33]):
        with pytest.raises(IndexError):
            _fused(layout, pages, table, query, live, 0.1)
    with pytest.raises(ValueError):
        native.decode_attention(pages, layout, table, query, 0.1, torch.tensor([20, 31]),
                                torch.empty_like(query), torch.empty(2, 2, 16),
                                torch.empty(2 * 8 * 32))


def test_layout_it_does_not_read_is_refused():
    from test_native import _tiled_layout

    pages = torch.zeros(4, 2, 32, 64)
    for tile, group in ((1, 64), (16, 2)):  # rows, AMX-like tiles
        assert not native.attends(_tiled_layout(16, 64, tile, group), pages)
    assert native.attends(_tiled_layout(16, 64, 16, 1), pages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tensor_parallel", (False, True))
def test_attention_scores_evict_as_the_computed_scores(dtype, tensor_parallel):
    """One steady-decode step of 3 layers through the layer batch, rows 0, 1 and 3 evicting
    and row 2 still growing (it attends but does not evict): scores given by the
    attention and scores computed from the queries drop and move the same tokens, and the
    attention output is vLLM's.  Alone, each layer's attention evicts too; with tensor
    parallelism (an all-reduce, here the identity) the batch evicts at the step's end."""
    live, block_size, layers = [33, 33, 9, 17], 16, 3
    cases = [_case(dtype, block_size, 64, 8, 2, live, seed=layer) for layer in range(layers)]
    isa, table = cases[0][0], cases[0][3]
    evicting = torch.tensor([0, 1, 3])
    ev_live = torch.tensor(live)[evicting]
    width = int(ev_live.max())
    positions = torch.arange(width)
    ev = EvictionBatch(
        rows=evicting, query_index=evicting, query_position=ev_live + 50,
        block_ids=table.long()[evicting][:, positions // block_size],
        block_offsets=(positions % block_size).expand(len(evicting), width),
        live=ev_live, keep=ev_live - 1, keep_list=(ev_live - 1).tolist(),
        live_list=ev_live.tolist(), one_drop_each=True,
    ).prepared(block_size, torch.device("cpu"))
    evictor = CpuEvictor(isa, 64, 8, 0.125,
                         (lambda summed: summed) if tensor_parallel else None)
    seq_lens = torch.tensor(live, dtype=torch.int32)
    moves = {}
    after = {}
    for given in (True, False):
        # Every layer's pages hold their rows at the first case's block ids (one block
        # table per step, as in the engine).
        pages = [case[2].clone() if layer == 0 else _retabled(case[2], case[3], table)
                 for layer, case in enumerate(cases)]
        batch = LayerBatch(ev, layers, attention_scores=given)
        for layer in range(layers):
            query = cases[layer][4]
            if given:
                out = torch.empty_like(query)
                stock = _vllm_attention(isa, pages[layer], table, query, live, 0.125)
                assert evictor.attend_and_score(query, pages[layer], table, seq_lens, out,
                                                batch)
                tolerance = 2e-6 if dtype == torch.float32 else 1.6e-2
                torch.testing.assert_close(out, stock, rtol=tolerance, atol=tolerance)
            batch.add(evictor, pages[layer], None if given else query[evicting])
        assert batch.done and (batch.scores is not None) == given
        assert (batch.row_evictions is not None) == (given and not tensor_parallel)
        after[given], moves[given] = pages, batch.moves
    for a, b, case in zip(after[True], after[False], cases):
        assert torch.equal(a, b)
        assert not torch.equal(a, _retabled(case[2], case[3], table))  # something moved
    assert all(torch.equal(a, b) for a, b in zip(moves[True], moves[False]))


@pytest.mark.parametrize("dtype,block_size,head_size,q_heads,kv_heads,live", GRID)
@pytest.mark.parametrize("ties", (False, True))
def test_attention_evicts_rows_by_the_rule(dtype, block_size, head_size, q_heads, kv_heads,
                                           live, ties):
    """With ``RowEvictions`` the kernel also evicts the marked rows: the drop is
    ``position_to_drop`` of its own scores summed over kv heads in head order and divided
    by the query heads, and the last live position's K/V (every head) moves into it; the
    output and scores are those of the kernel without eviction, other rows untouched.
    ``ties``: a row's keys all equal (every weight ties: the newest, last, position is
    dropped, nothing moves) and another's two lowest positions equal (the higher goes)."""
    isa, layout, pages, table, query, keys, _ = _case(
        dtype, block_size, head_size, q_heads, kv_heads, live, seed=3)
    rows, per_row = table.shape
    evicts = torch.tensor([e % 2 == 0 or e == rows - 1 for e in range(rows)],
                          dtype=torch.int32)
    scale = head_size ** -0.5
    if ties:
        _make_ties(isa, pages, table, query, keys, live, block_size)
    before = pages.clone()
    out, scores = _fused(layout, pages, table, query, live, scale)
    width = scores.shape[-1]
    src, dst = torch.full((rows,), 7, dtype=torch.int64), torch.full((rows,), 7,
                                                                      dtype=torch.int64)
    out2 = torch.empty_like(query)
    scores2 = torch.full_like(scores, float("nan"))
    assert native.decode_attention(
        pages, layout, table, query, scale, torch.tensor(live), out2, scores2,
        torch.empty(rows * q_heads * width), native.RowEvictions(evicts, q_heads, src, dst))
    assert torch.equal(out2, out) and torch.equal(scores2, scores)
    summed = scores[:, 0].clone()
    for h in range(1, kv_heads):
        summed += scores[:, h]
    drop = position_to_drop(summed / q_heads, torch.tensor(live))
    slots = (table.long().repeat_interleave(block_size, 1) * block_size
             + torch.arange(width) % block_size)
    expected = before.clone()
    elements = slot_elements(layout, kv_heads)
    for e in range(rows):
        if not evicts[e]:
            assert src[e] == dst[e] == -1
            continue
        last = live[e] - 1
        assert (src[e], dst[e]) == (slots[e, last], slots[e, drop[e]])
        copy_slots(expected, elements, src[e:e + 1], dst[e:e + 1])
    assert torch.equal(pages, expected)
    if ties:
        assert drop[0] == live[0] - 1 and src[0] == dst[0]  # all equal: the newest goes
        if rows > 2 and live[2] > 3:
            assert drop[2] == 3  # positions 1 and 3 tie lowest: the higher goes


@pytest.mark.parametrize("dtype,block_size,head_size,q_heads,kv_heads,live", GRID)
@pytest.mark.parametrize("values", ("distinct", "ties"))
def test_attention_evicts_rows_by_their_position_rule(dtype, block_size, head_size, q_heads,
                                                      kv_heads, live, values):
    """``RowEvictions`` with the layer's side-state positions: the kernel writes the new
    positions, then each marked row drops what ``position_drops`` (the step-end path)
    drops, and pages and side state end as that path plus ``copy_slots`` leaves them;
    the output and scores are those of the kernel without eviction."""
    from tova_vllm.policies.registry import NO_POSITION_PROTECTED

    isa, layout, pages, table, query, keys, _ = _case(
        dtype, block_size, head_size, q_heads, kv_heads, live, seed=5)
    rows, per_row = table.shape
    gen = torch.Generator().manual_seed(rows * 10 + block_size)
    evicts = torch.tensor([e % 2 == 0 or e == rows - 1 for e in range(rows)],
                          dtype=torch.int32)
    scale = head_size ** -0.5
    width = per_row * block_size
    size = pages.shape[0] * block_size + 1  # one spare entry, as SlotSideState has
    high = 4 if values == "ties" else 2**20
    positions = torch.randint(-2, high, (size,), generator=gen, dtype=torch.int32)
    protect = torch.randint(-1, 6, (rows,), generator=gen)
    protect[1::3] = NO_POSITION_PROTECTED
    slots = (table.long().repeat_interleave(block_size, 1) * block_size
             + torch.arange(width) % block_size)
    live_t = torch.tensor(live, dtype=torch.int32)
    new_slots = slots[torch.arange(rows), live_t.long() - 1]
    new_positions = torch.randint(0, high, (rows,), generator=gen)
    before, side_before = pages.clone(), positions.clone()
    out, scores = _fused(layout, pages, table, query, live, scale)

    # The step-end path over the evicting rows.
    marked = evicts.bool()
    expected, expected_side = before.clone(), side_before.clone()
    expected_side[new_slots[~marked]] = new_positions[~marked].to(torch.int32)
    src_want, dst_want = native.position_drops(
        [expected_side], live_t[marked], slots[marked], protect[marked], new_slots[marked],
        new_positions[marked])
    copy_slots(expected, slot_elements(layout, kv_heads), src_want, dst_want[0])

    src, dst = torch.full((rows,), 7, dtype=torch.int64), torch.full((rows,), 7,
                                                                      dtype=torch.int64)
    out2 = torch.empty_like(query)
    scores2 = torch.full_like(scores, float("nan"))
    assert native.decode_attention(
        pages, layout, table, query, scale, live_t, out2, scores2,
        torch.empty(rows * q_heads * width),
        native.RowEvictions(evicts, q_heads, src, dst, positions=positions,
                            protect=protect, new_slots=new_slots,
                            new_positions=new_positions))
    assert torch.equal(out2, out) and torch.equal(scores2, scores)
    assert torch.equal(src[marked], src_want) and torch.equal(dst[marked], dst_want[0])
    assert (src[~marked] == -1).all() and (dst[~marked] == -1).all()
    assert torch.equal(positions, expected_side)
    assert torch.equal(pages, expected)
    if values == "distinct":
        assert (src[marked] != dst[marked]).any()  # something moved


def test_position_evictions_refuse_a_short_side_state():
    isa, layout, pages, table, query, keys, _ = _case(
        torch.float32, 16, 64, 4, 2, [20, 9], seed=1)
    rows, per_row = table.shape
    width = per_row * 16
    args = (pages, layout, table, query, 0.125, torch.tensor([20, 9], dtype=torch.int32),
            torch.empty_like(query), torch.empty(rows, 2, width),
            torch.empty(rows * 4 * width))

    def evictions(size, new_slot):
        return native.RowEvictions(
            torch.ones(rows, dtype=torch.int32), 4, torch.empty(rows, dtype=torch.int64),
            torch.empty(rows, dtype=torch.int64),
            positions=torch.zeros(size, dtype=torch.int32),
            protect=torch.zeros(rows, dtype=torch.int64),
            new_slots=torch.tensor([new_slot]), new_positions=torch.tensor([3]))

    full = pages.shape[0] * 16
    with pytest.raises(IndexError):
        native.decode_attention(*args, evictions(full - 1, 0))
    with pytest.raises(IndexError):
        native.decode_attention(*args, evictions(full, full))
    assert native.decode_attention(*args, evictions(full, full - 1))


def _make_ties(isa, pages, table, query, keys, live, block_size):
    """Row 0: every key equal.  Row 2 (if long enough): keys 1 and 3 equal and far below
    the others for every query head (so they tie as the lowest)."""
    rows, width, kv_heads, head_size = keys.shape
    new_keys = keys.clone()
    new_keys[0] = keys[0, :1]
    if rows > 2 and live[2] > 3:
        group = query.shape[1] // kv_heads
        q = query.double().view(rows, kv_heads, group, head_size)[2].sum(1)  # [H, D]
        low = -8 * q / q.norm(dim=-1, keepdim=True)
        new_keys[2, 1] = new_keys[2, 3] = low
    slots = (table.long().repeat_interleave(block_size, 1) * block_size
             + torch.arange(width) % block_size)
    key_cache, value_cache = pages.chunk(2, dim=2)
    # Re-write the keys only: the values stay (written back as they are).
    values = torch.empty(rows, width, kv_heads, head_size, dtype=pages.dtype)
    flat = pages.view(-1)
    layout = probe_page_layout(isa, pages.dtype, block_size, head_size)
    elements = slot_elements(layout, kv_heads)
    index = slot_index(elements, slots.reshape(-1), pages).view(rows, width, 2, kv_heads,
                                                                  head_size)
    values.copy_(flat[index[:, :, 1]])
    ops.cpu_attn_reshape_and_cache(new_keys.to(pages.dtype).reshape(-1, kv_heads, head_size),
                                   values.reshape(-1, kv_heads, head_size), key_cache,
                                   value_cache, slots.reshape(-1), isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")


def _retabled(pages, own_table, table):
    """``pages`` with each row's blocks moved from ``own_table``'s ids to ``table``'s."""
    moved = pages.clone()
    moved[table.long().flatten()] = pages[own_table.long().flatten()]
    return moved


@pytest.mark.parametrize("prefix_caching", (True, False))
def test_engine_drops_the_same_with_scores_from_attention(tiny_models, hf_models,
                                                          monkeypatch, prefix_caching):
    """The engine with scores from attention (default; each layer's attention then evicts
    too) and with scores computed from the queries (``TOVA_VLLM_ATTENTION_SCORES=0``)
    makes the same drops, step after step, and the reference's tokens; the first did take
    them from attention, also in steps where some rows were still growing."""
    from engine_harness import Req, random_prompts, run_equals_reference

    prompts = random_prompts([5, 40, 90, 17, 33, 60], seed=5)
    extra = [{"tova_cache_size": 20}, {}, {}, {"tova_cache_size": 12}, {}, {}]
    arrivals = [0, 0, 3, 10, 10, 25]
    requests = [Req(p, 40, a, x) for p, a, x in zip(prompts, arrivals, extra)]
    tova = {"cache_size": 32}
    drops, batches = {}, {}
    original_add = LayerBatch.add
    for setting in ("1", "0"):
        monkeypatch.setenv("TOVA_VLLM_ATTENTION_SCORES", setting)
        seen, kinds = [], []

        def spy_add(self, evictor, cache, queries, side=None, kinds=kinds, seen=seen):
            last = len(self.caches) == self.num_layers - 1
            if last:
                kinds.append((self.scores is not None,
                              None if self.scores is None else
                              self.scores.shape[1] > self.evictions.rows.numel(),
                              self.row_evictions is not None))
            original_add(self, evictor, cache, queries, side)
            if last:
                seen.append(tuple(m.clone() for m in self.moves))

        monkeypatch.setattr(LayerBatch, "add", spy_add)
        run_equals_reference(tiny_models["llama_gqa"], hf_models["llama_gqa"], requests, tova,
                             enable_prefix_caching=prefix_caching)
        drops[setting], batches[setting] = seen, kinds
    assert len(drops["1"]) == len(drops["0"]) > 30
    for a, b in zip(drops["1"], drops["0"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not any(given for given, _, _ in batches["0"])
    given = [growing for g, growing, _ in batches["1"] if g]
    assert len(given) > 20 and True in given and False in given
    # Each layer's attention evicted its rows (no tensor parallelism here).
    assert all(in_attention for g, _, in_attention in batches["1"] if g)
