"""Unit tests of ``plan_step``: phases, cache slots and eviction rows of one engine step.

Every batch is checked against ``_simulate``, a token-by-token model written from the
invariant in the README ("How it fits into vLLM"), not from ``EvictionSchedule``: a request holds ``live``
cache positions; each new token is written at position ``live`` and ``live`` grows by one;
after the token that completes ``b`` tokens, if ``b`` is a boundary (``b >= prompt_len``,
or in ``chunked`` mode ``b % prompt_chunk == 0``) and ``live > cache_size``, the last
query scores the cache and ``live`` drops back to ``cache_size``.  A request's new tokens
are cut after each eviction; phase k holds every request's k-th piece.

With copy-on-write (prefix caching on), the model also tracks each request's *block
base*: 0 until its first eviction, whose survivors go to the blocks from
``ceil(tokens processed / block_size)`` on, where its cache lives from then on.

Block tables are hand-made: every entry is a distinct, shuffled physical block id (none is
0), so reading the wrong row or the wrong column of the table changes a slot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from tova_vllm.engine.plan import RequestStep, plan_step

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BLOCK_SIZES = (4, 32)


# --------------------------------------------------------------------------- the model


@dataclass
class Piece:
    """One request's tokens in one phase, as the simulator sees them."""

    new_tokens: list[int]  # index among the request's new tokens
    positions: list[int]  # cache position each of them is written to
    evict: Optional[tuple[int, int]]  # (live before the eviction, keep) or None
    base: int = 0  # block index of cache position 0 while the piece is written
    dest_base: int = 0  # the block base the eviction's survivors land at


def _boundary(req: RequestStep, processed: int) -> bool:
    if processed >= req.prompt_len:
        return True
    return req.prompt_chunk is not None and processed % req.prompt_chunk == 0


