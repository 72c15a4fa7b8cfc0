"""Steady decode's eviction batched over layers (``layer_batch.py``) against evicting layer
by layer, and in the engine against the reference.

* ``CpuEvictor.evict_layers`` leaves every layer's cache exactly as ``CpuEvictor.evict``
  run on each layer alone does (same token dropped, same move), over a grid of dtypes,
  block sizes, head shapes (both CPU ISAs), budgets that differ per row, and layer counts;
* ``LayerBatch`` runs the eviction when its last layer arrives, refuses a layer after
  that, and a step that never saw all its layers fails when the next step is built;
* rows whose policies all have a position rule (``window``, ``sink_window``) take their
  drops from the side state's positions in one C call, with the same result;
* in the engine, steady decode goes through the batch (counted) and the tokens equal the
  plain-PyTorch reference, with the batch on and off.
"""

from __future__ import annotations

import pytest
import torch
from cpu_cases import decode_case

from tova_vllm.engine.cpu_evictor import CpuEvictor
from tova_vllm.engine.layer_batch import LayerBatch

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GRID = [
    (dtype, block_size, head_size, q_heads, kv_heads)
    for dtype in (torch.float32, torch.bfloat16)
    for block_size in (16, 32)
    for head_size, q_heads, kv_heads in ((64, 9, 3), (32, 4, 4), (80, 4, 2))
]
IDS = [f"{str(d).split('.')[-1]}-bs{b}-D{h}-{q}q{k}kv" for d, b, h, q, k in GRID]


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("dtype,block_size,head_size,q_heads,kv_heads", GRID, ids=IDS)
def test_evict_layers_equals_layer_by_layer(dtype, block_size, head_size, q_heads, kv_heads,
                                            num_layers, k_reader):
    gen = torch.Generator().manual_seed(block_size * 100 + head_size + num_layers)
    budgets = [7, 40, 2 * block_size, 1, 40]  # rows of different widths: padding in play
    evictor, caches, queries, ev = decode_case(dtype, block_size, head_size, q_heads,
                                               kv_heads, num_layers, budgets, gen,
                                               query_scale=3)

    original = [c.clone() for c in caches]
    expected = [c.clone() for c in caches]
    for query, pages in zip(queries, expected):
        evictor.evict(query, pages, ev)
    evictor.evict_layers(queries, caches, ev)
    for layer, (got, want, before) in enumerate(zip(caches, expected, original)):
        assert torch.equal(got, want), f"layer {layer}"
        assert not torch.equal(got, before), f"layer {layer}: nothing moved"


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("dtype,block_size,head_size,q_heads,kv_heads", GRID[::3],
                         ids=IDS[::3])
