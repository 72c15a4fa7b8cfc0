"""The in-place K reader and slot copier (``engine/native.py``, ``csrc/key_logits.c``)
against plain torch.

* it builds on this machine (CI's machines have gcc: a silent fall back to the torch path
  would hide a slower engine), and ``TOVA_VLLM_NATIVE=0`` turns it off;
* logits read in place equal ``gqa_logits`` over the keys the test placed, for every
  tiling the C code knows (vLLM's transposed ``vec``/``vec16`` pages, AMX's 16 x 2 tiles,
  row order, a transposed block too short for the vector path), fp32/bf16/fp16, query
  groups that take each register-blocking width (8, 4, 2, 1 and their sums), ragged rows
  (positions past ``live`` are -inf) and shuffled blocks; split over threads it gives the
  same bits as on one;
* the slot copier leaves the cache exactly as the indexing path does, in vLLM's probed
  layout and in synthetic ones, for 4-, 2- and 1-byte elements;
* bad block ids and slots raise instead of reading out of bounds;
* the decode rule's choice in C (``decode_drops``) is ``position_to_drop``'s, ties, NaN
  and ragged rows included; so is ``position_drops``' from the position rules' keep
  scores, with its side-state writes and moves;
* ``CpuEvictor`` on the same cache drops and moves the same tokens with the library on
  and off, and steady decode's layer batch reads K in place (no block copy) when it is on.
"""

from __future__ import annotations

import pytest
import torch
from cpu_cases import decode_case
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from tova_vllm.engine import cpu_evictor, native
from tova_vllm.engine.cpu_evictor import slot_elements, slot_index
from tova_vllm.engine.cpu_layout import HalfPageLayout, PageLayout, probe_page_layout
from tova_vllm.policies import gqa_logits, position_to_drop

pytestmark = pytest.mark.usefixtures("torch_single_thread")

