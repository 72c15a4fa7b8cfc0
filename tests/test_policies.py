"""Unit tests of the pure-torch policy code: schedule, scoring, selection, compaction."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tova_vllm.policies import (
    EvictionSchedule,
    compaction_moves,
    head_summed_probs,
    prompt_eviction_moves,
    position_to_drop,
    positions_to_keep,
    head_mean,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# --------------------------------------------------------------------------- schedule


def _simulate(cache_size: int, prompt_len: int, prompt_chunk: int | None, total: int):
    """Token-by-token model of the schedule, written from the definition only.

    Returns (held after n tokens for n in 0..total, eviction points, peak while adding
    token n, i.e. the live count right after appending it).
    """
    held, evictions, after, peak_at = 0, [], [0], []
    for n in range(total):
        held += 1
        peak_at.append(held)
        boundary = n + 1 >= prompt_len or (prompt_chunk is not None and (n + 1) % prompt_chunk == 0)
        if boundary and held > cache_size:
            held = cache_size
            evictions.append(n + 1)
        after.append(held)
    return after, evictions, peak_at


SCHEDULES = [
    # (cache_size, prompt_len, prompt_chunk)
    (4, 10, None),
    (4, 3, None),
    (1, 5, None),
    (3, 7, 2),
    (3, 7, 1),
    (5, 20, 4),
    (8, 20, 3),
    (6, 6, 6),
    (6, 6, 100),
    (10, 4, 2),
]


def test_live_after_prompt_mode_by_hand():
    s = EvictionSchedule(4, prompt_len=10)
    assert [s.live_after(n) for n in range(13)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4, 4, 4]
    # Prompt shorter than the cache: nothing to evict until decode passes C.
    s = EvictionSchedule(4, prompt_len=3)
    assert [s.live_after(n) for n in range(7)] == [0, 1, 2, 3, 4, 4, 4]


def test_live_after_chunked_mode_by_hand():
    # C=3, K=2, P=7: boundaries 2, 4, 6, 7, 8, ...; at 2 nothing exceeds C.
    s = EvictionSchedule(3, prompt_len=7, prompt_chunk=2)
    assert [s.live_after(n) for n in range(10)] == [0, 1, 2, 3, 3, 4, 3, 3, 3, 3]


def test_segments_by_hand():
    s = EvictionSchedule(4, prompt_len=10)
    assert list(s.segments(0, 10)) == [(0, 10, True)]
    assert list(s.segments(10, 1)) == [(10, 11, True)]
    # A scheduler chunk inside the prompt never evicts in prompt mode.
    assert list(s.segments(2, 5)) == [(2, 7, False)]

    s = EvictionSchedule(4, prompt_len=3)
    assert list(s.segments(0, 3)) == [(0, 3, False)]
    assert list(s.segments(3, 1)) == [(3, 4, False)]
    assert list(s.segments(4, 1)) == [(4, 5, True)]

    s = EvictionSchedule(3, prompt_len=7, prompt_chunk=2)
    # Boundary 2 does not split (2 <= C); 4, 6 and the prompt end 7 evict.
    assert list(s.segments(0, 7)) == [(0, 4, True), (4, 6, True), (6, 7, True)]
    # A chunk the scheduler cut elsewhere splits at the same fixed points.
    assert list(s.segments(3, 3)) == [(3, 4, True), (4, 6, True)]
    assert list(s.segments(3, 2)) == [(3, 4, True), (4, 5, False)]


def test_peak_live_by_hand():
    assert EvictionSchedule(3, prompt_len=7, prompt_chunk=2).peak_live(0, 7) == 5  # C + K
    assert EvictionSchedule(4, prompt_len=10).peak_live(0, 10) == 10  # the whole prompt
    assert EvictionSchedule(4, prompt_len=10).peak_live(10, 1) == 5  # C + 1 in decode


@pytest.mark.parametrize("cache_size,prompt_len,prompt_chunk", SCHEDULES)
def test_schedule_matches_token_by_token_model(cache_size, prompt_len, prompt_chunk):
    total = prompt_len + 12
    after, evictions, _ = _simulate(cache_size, prompt_len, prompt_chunk, total)
    s = EvictionSchedule(cache_size, prompt_len, prompt_chunk)
    assert [s.live_after(n) for n in range(total + 1)] == after

    segs = list(s.segments(0, total))
    assert [e for _, e, evicts in segs if evicts] == evictions
    # Segments tile the range, and end only at evictions or at the end.
    assert segs[0][0] == 0 and segs[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(segs))
    assert all(evicts or e == total for _, e, evicts in segs)
    # Copy-on-write starts at the first eviction; the block base moves there, once.
    assert s.first_eviction() == (evictions[0] if evictions else s.first_eviction())
    if evictions:
        for block_size in (1, 4, 32):
            base = -(-evictions[0] // block_size)
            assert [s.private_base(n, block_size) for n in range(total + 1)] == [
                base if n >= evictions[0] else 0 for n in range(total + 1)]


@pytest.mark.parametrize("cache_size,prompt_len,prompt_chunk", SCHEDULES)
def test_tokens_evicted_matches_token_by_token_model(cache_size, prompt_len, prompt_chunk):
    """What ``/metrics`` counts per scheduled stretch (decode has a shortcut): the tokens
    that entered minus the growth of the live count, over every stretch."""
    total = prompt_len + 12
    after, _, _ = _simulate(cache_size, prompt_len, prompt_chunk, total)
    s = EvictionSchedule(cache_size, prompt_len, prompt_chunk)
    for start in range(total):
        for num_new in range(1, total - start + 1):
            assert s.tokens_evicted(start, num_new) == (
                after[start] + num_new - after[start + num_new]), (start, num_new)


@pytest.mark.parametrize("cache_size,prompt_len,prompt_chunk", SCHEDULES)
@pytest.mark.parametrize("block_size", (1, 4, 32))
def test_table_blocks_cover_every_position_written(cache_size, prompt_len, prompt_chunk,
                                                   block_size):
    """``table_blocks`` (what the KV manager allocates) is the highest block-table entry a
    stretch of tokens writes or gathers into, from the token-by-token model: in place,
    cache positions count from entry 0; copy-on-write, from the block base, and the first
    eviction's survivors land at the new base."""
    total = prompt_len + 12
    after, evictions, peak_at = _simulate(cache_size, prompt_len, prompt_chunk, total)
    s = EvictionSchedule(cache_size, prompt_len, prompt_chunk)
    first = evictions[0] if evictions else None

    def entries(n: int, cow: bool) -> int:  # entries token n (0-based) writes up to
        base = -(-first // block_size) if cow and first is not None and n >= first else 0
        need = base + -(-peak_at[n] // block_size)
        if cow and first is not None and n + 1 == first:
            need = max(need, -(-first // block_size) + -(-cache_size // block_size))
        return need

    for cow in (False, True):
        for start in range(0, total, 7):
            for num_new in sorted({1, min(5, total - start), total - start}):
                want = max(entries(n, cow) for n in range(start, start + num_new))
                base = -(-first // block_size) if cow and first and start >= first else 0
                want = max(want, base + -(-after[start] // block_size))
                assert s.table_blocks(start, num_new, block_size, cow) == want, (
                    cow, start, num_new)


@pytest.mark.parametrize("cache_size,prompt_len,prompt_chunk", SCHEDULES)
@pytest.mark.parametrize("seed", range(5))
def test_segments_do_not_depend_on_scheduler_chunks(cache_size, prompt_len, prompt_chunk, seed):
    total = prompt_len + 10
    after, evictions, peak_at = _simulate(cache_size, prompt_len, prompt_chunk, total)
    s = EvictionSchedule(cache_size, prompt_len, prompt_chunk)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), k=min(total - 1, rng.randint(1, 6))))
    seen = []
    for start, end in itertools.pairwise([0, *cuts, total]):
        segs = list(s.segments(start, end - start))
        seen += [e for _, e, evicts in segs if evicts]
        # Live count before the chunk + its tokens, evicting at the fixed points.
        assert s.peak_live(start, end - start) == max([after[start], *peak_at[start:end]])
    assert seen == evictions


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        EvictionSchedule(0, prompt_len=5)
    with pytest.raises(ValueError):
        EvictionSchedule(4, prompt_len=5, prompt_chunk=0)


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_head_summed_probs_matches_naive_loop(q_heads, kv_heads):
    g = torch.Generator().manual_seed(q_heads * 10 + kv_heads)
    rows, slots, dim = 3, 9, 16
    query = torch.randn(rows, q_heads, dim, generator=g)
    keys = torch.randn(rows, kv_heads, slots, dim, generator=g)
    live = torch.tensor([9, 4, 1])
    scale = dim**-0.5
    got = head_summed_probs(query, keys, scale, live)
    group = q_heads // kv_heads
    for r in range(rows):
        n = int(live[r])
        want = torch.zeros(slots, dtype=torch.float64)
        for h in range(q_heads):
            kv = keys[r, h // group]
            logits = torch.tensor([float(query[r, h] @ kv[j]) * scale for j in range(n)])
            want[:n] += torch.softmax(logits.double(), dim=0)
        torch.testing.assert_close(got[r].double(), want, atol=1e-6, rtol=1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(head_mean(got, q_heads).sum(-1), torch.ones(rows))


# --------------------------------------------------------------------------- selection


def test_positions_to_keep_by_hand():
    scores = torch.tensor([0.1, 0.5, 0.1, 0.3, 0.1])
    # Ties at 0.1 in slots 0, 2, 4: the lowest slot ranks first, the highest is dropped.
    assert positions_to_keep(scores, 3).tolist() == [0, 1, 3]
    assert positions_to_keep(scores, 4).tolist() == [0, 1, 2, 3]
    assert positions_to_keep(torch.full((6,), 0.25), 4).tolist() == [0, 1, 2, 3]
    assert positions_to_keep(scores, 5).tolist() == [0, 1, 2, 3, 4]


def test_position_to_drop_by_hand():
    scores = torch.tensor(
        [
            [0.3, 0.1, 0.2, 0.1, 0.0],  # tie at 0.1 (slots 1, 3); slot 4 is padding
            [0.5, 0.5, 0.5, 0.5, 0.5],  # all equal: the highest live slot
            [0.9, 0.0, 0.8, 9.0, 9.0],  # clear minimum
        ]
    )
    live = torch.tensor([4, 5, 3])
    assert position_to_drop(scores, live).tolist() == [3, 4, 1]


def _reference_drop(scores: list[float]) -> int:
    """The documented rule, spelled out: lowest score; among equals, the highest slot."""
    low = min(scores)
    return max(j for j, s in enumerate(scores) if s == low)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_position_to_drop_agrees_with_positions_to_keep(seed, tied):
    g = torch.Generator().manual_seed(seed)
    rows, slots = 6, 12
    if tied:  # few distinct values: many exact ties
        scores = torch.randint(0, 3, (rows, slots), generator=g).float()
    else:
        scores = torch.rand(rows, slots, generator=g)
    live = torch.randint(1, slots + 1, (rows,), generator=g)
    dropped = position_to_drop(scores, live)
    for r in range(rows):
        n = int(live[r])
        row = scores[r, :n]
        kept = positions_to_keep(row, n - 1).tolist()
        (missing,) = set(range(n)) - set(kept)
        assert int(dropped[r]) == missing == _reference_drop(row.tolist())


@pytest.mark.parametrize("seed", range(20))
def test_positions_to_keep_is_top_k_with_slot_tie_break(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 30)
    keep = rng.randint(1, n)
    values = [rng.choice([0.0, 0.25, 0.5, 1.0]) if seed % 2 else rng.random() for _ in range(n)]
    kept = positions_to_keep(torch.tensor(values), keep).tolist()
    want = sorted(sorted(range(n), key=lambda j: (-values[j], j))[:keep])
    assert kept == want


def test_compaction_moves_by_hand():
    src, dst = compaction_moves(torch.tensor([0, 2, 5, 6]), 4)
    assert src.tolist() == [5, 6] and dst.tolist() == [1, 3]
    # Decode: C + 1 slots, one dropped.
    src, dst = compaction_moves(torch.tensor([0, 1, 3, 4]), 4)
    assert src.tolist() == [4] and dst.tolist() == [2]
    # The newest token itself dropped: nothing moves.
    src, dst = compaction_moves(torch.tensor([0, 1, 2, 3]), 4)
    assert src.numel() == 0 and dst.numel() == 0


@pytest.mark.parametrize("seed", range(30))
def test_compaction_moves_pack_kept_slots(seed):
    rng = random.Random(seed)
    keep = rng.randint(1, 16)
    total = keep + rng.randint(1, 20)
    kept = torch.tensor(sorted(rng.sample(range(total), keep)))
    src, dst = compaction_moves(kept, keep)
    cache = list(range(total))  # slot -> token id
    for s, d in zip(src.tolist(), dst.tolist()):
        cache[d] = cache[s]
    assert sorted(cache[:keep]) == kept.tolist()
    # Survivors already below the budget stay put; movers go in ascending order.
    assert all(cache[j] == j for j in kept.tolist() if j < keep)
    assert src.tolist() == sorted(src.tolist()) and dst.tolist() == sorted(dst.tolist())
    assert all(s >= keep for s in src.tolist()) and all(d < keep for d in dst.tolist())


@pytest.mark.parametrize("seed", range(40))
def test_prompt_eviction_moves_equal_the_per_row_rules(seed):
    """The batched fixed-shape prompt selection (the CUDA path's, no host read-back) makes
    exactly the moves of positions_to_keep + compaction_moves row by row: tied scores, any
    padding values, a loose max_keep bound."""
    g = torch.Generator().manual_seed(seed)
    rows, width = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(2, 50, (1,), generator=g))
    live = torch.randint(1, width + 1, (rows,), generator=g)
    keep = torch.stack([torch.randint(1, int(n) + 1, (1,), generator=g)[0] for n in live])
    scores = torch.rand(rows, width, generator=g, dtype=torch.float64)
    if seed % 2:
        scores = (scores * 3).floor()  # many ties
    padding = torch.arange(width).unsqueeze(0) >= live.unsqueeze(1)
    scores[padding] = (float("inf"), float("nan"), 5.0)[seed % 3]
    max_keep = int(keep.max()) + seed % 3
    src, dst, row = prompt_eviction_moves(scores, live, keep, max_keep)
    assert src.shape == dst.shape == row.shape == (rows * min(max_keep, width),)
    total = 0
    for e in range(rows):
        kept = positions_to_keep(scores[e, : live[e]], int(keep[e]))
        want_src, want_dst = compaction_moves(kept, int(keep[e]))
        mine = row == e
        assert torch.equal(src[mine], want_src) and torch.equal(dst[mine], want_dst), e
        total += want_src.numel()
    assert int((row >= 0).sum()) == total and bool(((row == -1) | (row >= 0)).all())

    # Copy-on-write: relocating rows move every survivor, to the cache position compaction
    # gives it (the same layout as in place); the other rows move as in place.
    relocate = torch.rand(rows, generator=g) < 0.5
    src, dst, row = prompt_eviction_moves(scores, live, keep, max_keep, relocate)
    for e in range(rows):
        kept = positions_to_keep(scores[e, : live[e]], int(keep[e]))
        want_src, want_dst = compaction_moves(kept, int(keep[e]))
        layout = {int(p): int(p) for p in kept if p < keep[e]}
        layout.update({int(d): int(p) for p, d in zip(want_src, want_dst)})
        mine = row == e
        moves = set(zip(src[mine].tolist(), dst[mine].tolist()))
        if relocate[e]:
            assert moves == {(p, d) for d, p in layout.items()}, e
        else:
            assert moves == set(zip(want_src.tolist(), want_dst.tolist())), e


# --------------------------------------------------------------------------- baselines


def _kept_positions(policy, positions, cache_size, **inputs):
    scores = policy.keep_scores(
        cache_size=torch.tensor([cache_size]), query_position=positions.max().view(1),
        positions=positions.unsqueeze(0), **{k: v.unsqueeze(0) for k, v in inputs.items()},
    )[0]
    return set(positions[positions_to_keep(scores, cache_size)].tolist())


def _shuffled_positions(n: int, seed: int, gaps: bool = True) -> torch.Tensor:
    """Live positions in an arbitrary slot order; with gaps, like a cache after evictions."""
    rng = random.Random(seed)
    pool = range(3 * n) if gaps else range(n)
    chosen = sorted(rng.sample(pool, n)) if gaps else list(pool)
    rng.shuffle(chosen)
    return torch.tensor(chosen, dtype=torch.int32)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("cache_size", [1, 5, 16])
def test_window_keeps_the_most_recent(seed, cache_size):
    from tova_vllm.policies import EvictionPolicy

    positions = _shuffled_positions(cache_size + 7, seed)
    want = set(sorted(positions.tolist())[-cache_size:])
    assert _kept_positions(EvictionPolicy("window"), positions, cache_size) == want


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sinks,cache_size", [(4, 16), (1, 2), (0, 6), (3, 4)])
def test_sink_window_keeps_first_tokens_and_the_most_recent(seed, sinks, cache_size):
    from tova_vllm.policies import EvictionPolicy

    # The sinks are always live (they were never dropped), other positions have gaps.
    rest = _shuffled_positions(cache_size + 5, seed) + sinks
    positions = torch.cat((torch.arange(sinks, dtype=torch.int32), rest))
    positions = positions[torch.randperm(positions.numel(), generator=torch.Generator().manual_seed(seed))]
    want = set(range(sinks)) | set(sorted(rest.tolist())[-(cache_size - sinks):] if cache_size > sinks else [])
    assert _kept_positions(EvictionPolicy("sink_window", sinks=sinks), positions, cache_size) == want


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("recent,cache_size", [(None, 16), (3, 8), (0, 5), (1, 2)])
def test_h2o_keeps_recent_window_and_heaviest(seed, recent, cache_size):
    from tova_vllm.policies import EvictionPolicy

    n = cache_size + 9
    positions = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    accumulated = torch.rand(n, generator=torch.Generator().manual_seed(100 + seed)) * 3
    window = cache_size // 2 if recent is None else recent
    newest = n - 1
    protected = {p for p in range(n) if p > newest - window}
    others = sorted((p for p in range(n) if p not in protected),
                    key=lambda p: -float(accumulated[positions.tolist().index(p)]))
    want = protected | set(others[: cache_size - len(protected)])
    got = _kept_positions(EvictionPolicy("h2o", recent=recent), positions, cache_size,
                          accumulated=accumulated)
    assert got == want


def test_window_decode_rule_drops_the_oldest():
    from tova_vllm.policies import EvictionPolicy

    positions = torch.tensor([[7, 3, 9, 4, 12], [2, 8, 1, 0, 0]], dtype=torch.int32)
    scores = EvictionPolicy("window").keep_scores(
        cache_size=torch.tensor([4, 2]), query_position=torch.tensor([12, 8]), positions=positions)
    # Row 1 has 3 live slots; its padding (slots 3, 4) must not be chosen.
    assert position_to_drop(scores, torch.tensor([5, 3])).tolist() == [1, 2]


@pytest.mark.parametrize("sinks", [0, 1, 4, 17])
def test_position_rules_are_the_policies_keep_scores(sinks):
    """A policy that declares a position rule (the mechanism then picks drops from
    positions without its keep scores) scores exactly ``positions + PROTECTED *
    (positions < rule)``, int32 extremes and negative positions included."""
    from tova_vllm.policies import POLICY_NAMES, EvictionPolicy
    from tova_vllm.policies.registry import PROTECTED

    gen = torch.Generator().manual_seed(sinks)
    positions = torch.cat([
        torch.randint(-40, 2**20, (3, 50), generator=gen, dtype=torch.int32),
        torch.tensor([[-2**31, 2**31 - 1, -1, 0] + list(range(sinks - 2, sinks + 44))],
                     dtype=torch.int32)])
    declared = []
    for name in POLICY_NAMES:
        policy = EvictionPolicy(name, sinks=sinks)
        rule = policy.position_rule
        if rule is None:
            continue
        declared.append(name)
        inputs = {need: torch.rand(positions.shape, generator=gen)
                  for need in ("last_query_probs", "accumulated")}
        got = policy.keep_scores(cache_size=torch.full((4,), 30),
                                 query_position=torch.full((4,), 2**31 - 1),
                                 positions=positions, **inputs)
        want = positions.double() + (positions.long() < rule).double() * PROTECTED
        assert torch.equal(got.double(), want), name
    assert {"window", "sink_window"} <= set(declared)


def test_policy_validation():
    from tova_vllm.policies import EvictionPolicy

    for bad in ({"name": "lru"}, {"name": "window", "sinks": -1},
                {"name": "h2o", "recent": True}, {"name": "h2o", "recent": 2.5}):
        with pytest.raises(ValueError):
            EvictionPolicy(**bad)
    with pytest.raises(ValueError, match="sink"):
        EvictionPolicy("sink_window", sinks=4).check_budget(4)
    with pytest.raises(ValueError, match="recent"):
        EvictionPolicy("h2o", recent=8).check_budget(8)
    EvictionPolicy("h2o").check_budget(1)  # default: half of the budget
    with pytest.raises(ValueError, match="needs positions"):
        EvictionPolicy("window").keep_scores(cache_size=torch.tensor([1]),
                                             query_position=torch.tensor([1]))


@pytest.mark.parametrize("kv_heads,group,queries", [(1, 1, 1), (2, 4, 5), (4, 1, 3)])
def test_accumulated_from_logits_is_the_summed_softmax(kv_heads, group, queries):
    from tova_vllm.policies import accumulated_from_logits

    g = torch.Generator().manual_seed(kv_heads * 10 + queries)
    rows, slots = 2, 9
    logits = torch.randn(rows, kv_heads, group, queries, slots, generator=g)
    visible = torch.rand(rows, queries, slots, generator=g) > 0.3
    visible[0, 0] = False  # a query that sees nothing (padding) contributes nothing
    want = torch.zeros(rows, slots, dtype=torch.float64)
    for r in range(rows):
        for q in range(queries):
            seen = visible[r, q].nonzero().flatten().tolist()
            if not seen:
                continue
            for h in range(kv_heads):
                for j in range(group):
                    w = torch.softmax(logits[r, h, j, q, seen].double(), dim=0)
                    want[r, seen] += w
    torch.testing.assert_close(accumulated_from_logits(logits, visible).double(), want,
                               atol=1e-5, rtol=1e-5)


def test_registry_lists_every_policy_module_and_the_readme_table():
    import pathlib
    import pkgutil

    from tova_vllm.policies import POLICY_NAMES, policy_table, policy_units, units

    modules = {m.name for m in pkgutil.iter_modules(units.__path__)}
    assert set(POLICY_NAMES) == set(policy_units()) == modules
    assert POLICY_NAMES[0] == "tova"  # the default
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert policy_table() in readme