@pytest.mark.parametrize("names", [
    ("window", "tova", "sink_window", "tova", "window", "sink_window"),
    ("sink_window",) * 6,  # one group: the batch takes every row without gathers
    # Position rules only: drops chosen from the side state's positions, in C.
    ("window", "sink_window", "sink_window", "window", "window", "sink_window"),
])
def test_evict_layers_with_policy_groups_equals_layer_by_layer(
        dtype, block_size, head_size, q_heads, kv_heads, num_layers, names, k_reader,
        monkeypatch):
    """Rows of TOVA, ``window`` and ``sink_window`` in one batch: every layer's cache and
    side-state positions end exactly as evicting layer by layer through the general path
    leaves them (accumulated attention is not kept by a batched step: none of its rows
    accumulates, and a slot's is reset when an accumulating request writes it).  The
    batch writes the new tokens' positions itself (``new_positions``); when every row's
    policy has a position rule it picks the drops from positions alone."""
    from tova_vllm.engine import native
    from tova_vllm.engine.side_state import SlotSideState, group_rows
    from tova_vllm.policies import EvictionPolicy

    by_position = []
    original_drops = native.position_drops

    def spy(*args):
        moves = original_drops(*args)
        by_position.append(moves is not None)
        return moves

    monkeypatch.setattr(native, "position_drops", spy)

    gen = torch.Generator().manual_seed(block_size * 10 + head_size + num_layers)
    budgets = [7, 40, 2 * block_size, 9, 40, 12]
    policies = [EvictionPolicy(name) for name in names]
    evictor, caches, queries, ev = decode_case(dtype, block_size, head_size, q_heads,
                                               kv_heads, num_layers, budgets, gen,
                                               query_scale=3)
    sides = []
    for pages in caches:
        side = SlotSideState(pages.shape[0] * block_size, torch.device("cpu"))
        for e, budget in enumerate(budgets):
            # Distinct logical positions below the query's, shuffled over the cache slots
            # (evictions reorder a cache): the lowest is not at cache position 0.
            logical = torch.randperm(budget + 60, generator=gen)[: budget + 1]
            side.write(ev.slots[e, : budget + 1], logical)
        side.accumulated.uniform_(generator=gen)
        sides.append(side)
    groups = group_rows(policies, torch.device("cpu"))
    # The new tokens sit at each row's last live position; their positions are the
    # batch's to write (garbage there until it does).
    new_slots = ev.slots[torch.arange(len(budgets)), ev.live.long() - 1]
    new_positions = sides[0].positions[new_slots].long() + 60
    for side in sides:
        side.positions[new_slots] = new_positions.to(torch.int32)

    expected_caches = [c.clone() for c in caches]
    expected_sides = [(s.positions.clone(), s.accumulated.clone()) for s in sides]
    for layer in range(num_layers):
        side = SlotSideState(sides[layer].num_slots, torch.device("cpu"))
        side.positions, side.accumulated = expected_sides[layer]
        evictor.evict(queries[layer], expected_caches[layer], ev, groups=groups, side=side)
    original = [c.clone() for c in caches]
    for side in sides:
        side.positions[new_slots] = -7
    evictor.evict_layers(queries, caches, ev, groups, sides,
                         new_positions=(new_slots, new_positions))
    # (Without the library, ``k_reader`` "torch copy", the general path runs.)
    assert by_position == ([native.library() is not None] if "tova" not in names else [])
    for layer in range(num_layers):
        assert torch.equal(caches[layer], expected_caches[layer]), f"layer {layer}"
        assert not torch.equal(caches[layer], original[layer]), f"layer {layer}: nothing moved"
        assert torch.equal(sides[layer].positions, expected_sides[layer][0]), f"layer {layer}"


def test_layer_batch_writes_every_layers_side_state_positions(k_reader):
    """The batch writes the new slots' positions into every layer's side state before it
    evicts (the layers themselves do not, in a batched step)."""
    from tova_vllm.engine.side_state import write_positions
    from tova_vllm.engine.side_state import SlotSideState

    sides = [SlotSideState(50, torch.device("cpu")) for _ in range(3)]
    for side in sides:
        side.positions.random_(0, 1000)
    want = [side.positions.clone() for side in sides]
    slots, positions = torch.tensor([3, 17, 49, 0]), torch.tensor([100, 7, 65536, 2])
    for w in want:
        w[slots] = positions.to(torch.int32)
    write_positions(sides, slots, positions)
    for side, w in zip(sides, want):
        assert torch.equal(side.positions, w)
    with pytest.raises(IndexError):  # past the spare entry (slot 50)
        write_positions(sides, torch.tensor([51]), torch.tensor([1]))


class _CountingEvictor:
    def __init__(self):
        self.calls = []

    def evict_layers(self, queries, caches, ev, groups=None, sides=None, scores=None,
                     new_positions=None):
        self.calls.append((list(queries), list(caches)))


def test_layer_batch_runs_once_when_the_last_layer_arrives():
    evictor = _CountingEvictor()
    batch = LayerBatch(evictions=None, num_layers=3)
    for layer in range(3):
        assert not evictor.calls
        batch.add(evictor, f"cache{layer}", torch.full((2, 1), layer))
    assert len(evictor.calls) == 1 and evictor.calls[0][1] == ["cache0", "cache1", "cache2"]
    batch.check_finished()
    with pytest.raises(RuntimeError, match="after its step's eviction"):
        batch.add(evictor, "late", torch.zeros(2, 1))


def test_layer_batch_that_missed_a_layer_fails_loudly():
    batch = LayerBatch(evictions=None, num_layers=2)
    batch.add(_CountingEvictor(), "cache0", torch.zeros(1))
    with pytest.raises(RuntimeError, match="1 of 2 layers"):
        batch.check_finished()