def _tiled_layout(block_size: int, head_size: int, tile: int, group: int) -> PageLayout:
    """A page layout whose K half is ``[bs / T][D / P][T][P]`` (V: row order after it)."""
    t = torch.arange(block_size).view(-1, 1)
    d = torch.arange(head_size).view(1, -1)
    flat = ((t // tile) * (head_size // group) + d // group) * tile * group + (t % tile) * group + d % group
    key = HalfPageLayout(rows=flat // head_size, cols=flat % head_size)
    rows_order = t * head_size + d
    value = HalfPageLayout(rows=block_size + rows_order // head_size, cols=rows_order % head_size)
    if tile == block_size and group == 1:
        kind, tiles = "transposed", None
    elif tile == 1 and group == head_size:
        kind, tiles = "rows", None
    else:
        kind = "other"
        tiles = ((block_size // tile, head_size // group, tile, group), (0, 2, 1, 3))
    return PageLayout(key=key, value=value, key_kind=kind, key_order=flat.flatten(),
                      key_tiles=tiles, value_rows=True)

def _place_keys(pages: torch.Tensor, layout: PageLayout, table: torch.Tensor,
                keys: torch.Tensor) -> None:
    """Write ``keys`` ``[E, S, kv_heads, D]`` at positions 0..S-1 of each row's blocks."""
    block_size = pages.shape[2] // 2
    rows, width, kv_heads, _ = keys.shape
    for e in range(rows):
        for s in range(width):
            block, offset = int(table[e, s // block_size]), s % block_size
            for h in range(kv_heads):
                pages[block, h, layout.key.rows[offset], layout.key.cols[offset]] = keys[e, s, h]

TILINGS = {  # (block_size, head_size, T, P)
    "transposed-bs32": (32, 64, 32, 1),
    "transposed-bs16": (16, 32, 16, 1),
    "transposed-bs64": (64, 32, 64, 1),
    "transposed-bs8": (8, 32, 8, 1),  # below one 16-wide vector: the generic loop
    "amx-16x2": (32, 64, 16, 2),
    "rows": (16, 32, 1, 32),
}
GROUPS = (1, 3, 4, 8, 15)  # 15 = 8 + 4 + 2 + 1: every register-blocking width once
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def test_library_builds_here_and_can_be_turned_off(monkeypatch):
    assert native.library() is not None, "gcc is on CI's machines: the C reader must build"
    native.library.cache_clear()
    monkeypatch.setenv("TOVA_VLLM_NATIVE", "0")
    try:
        assert native.library() is None
        pages = torch.zeros(2, 1, 64, 32)
        layout = _tiled_layout(32, 32, 32, 1)
        assert native.key_logits(pages, layout, torch.zeros(1, 1, dtype=torch.int32),
                                 torch.zeros(1, 2, 32), 1.0) is None
    finally:
        native.library.cache_clear()

def test_vector_width_is_the_machines():
    """The kernels' vectors and register blocking follow the compiler's target (AVX-512:
    16 floats; otherwise 8): blocking for a wider machine spills on every step."""
    import shutil
    import subprocess

    compiler = shutil.which("gcc") or shutil.which("cc")
    macros = subprocess.run([compiler, "-march=native", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True, check=True).stdout
    expected = 16 if "#define __AVX512F__ 1" in macros else 8
    assert native.library().tova_vector_floats() == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("tiling", list(TILINGS), ids=str)
def test_key_logits_equal_torch_over_placed_keys(tiling, group, dtype):
    block_size, head_size, tile, pair = TILINGS[tiling]
    layout = _tiled_layout(block_size, head_size, tile, pair)
    gen = torch.Generator().manual_seed(block_size * 31 + group * 7 + pair)
    kv_heads, num_blocks = 2, 9
    live = torch.tensor([2 * block_size + 3, block_size, 1])
    per_row = -(-int(live.max()) // block_size)
    table = torch.randperm(num_blocks, generator=gen)[: 3 * per_row].view(3, per_row)
    pages = torch.randn(num_blocks, kv_heads, 2 * block_size, head_size, generator=gen).to(dtype)
    keys = torch.randn(3, per_row * block_size, kv_heads, head_size, generator=gen).to(dtype)
    _place_keys(pages, layout, table, keys)
    query = torch.randn(3, kv_heads * group, head_size, generator=gen).to(dtype)

    got = native.key_logits(pages, layout, table, query, 0.125, live=live)
    assert got.shape == (3, kv_heads, group, per_row * block_size)
    expected = gqa_logits(query, keys.transpose(1, 2), 0.125)
    for e in range(3):
        n = int(live[e])
        torch.testing.assert_close(got[e, ..., :n], expected[e, ..., :n], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(got[e, ..., n:]).all()
    unmasked = native.key_logits(pages, layout, table, query, 0.125)
    torch.testing.assert_close(unmasked, expected, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_key_logits_split_over_threads_give_the_same_bits(dtype):
    """Large enough to be split (the C code runs small calls on one thread)."""
    gen = torch.Generator().manual_seed(3)
    block_size, head_size, kv_heads, group, rows, per_row = 32, 128, 4, 4, 8, 9
    layout = _tiled_layout(block_size, head_size, block_size, 1)
    pages = torch.randn(rows * per_row, kv_heads, 2 * block_size, head_size, generator=gen).to(dtype)
    table = torch.randperm(rows * per_row, generator=gen).view(rows, per_row)
    query = torch.randn(rows, kv_heads * group, head_size, generator=gen)
    live = torch.randint(1, per_row * block_size + 1, (rows,), generator=gen)
    one = native.key_logits(pages, layout, table, query, 0.1, live=live)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = native.key_logits(pages, layout, table, query, 0.1, live=live)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)

def test_bad_block_ids_and_slots_raise():
    layout = _tiled_layout(16, 32, 16, 1)
    pages = torch.zeros(4, 1, 32, 32)
    query = torch.zeros(1, 1, 32)
    for bad in (4, -1):
        with pytest.raises(IndexError):
            native.key_logits(pages, layout, torch.tensor([[0, bad]]), query, 1.0)
    elements = slot_elements(layout, 1)
    pages = torch.randn(4, 1, 32, 32)
    before = pages.clone()
    # Checked in C before any write: the good first pair must not have been copied either.
    for src, dst in (([3, 5], [7, 64]), ([3, -1], [7, 9]), ([3, 9], [7, 64])):
        with pytest.raises(IndexError):
            native.copy_slots(pages, elements, torch.tensor(src), torch.tensor(dst))
        with pytest.raises(IndexError):
            native.copy_slots([pages, pages], elements, torch.tensor(src),
                              torch.tensor([dst, [1, 2]]))
        assert torch.equal(pages, before)

def _copy_cases():
    for dtype in (torch.float32, torch.bfloat16, torch.uint8):
        yield dtype, "vllm"
        yield dtype, "amx-16x2"

@pytest.mark.parametrize("dtype,layout_name", list(_copy_cases()), ids=str)
def test_copy_slots_equals_indexing(dtype, layout_name):
    block_size, head_size, kv_heads, num_blocks = 32, 64, 2, 6
    if layout_name == "vllm":
        probe_dtype = torch.float32 if dtype == torch.uint8 else dtype
        layout = probe_page_layout(_get_attn_isa(probe_dtype, block_size, head_size, "auto"),
                                   probe_dtype, block_size, head_size)
    else:
        layout = _tiled_layout(block_size, head_size, 16, 2)
    gen = torch.Generator().manual_seed(11)
    if dtype == torch.uint8:
        pages = torch.randint(0, 256, (num_blocks, kv_heads, 2 * block_size, head_size),
                              generator=gen, dtype=torch.uint8)
    else:
        pages = torch.randn(num_blocks, kv_heads, 2 * block_size, head_size, generator=gen).to(dtype)
    elements = slot_elements(layout, kv_heads)
    slots = torch.randperm(num_blocks * block_size, generator=gen)
    src, dst = slots[:40], slots[40:80]
    src = torch.cat([src, slots[80:82]])  # equal pairs are allowed: a no-op
    dst = torch.cat([dst, slots[80:82]])
    expected = pages.clone()
    flat = expected.view(-1)
    flat[slot_index(elements, dst, expected)] = flat[slot_index(elements, src, expected)]
    assert native.copy_slots(pages, elements, src, dst)
    assert torch.equal(pages, expected)

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("block_size,head_size,q_heads,kv_heads",
                         [(16, 64, 9, 3), (32, 128, 32, 8), (32, 80, 4, 2)])
def test_evictor_with_and_without_the_library_moves_the_same_tokens(
        monkeypatch, dtype, block_size, head_size, q_heads, kv_heads):
    gen = torch.Generator().manual_seed(block_size + head_size + q_heads)
    evictor, caches, queries, ev = decode_case(dtype, block_size, head_size, q_heads,
                                               kv_heads, 3,
                                               [2 * block_size - 1, block_size + 5, 7], gen)
    with_lib = [c.clone() for c in caches]
    layer_batch = [c.clone() for c in caches]
    for query, pages in zip(queries, with_lib):
        evictor.evict(query, pages, ev)

    def no_copy(*args, **kwargs):
        raise AssertionError("the layer batch copied K blocks: the in-place path did not run")

    monkeypatch.setattr(cpu_evictor, "copy_key_blocks", no_copy)
    evictor.evict_layers(queries, layer_batch, ev)
    monkeypatch.undo()

    native.library.cache_clear()
    monkeypatch.setenv("TOVA_VLLM_NATIVE", "0")
    try:
        without = [c.clone() for c in caches]
        for query, pages in zip(queries, without):
            evictor.evict(query, pages, ev)
    finally:
        monkeypatch.delenv("TOVA_VLLM_NATIVE")
        native.library.cache_clear()
    for a, b, c, original in zip(with_lib, without, layer_batch, caches):
        assert not torch.equal(a, original)  # something moved
        assert torch.equal(a, b)
        assert torch.equal(c, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers,rows,width", [(1, 1, 2), (2, 5, 17), (3, 8, 65), (30, 16, 66)])
@pytest.mark.parametrize("values", ["random", "ties", "nan"])
def test_decode_drops_equal_position_to_drop(dtype, layers, rows, width, values):
    gen = torch.Generator().manual_seed(layers * 100 + rows)
    if values == "random":
        scores = torch.rand(layers, rows, width, generator=gen, dtype=dtype)
    else:  # few distinct values: many exactly equal lowest scores
        scores = torch.randint(0, 3, (layers, rows, width), generator=gen).to(dtype)
    if values == "nan":
        scores[torch.rand(scores.shape, generator=gen) < 0.05] = float("nan")
    live = torch.randint(1, width + 1, (rows,), generator=gen).to(torch.int32)
    live[0] = width
    padding = torch.arange(width).unsqueeze(0) >= live.unsqueeze(1)
    scores.masked_fill_(padding, -5.0)  # what padding holds must not matter
    slots = torch.randperm(rows * width * 2, generator=gen)[: rows * width].view(rows, width)
    src, dst = native.decode_drops(scores, live, slots)
    drop = position_to_drop(scores, live, padding)
    rows_ids = torch.arange(rows)
    assert torch.equal(src, slots[rows_ids, live.long() - 1])
    assert torch.equal(dst, slots[rows_ids.expand(layers, rows), drop])


@pytest.mark.parametrize("layers,rows,width", [(1, 1, 2), (2, 5, 17), (3, 8, 65), (30, 16, 66)])
@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_position_drops_equal_the_rules_keep_scores(layers, rows, width, values):
    """``position_drops`` (new positions written, drops chosen, side state moved, all in
    C) leaves the same arrays and gives the same moves as: write, then the rule's keep
    scores through ``position_to_drop``, then the moves in torch."""
    from tova_vllm.policies.registry import NO_POSITION_PROTECTED, PROTECTED

    gen = torch.Generator().manual_seed(layers * 100 + rows + width)
    size = rows * width * 2 + 1
    high = 5 if values == "ties" else 2**20  # few distinct positions: equal lowest keys
    arrays = [torch.randint(-3, high, (size,), generator=gen, dtype=torch.int32)
              for _ in range(layers)]
    live = torch.randint(1, width + 1, (rows,), generator=gen).to(torch.int32)
    live[0] = width
    slots = torch.randperm(size - 1, generator=gen)[: rows * width].view(rows, width)
    protect = torch.randint(-2, 7, (rows,), generator=gen)
    protect[::3] = NO_POSITION_PROTECTED
    new_slots = slots[torch.arange(rows), live.long() - 1]
    new_positions = torch.randint(0, high, (rows,), generator=gen)

    want = [a.clone() for a in arrays]
    for a in want:
        a[new_slots] = new_positions.to(torch.int32)
    positions = torch.stack([a[slots] for a in want]).long()
    scores = positions.double() + (positions < protect.view(1, -1, 1)).double() * PROTECTED
    padding = torch.arange(width).unsqueeze(0) >= live.unsqueeze(1)
    drop = position_to_drop(scores, live, padding)
    row_ids = torch.arange(rows)
    want_src = slots[row_ids, live.long() - 1]
    want_dst = slots[row_ids.expand(layers, rows), drop]
    for a, dst in zip(want, want_dst):
        a[dst] = a[want_src]

    src, dst = native.position_drops(arrays, live, slots, protect, new_slots, new_positions)
    assert torch.equal(src, want_src) and torch.equal(dst, want_dst)
    for got, w in zip(arrays, want):
        assert torch.equal(got, w)
    assert (dst != src).any()  # some row moved


def test_position_drops_reject_bad_slots_and_write_nothing():
    arrays = [torch.arange(10, dtype=torch.int32) for _ in range(2)]
    before = [a.clone() for a in arrays]
    slots = torch.tensor([[0, 3, 5]])
    for bad in (dict(live=torch.tensor([0])), dict(live=torch.tensor([4])),
                dict(slots=torch.tensor([[0, 10, 5]])), dict(new_slots=torch.tensor([-1]))):
        args = dict(live=torch.tensor([3]), slots=slots, new_slots=torch.tensor([5]))
        args.update(bad)
        with pytest.raises(IndexError):
            native.position_drops(arrays, args["live"], args["slots"], torch.tensor([0]),
                                  args["new_slots"], torch.tensor([7]))
        assert all(torch.equal(a, b) for a, b in zip(arrays, before))
    with pytest.raises(ValueError):
        native.position_drops(arrays, torch.tensor([3, 3]), slots, torch.tensor([0]),
                              torch.tensor([5]), torch.tensor([7]))


def test_decode_drops_reject_bad_live_and_shapes():
    for live in ([0], [4]):
        with pytest.raises(IndexError):
            native.decode_drops(torch.zeros(1, 1, 3), torch.tensor(live), torch.zeros(1, 3))
    with pytest.raises(ValueError):
        native.decode_drops(torch.zeros(1, 1, 3), torch.tensor([2]), torch.zeros(1, 4))