def _simulate(req: RequestStep, block_size: int = 1, cow: bool = False) -> list[Piece]:
    live = base = 0
    evicted = False

    def dropped(processed: int) -> int:  # the block base after an eviction
        nonlocal evicted
        if cow and not evicted:
            evicted = True
            return -(-processed // block_size)
        return base

    for n in range(req.num_computed):  # replay what earlier steps did
        live += 1
        if _boundary(req, n + 1) and live > req.cache_size:
            live, base = req.cache_size, dropped(n + 1)
    pieces, tokens, positions = [], [], []
    for i in range(req.num_new):
        tokens.append(i)
        positions.append(live)
        live += 1
        processed = req.num_computed + i + 1
        if _boundary(req, processed) and live > req.cache_size:
            dest = dropped(processed)
            pieces.append(Piece(tokens, positions, (live, req.cache_size), base, dest))
            live, base = req.cache_size, dest
            tokens, positions = [], []
    if tokens:
        pieces.append(Piece(tokens, positions, None, base, base))
    return pieces


def _entries_needed(req: RequestStep, block_size: int, cow: bool) -> int:
    """Block-table entries the request ever touches up to the end of this step."""
    need = 1
    for piece in _simulate(req, block_size, cow):
        need = max(need, piece.base + 1 + max(piece.positions) // block_size)
        if piece.evict is not None:
            need = max(need, piece.dest_base + -(-piece.evict[1] // block_size))
    return need


def _block_table(requests, block_size: int, seed: int, cow: bool = False) -> torch.Tensor:
    width = max(_entries_needed(r, block_size, cow) for r in requests) + 1
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(len(requests) * width * 3, generator=gen)[: len(requests) * width] + 1
    return ids.view(len(requests), width).to(torch.int32)


# --------------------------------------------------------------------------- the check


def _check_plan(requests: list[RequestStep], block_size: int, seed: int = 0,
                cow: bool = False):
    """Plan the step, compare every field with the simulator, return the phases."""
    table = _block_table(requests, block_size, seed, cow)
    table_before = table.clone()
    phases = plan_step(requests, table, block_size, copy_on_write=cow)
    assert torch.equal(table, table_before), "plan_step modified the block table"

    def slot(row: int, pos: int, base: int = 0) -> int:
        return int(table[row, base + pos // block_size]) * block_size + pos % block_size

    token_start = [0]
    for r in requests:
        token_start.append(token_start[-1] + r.num_new)
    pieces = [_simulate(r, block_size, cow) for r in requests]
    num_phases = max(len(p) for p in pieces)
    assert len(phases) == num_phases

    seen_tokens: list[int] = []
    for k, phase in enumerate(phases):
        rows = [row for row, p in enumerate(pieces) if k < len(p)]
        assert phase.rows == rows, f"phase {k}"
        mine = [pieces[row][k] for row in rows]

        token_index = [token_start[row] + i for row, pc in zip(rows, mine) for i in pc.new_tokens]
        if num_phases == 1:
            assert phase.token_index is None
            assert token_index == list(range(token_start[-1]))
        else:
            assert phase.token_index is not None
            assert phase.token_index.dtype == torch.long
            assert phase.token_index.tolist() == token_index, f"phase {k}"
        seen_tokens.extend(token_index)

        qsl = [0]
        for pc in mine:
            qsl.append(qsl[-1] + len(pc.new_tokens))
        assert phase.query_start_loc.dtype == torch.int32
        assert phase.query_start_loc.tolist() == qsl, f"phase {k}"
        assert phase.max_query_len == max(len(pc.new_tokens) for pc in mine)

        assert phase.cache_lens.dtype == torch.int32
        assert phase.cache_lens.tolist() == [pc.positions[-1] + 1 for pc in mine], f"phase {k}"

        slots = [slot(row, pos, pc.base) for row, pc in zip(rows, mine) for pos in pc.positions]
        assert phase.slots.dtype == torch.long
        assert phase.slots.tolist() == slots, f"phase {k}"
        # The attention reads each row's blocks from its base on.
        if any(pc.base for pc in mine):
            assert phase.block_table is not None and phase.block_table.dtype == torch.int32
            for row, pc in zip(rows, mine):
                entries = table.shape[1] - pc.base
                assert torch.equal(phase.block_table[row, :entries], table[row, pc.base:])
        else:
            assert phase.block_table is None, f"phase {k}"

        evicting = [(row, pc) for row, pc in zip(rows, mine) if pc.evict is not None]
        ev = phase.evictions
        if not evicting:
            assert ev is None, f"phase {k}"
            continue
        assert ev is not None, f"phase {k}"
        last_tokens = [token_start[row] + pc.new_tokens[-1] for row, pc in evicting]
        assert ev.query_index.tolist() == last_tokens, f"phase {k}"
        live = [pc.evict[0] for _, pc in evicting]
        keep = [pc.evict[1] for _, pc in evicting]
        assert ev.live.tolist() == live and ev.live_list == live
        assert ev.keep.tolist() == keep and ev.keep_list == keep
        relocating = [pc.dest_base != pc.base for _, pc in evicting]
        assert ev.one_drop_each == (all(lv == kp + 1 for lv, kp in zip(live, keep))
                                    and not any(relocating))
        if any(relocating):
            assert ev.relocate.tolist() == relocating
            for e, (row, pc) in enumerate(evicting):
                assert ev.dest_slots[e, : pc.evict[1]].tolist() == [
                    slot(row, d, pc.dest_base) for d in range(pc.evict[1])], f"row {row}"
        else:
            assert ev.relocate is None and ev.dest_slots is None
        width = max(live)
        assert tuple(ev.block_ids.shape) == (len(evicting), width)
        assert tuple(ev.block_offsets.shape) == (len(evicting), width)
        for e, (row, pc) in enumerate(evicting):
            ids, offs = ev.block_ids[e].tolist(), ev.block_offsets[e].tolist()
            for s in range(pc.evict[0]):
                assert ids[s] * block_size + offs[s] == slot(row, s, pc.base), \
                    f"phase {k} row {row} s {s}"
            # Padding past ``live`` must still address this row's own memory.
            row_blocks = set(table[row, pc.base: pc.base + -(-pc.evict[0] // block_size)].tolist())
            for s in range(pc.evict[0], width):
                assert ids[s] in row_blocks and 0 <= offs[s] < block_size

    assert sorted(seen_tokens) == list(range(token_start[-1])), "tokens not covered exactly once"
    return phases


def _req(num_computed, num_new, prompt_len, cache_size, prompt_chunk=None) -> RequestStep:
    return RequestStep(num_computed=num_computed, num_new=num_new, prompt_len=prompt_len,
                       cache_size=cache_size, prompt_chunk=prompt_chunk)


# --------------------------------------------------------------------------- the grid

# Batch shapes in the spirit of vLLM's tests/v1/attention BATCH_SPECS, in TOVA terms:
# (num_computed, num_new, prompt_len, cache_size[, prompt_chunk]).
CASES = {
    # Steady decode: every row holds C and writes position C, then drops one.
    "decode_steady": [_req(40, 1, 20, 8), _req(9, 1, 9, 8), _req(100, 1, 30, 8), _req(13, 1, 5, 8)],
    "single_decode": [_req(57, 1, 50, 16)],
    # Decode still under budget (short prompts): no eviction at all.
    "decode_under_budget": [_req(3, 1, 3, 16), _req(10, 1, 4, 16), _req(14, 1, 14, 16)],
    # Decode rows at different fills: some evict one, one reaches exactly C and does not.
    "decode_mixed_fill": [_req(15, 1, 15, 16), _req(16, 1, 10, 16), _req(7, 1, 7, 16),
                          _req(90, 1, 60, 16)],
    # Whole prompts in one chunk; one fits, one is C + 1 long, one is much longer.
    "prefill_only": [_req(0, 12, 12, 16), _req(0, 17, 17, 16), _req(0, 45, 45, 16)],
    "single_prefill_exactly_c_plus_one": [_req(0, 9, 9, 8)],
    "single_prefill_fits": [_req(0, 8, 8, 8)],
    # Decode and prefill rows interleaved in one batch.
    "mixed_decode_prefill": [_req(30, 1, 20, 8), _req(0, 25, 25, 8), _req(12, 1, 12, 8),
                             _req(0, 5, 5, 8), _req(50, 1, 33, 8)],
    # Chunked prefill, prompt mode: chunks in the middle of a prompt never evict.
    "chunked_prefill_mid_prompt": [_req(32, 32, 100, 16), _req(0, 16, 70, 16),
                                   _req(14, 1, 12, 16)],
    # A chunk ending exactly at the prompt end: the one prompt-mode eviction.
    "chunk_reaches_prompt_end": [_req(64, 36, 100, 16), _req(30, 1, 20, 16),
                                 _req(10, 10, 20, 16)],
    # Chunked prompt mode (K = 8, C = 12): one chunk spans boundaries 8 (no drop), 16, 24,
    # 32 and 40, beside a decode row that only takes part in phase 0.
    "chunked_mode_many_boundaries": [_req(0, 40, 50, 12, 8), _req(70, 1, 50, 12, 8)],
    # Chunked mode, the scheduler's chunk starting and ending between boundaries.
    "chunked_mode_offset_chunk": [_req(5, 30, 60, 12, 8), _req(0, 7, 60, 12, 8),
                                  _req(13, 1, 13, 12, 8)],
    # K = 1: the token-by-token multi-state RNN, every prompt token its own phase.
    "chunked_mode_k1": [_req(0, 9, 9, 4, 1), _req(20, 1, 9, 4, 1)],
    # Replay after preemption: prompt (20) + 5 generated tokens in one go; every generated
    # token is its own phase.  Beside it, two plain decode rows.
    "replay_after_preemption": [_req(41, 1, 30, 8), _req(0, 25, 20, 8), _req(9, 1, 9, 8)],
    # Replay of a prompt shorter than C: the first generated tokens fill up to C (no drop,
    # no split), then each later one drops one.
    "replay_short_prompt": [_req(0, 11, 6, 8)],
    # Replay in chunked mode.
    "replay_chunked_mode": [_req(0, 30, 26, 10, 8), _req(0, 3, 3, 10, 8)],
}


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_token_by_token_model(case, block_size):
    _check_plan(CASES[case], block_size, seed=sorted(CASES).index(case))


# Hand-written expectations for the key shapes, so the simulator itself is pinned down.


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_steady_is_one_phase_one_drop_each(block_size):
    (phase,) = _check_plan(CASES["decode_steady"], block_size)
    assert phase.token_index is None
    assert phase.cache_lens.tolist() == [9, 9, 9, 9]
    assert phase.evictions.live_list == [9, 9, 9, 9]
    assert phase.evictions.query_index.tolist() == [0, 1, 2, 3]
    assert phase.evictions.one_drop_each


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_mixed_fill_evicting_rows_only(block_size):
    (phase,) = _check_plan(CASES["decode_mixed_fill"], block_size)
    # Row 0 reaches 16 == C (no drop), row 2 holds 8; rows 1 and 3 drop one each.
    assert phase.cache_lens.tolist() == [16, 17, 8, 17]
    assert phase.evictions.query_index.tolist() == [1, 3]
    assert phase.evictions.one_drop_each


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_mixed_batch_is_single_phase_not_one_drop(block_size):
    (phase,) = _check_plan(CASES["mixed_decode_prefill"], block_size)
    assert phase.token_index is None
    assert phase.query_start_loc.tolist() == [0, 1, 26, 27, 32, 33]
    assert phase.cache_lens.tolist() == [9, 25, 9, 5, 9]
    assert phase.evictions.query_index.tolist() == [0, 25, 26, 32]
    assert phase.evictions.live_list == [9, 25, 9, 9]
    assert not phase.evictions.one_drop_each
    # The 25-token prompt writes cache positions 0..24 of its own block table.
    assert phase.slots[1:26].tolist() == [
        int(_block_table(CASES["mixed_decode_prefill"], block_size, 0)[1, p // block_size])
        * block_size + p % block_size for p in range(25)
    ]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prompt_chunks(block_size):
    (mid,) = _check_plan(CASES["chunked_prefill_mid_prompt"], block_size)
    assert mid.evictions is None
    assert mid.cache_lens.tolist() == [64, 16, 15]
    (end,) = _check_plan(CASES["chunk_reaches_prompt_end"], block_size)
    assert end.cache_lens.tolist() == [100, 17, 20]
    assert end.evictions.query_index.tolist() == [35, 36, 46]
    assert end.evictions.live_list == [100, 17, 20]
    assert end.evictions.keep_list == [16, 16, 16]
    assert not end.evictions.one_drop_each


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_chunked_mode_chunk_spans_several_boundaries(block_size):
    phases = _check_plan(CASES["chunked_mode_many_boundaries"], block_size)
    # Boundary 8 holds 8 <= 12 (no split); 16, 24, 32 and 40 each drop back to 12.
    assert len(phases) == 4
    assert [p.rows for p in phases] == [[0, 1], [0], [0], [0]]
    assert [p.token_index.tolist() for p in phases] == [
        list(range(16)) + [40], list(range(16, 24)), list(range(24, 32)), list(range(32, 40)),
    ]
    assert [p.cache_lens.tolist() for p in phases] == [[16, 13], [20], [20], [20]]
    assert [p.evictions.live_list for p in phases] == [[16, 13], [20], [20], [20]]
    assert [p.evictions.query_index.tolist() for p in phases] == [[15, 40], [23], [31], [39]]
    assert not any(p.evictions.one_drop_each for p in phases)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_replay_after_preemption_one_phase_per_generated_token(block_size):
    phases = _check_plan(CASES["replay_after_preemption"], block_size)
    assert len(phases) == 6
    assert phases[0].rows == [0, 1, 2]
    assert phases[0].token_index.tolist() == list(range(21)) + [26]
    assert phases[0].evictions.live_list == [9, 20, 9]
    assert not phases[0].evictions.one_drop_each
    for j, phase in enumerate(phases[1:]):
        assert phase.rows == [1]
        assert phase.token_index.tolist() == [21 + j]
        assert phase.cache_lens.tolist() == [9]  # written at position 8 == C
        assert phase.query_start_loc.tolist() == [0, 1]
        assert phase.evictions.query_index.tolist() == [21 + j]
        assert phase.evictions.one_drop_each


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_replay_short_prompt_splits_only_where_it_drops(block_size):
    phases = _check_plan(CASES["replay_short_prompt"], block_size)
    # Tokens 0..8 fill 9 > 8 at b = 9 (first drop); then b = 10 and 11 drop one each.
    assert [p.token_index.tolist() for p in phases] == [list(range(9)), [9], [10]]
    assert [p.evictions.live_list for p in phases] == [[9], [9], [9]]
    assert all(p.evictions.one_drop_each for p in phases)


# --------------------------------------------------------------------------- property


def _random_request(rng: random.Random) -> RequestStep:
    cache_size = rng.randint(1, 40)
    prompt_len = rng.randint(1, 90)
    prompt_chunk = rng.choice([None, None, rng.randint(1, 24)])
    kind = rng.random()
    if kind < 0.35:  # decode
        num_computed, num_new = rng.randint(prompt_len, prompt_len + 60), 1
    elif kind < 0.7:  # a prompt chunk
        num_computed = rng.randint(0, prompt_len - 1)
        num_new = rng.randint(1, prompt_len - num_computed)
    else:  # replay after preemption, or a chunk running past the prompt end
        num_computed = rng.randint(0, prompt_len - 1)
        num_new = prompt_len - num_computed + rng.randint(1, 12)
    return _req(num_computed, num_new, prompt_len, cache_size, prompt_chunk)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_copy_on_write_plan_matches_model(case, block_size):
    _check_plan(CASES[case], block_size, seed=sorted(CASES).index(case), cow=True)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_copy_on_write_first_eviction_relocates(block_size):
    # The prompt's end (45 > C) and a decode row's C + 1-th token: both first evictions.
    # A third row has evicted before: it reads and writes from its private blocks.
    requests = [_req(0, 45, 45, 16), _req(16, 1, 10, 16), _req(60, 1, 30, 16)]
    (phase,) = _check_plan(requests, block_size, cow=True)
    assert phase.evictions.relocate.tolist() == [True, True, False]
    assert not phase.evictions.one_drop_each
    assert phase.block_table is not None  # row 2 reads from block ceil(30 / bs) on


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("seed", range(4))
def test_random_batches_match_model(block_size, seed):
    rng = random.Random(1000 * seed + block_size)
    multi_phase = single_drop = 0
    for trial in range(60):
        requests = [_random_request(rng) for _ in range(rng.randint(1, 7))]
        if rng.random() < 0.5:  # vLLM batches share one budget and one prompt mode
            c, k = requests[0].cache_size, requests[0].prompt_chunk
            requests = [_req(r.num_computed, r.num_new, r.prompt_len, c, k) for r in requests]
        phases = _check_plan(requests, block_size, seed=trial, cow=rng.random() < 0.5)
        multi_phase += len(phases) > 1
        single_drop += any(p.evictions is not None and p.evictions.one_drop_each for p in phases)
    # The generator must actually exercise both regimes.
    assert multi_phase >= 5 and single_drop >= 5