@pytest.mark.parametrize("layer_batch", ["1", "0"])
def test_engine_decode_through_the_layer_batch_equals_reference(tiny_models, hf_models,
                                                                monkeypatch, layer_batch):
    from engine_harness import Req, random_prompts, run_equals_reference

    monkeypatch.setenv("TOVA_VLLM_LAYER_BATCH", layer_batch)
    calls, scored = [], []  # per batched step: policy groups given / scores from attention
    original = CpuEvictor.evict_layers

    def spy(self, queries, caches, ev, groups=None, sides=None, **kw):
        calls.append(groups is not None)
        scored.append(kw.get("scores") is not None)
        return original(self, queries, caches, ev, groups, sides, **kw)

    in_attention = []  # per batched step: every layer's attention evicted its rows
    original_add = LayerBatch.add

    def spy_add(self, evictor, cache, queries, side=None):
        last = len(self.caches) == self.num_layers - 1
        original_add(self, evictor, cache, queries, side)
        if last:
            in_attention.append(self.row_evictions is not None)

    monkeypatch.setattr(CpuEvictor, "evict_layers", spy)
    monkeypatch.setattr(LayerBatch, "add", spy_add)
    prompts = random_prompts([5, 30, 90, 17, 40, 60], seed=3)
    # Per-request budgets (rows of different widths) and policies in one batch; window
    # and sink_window decode through the batch too (H2O accumulates: layer by layer).
    extra = [{}, {"tova_cache_size": 24}, {}, {}, {"tova_policy": "window"},
             {"tova_policy": "sink_window", "tova_cache_size": 20}]
    # The window rows finish first: the last steps hold TOVA rows only.
    requests = [Req(p, 25 if "tova_policy" in x else 40, 0, x) for p, x in zip(prompts, extra)]
    run_equals_reference(tiny_models["llama_gqa"], hf_models["llama_gqa"], requests,
                         {"cache_size": 32})
    assert (len(calls) > 0) == (layer_batch == "1")
    # Steps with window rows went through the batch with their policy groups; steps of
    # TOVA rows only (after the window rows finished) took their scores from attention,
    # which also evicted (one process, no tensor parallelism: nothing left for the batch).
    assert all(calls) and any(calls) == (layer_batch == "1")
    assert not any(scored)
    assert any(in_attention) == (layer_batch == "1")
    assert len(in_attention) == len(calls) + sum(in_attention)


@pytest.mark.parametrize("attention", ["1", "0"])
def test_position_only_rows_hand_over_no_queries(tiny_models, hf_models, monkeypatch,
                                                 attention):
    """Steps whose rows are all `window` / `sink_window` (scores from positions alone)
    batch without gathering any layer's queries and pick every drop from the side state's
    positions, never from keep scores: in each layer's attention call (``native.
    RowEvictions`` with positions), or with ``TOVA_VLLM_ATTENTION_SCORES=0`` at the step's
    end (``native.position_drops``); the tokens equal the reference either way."""
    from engine_harness import Req, random_prompts, run_equals_reference

    from tova_vllm.engine import native

    monkeypatch.setenv("TOVA_VLLM_ATTENTION_SCORES", attention)
    handed = []  # per step evicted at its end: whether each layer handed over queries
    by_position = []  # per such step: drops chosen from positions in C
    in_attention = []  # per batched step: every layer's attention evicted by position
    original = CpuEvictor.evict_layers
    original_drops = native.position_drops
    original_add = LayerBatch.add

    def spy(self, queries, caches, ev, groups=None, sides=None, **kw):
        handed.append([q is not None for q in queries])
        return original(self, queries, caches, ev, groups, sides, **kw)

    def spy_drops(*args):
        moves = original_drops(*args)
        by_position.append(moves is not None)
        return moves

    def spy_add(self, evictor, cache, queries, side=None):
        last = len(self.caches) == self.num_layers - 1
        original_add(self, evictor, cache, queries, side)
        if last:
            assert self.protect is not None
            in_attention.append(self.row_evictions is not None)

    monkeypatch.setattr(CpuEvictor, "evict_layers", spy)
    monkeypatch.setattr(CpuEvictor, "_layer_policy_scores", None)  # never scored
    monkeypatch.setattr(native, "position_drops", spy_drops)
    monkeypatch.setattr(LayerBatch, "add", spy_add)
    prompts = random_prompts([5, 30, 90, 40], seed=5)
    extra = [{"tova_policy": "window"}, {"tova_policy": "sink_window", "tova_cache_size": 20},
             {"tova_policy": "sink_window"}, {"tova_policy": "window", "tova_cache_size": 24}]
    requests = [Req(p, 30, 0, x) for p, x in zip(prompts, extra)]
    run_equals_reference(tiny_models["llama_gqa"], hf_models["llama_gqa"], requests,
                         {"cache_size": 32})
    assert not any(any(step) for step in handed)
    assert by_position == [True] * len(handed)
    assert len(in_attention) == len(handed) + sum(in_attention)
    if attention == "1":
        assert in_attention and all(in_attention)
    else:
        assert handed and not any(in_attention)
