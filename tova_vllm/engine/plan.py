"""One engine step, planned once and shared by every layer.

The scheduler hands the worker a batch in *logical* terms: request r has computed ``n_r``
tokens and runs ``L_r`` new ones.  Under TOVA the request's KV lives at *cache positions*
``[0, live)`` of its block table, and an eviction may have to happen in the middle of the
new tokens (a ``chunked``-mode prompt boundary, or the decode rule while a preempted
request replays its generated tokens).  The plan splits the step into *phases*: phase k
holds every request's k-th segment (see ``EvictionSchedule.segments``).  Each layer then
runs, per phase: write the segment's K/V, attend, evict.  In steady decode there is one
phase holding the whole batch, in batch order, with one eviction per request.

With prefix caching on, eviction is *copy-on-write*: until a request's first eviction its
cache is its ordinary blocks (cache position = logical position, so vLLM may hash and
share them); the first eviction gathers the survivors into private blocks appended to its
block table, and from then on its cache positions count from that *block base*
(``EvictionSchedule.private_base``).  A phase whose rows have nonzero bases carries its own
block table, each row's shifted to its base, which every slot and the attention read use.

Pure torch and Python: no vLLM import, so it is unit-tested directly.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..policies import EvictionSchedule
from .device_copy import host_to_device


@dataclass(frozen=True)
class RequestStep:
    """What the planner needs to know about one request row of the batch."""

    num_computed: int
    num_new: int
    prompt_len: int
    cache_size: int
    prompt_chunk: Optional[int]

    def schedule(self) -> EvictionSchedule:
        return EvictionSchedule(self.cache_size, self.prompt_len, self.prompt_chunk)


@dataclass
class EvictionBatch:
    """Rows that evict at the end of a phase; every tensor is indexed by eviction row."""

    rows: torch.Tensor  # batch row of each eviction row
    query_index: torch.Tensor  # batch token index of the segment's last query
    query_position: torch.Tensor  # [E] logical position of that query (the newest token)
    block_ids: torch.Tensor  # [E, S] physical block holding cache position s
    block_offsets: torch.Tensor  # [E, S] position of s inside that block
    live: torch.Tensor  # [E] cache positions in use before the eviction
    keep: torch.Tensor  # [E] cache positions kept (the request's budget)
    keep_list: list[int]
    live_list: list[int]
    one_drop_each: bool  # every row drops exactly one token: the batched decode rule
    #: Copy-on-write: ``[E]`` bool, rows whose survivors go to their private blocks (their
    #: first eviction), and ``[E, max keep]`` the slot of each destination cache position
    #: (the row's own slots for the others); None when no row of the batch relocates.
    relocate: Optional[torch.Tensor] = None
    dest_slots: Optional[torch.Tensor] = None
    #: ``[E, S]`` slot (block * block_size + offset) of each cache position, ``[E,
    #: blocks]`` int32 block table up to the live end, and ``[E, S]`` bool mask of the
    #: padding positions (at or past ``live``): filled by :meth:`prepared`.
    slots: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    padding: Optional[torch.Tensor] = None

    def prepared(self, block_size: int, device: torch.device) -> "EvictionBatch":
        """This batch with ``slots`` and ``block_table`` filled and every tensor on
        ``device``: made once per phase by the builder, read by every layer."""
        move = functools.partial(host_to_device, device=device)
        width = self.block_ids.shape[1]
        padding = torch.arange(width).unsqueeze(0) >= self.live.unsqueeze(1)
        # Positions 0, bs, 2bs, ... of each row give its block table (padding positions map
        # to position 0's block: valid memory that is never read).
        return dataclasses.replace(
            self, rows=move(self.rows), query_index=move(self.query_index),
            query_position=move(self.query_position), block_ids=move(self.block_ids),
            block_offsets=move(self.block_offsets), live=move(self.live.to(torch.int32)),
            keep=move(self.keep),
            relocate=None if self.relocate is None else move(self.relocate),
            dest_slots=None if self.dest_slots is None else move(self.dest_slots),
            slots=move(self.block_ids * block_size + self.block_offsets),
            block_table=move(self.block_ids[:, ::block_size].to(torch.int32)),
            padding=move(padding),
        )


@dataclass
class Phase:
    rows: list[int]  # request rows taking part, in batch order
    token_index: Optional[torch.Tensor]  # batch tokens of this phase; None: all, in order
    query_start_loc: torch.Tensor  # [len(rows) + 1], relative to the phase's tokens
    cache_lens: torch.Tensor  # [len(rows)] positions each row attends over
    slots: torch.Tensor  # [phase tokens] cache slot written by each token
    positions: torch.Tensor  # [phase tokens] logical position of each token
    max_query_len: int
    evictions: Optional[EvictionBatch]
    #: ``[rows, blocks]`` int32: each batch row's block table from its block base, when
    #: some row's base is not 0 (copy-on-write); None: the step's own block table.
    block_table: Optional[torch.Tensor] = None


@dataclass
class QueryBatch:
    """Some rows of a phase with *all* their queries, for policies that accumulate the
    attention of every query (H2O).  Queries are padded to the longest row."""

    query_index: torch.Tensor  # [E, Lmax] batch token index (padding repeats a real one)
    visible: torch.Tensor  # [E, Lmax, S] bool: slot s is attended by query l
    slot_ids: torch.Tensor  # [E, S] global cache slot of cache position s (padding: 0)
    in_use: torch.Tensor  # [E, S] bool: cache position s is live after the phase's writes

    def to(self, device: torch.device) -> "QueryBatch":
        """Every tensor on ``device`` (once per phase, read by every layer)."""
        return QueryBatch(*(host_to_device(t, device) for t in (
            self.query_index, self.visible, self.slot_ids, self.in_use)))


def plan_step(
    requests: Sequence[RequestStep],
    block_table: torch.Tensor,
    block_size: int,
    copy_on_write: bool = False,
) -> list[Phase]:
    """Split a step into phases and compute every cache slot it touches.

    ``block_table`` is ``[rows, max_blocks]`` (int32 physical block ids).
    """
    if requests and all(r.num_new == 1 and r.num_computed >= r.prompt_len for r in requests):
        return [_plan_decode(requests, block_table, block_size, copy_on_write)]
    schedules = [req.schedule() for req in requests]
    segments_per_row = [
        list(sched.segments(req.num_computed, req.num_new))
        for req, sched in zip(requests, schedules)
    ]
    first_evictions = [sched.first_eviction() for sched in schedules]
    token_starts = [0]
    for req in requests:
        token_starts.append(token_starts[-1] + req.num_new)
    num_phases = max((len(s) for s in segments_per_row), default=0)
    single_phase = num_phases <= 1

    block_table = block_table.to(torch.long)
    phases: list[Phase] = []
    for k in range(num_phases):
        rows, token_index, cache_lens, slots_rows, slots_pos = [], [], [], [], []
        token_positions = []
        query_start, max_query_len = [0], 0
        evict_rows, evict_qidx, evict_qpos, evict_live, evict_keep = [], [], [], [], []
        bases, private, relocating = [0] * len(requests), [0] * len(requests), []
        for row, (req, segments) in enumerate(zip(requests, segments_per_row)):
            if k >= len(segments):
                continue
            seg_start, seg_end, evicts = segments[k]
            schedule = schedules[row]
            live_before = schedule.live_after(seg_start)
            if copy_on_write:
                bases[row] = schedule.private_base(seg_start, block_size)
                private[row] = schedule.private_base(seg_end, block_size)
            length = seg_end - seg_start
            first_token = token_starts[row] + (seg_start - req.num_computed)
            rows.append(row)
            token_index.extend(range(first_token, first_token + length))
            cache_lens.append(live_before + length)
            slots_rows.extend([row] * length)
            slots_pos.extend(range(live_before, live_before + length))
            token_positions.extend(range(seg_start, seg_end))
            query_start.append(query_start[-1] + length)
            max_query_len = max(max_query_len, length)
            if evicts:
                evict_rows.append(row)
                evict_qidx.append(first_token + length - 1)
                evict_qpos.append(seg_end - 1)
                evict_live.append(live_before + length)
                evict_keep.append(req.cache_size)
                relocating.append(copy_on_write and seg_end == first_evictions[row])
        table = from_bases(block_table, bases)
        positions = torch.tensor(slots_pos, dtype=torch.long)
        row_ids = torch.tensor(slots_rows, dtype=torch.long)
        slots = table[row_ids, positions // block_size] * block_size + positions % block_size
        evictions = _eviction_batch(evict_rows, evict_qidx, evict_qpos, evict_live, evict_keep,
                                    table, block_size)
        if any(relocating):
            _relocate(evictions, torch.tensor(relocating), from_bases(block_table, private),
                      block_size)
        phases.append(
            Phase(
                rows=rows,
                token_index=None if single_phase else torch.tensor(token_index, dtype=torch.long),
                query_start_loc=torch.tensor(query_start, dtype=torch.int32),
                cache_lens=torch.tensor(cache_lens, dtype=torch.int32),
                slots=slots,
                positions=torch.tensor(token_positions, dtype=torch.long),
                max_query_len=max_query_len,
                evictions=evictions,
                block_table=None if table is block_table else table.to(torch.int32),
            )
        )
    return phases


def from_bases(block_table: torch.Tensor, bases) -> torch.Tensor:
    """Each row of ``block_table`` from its block base on (``bases``: a list or a tensor),
    padded with block 0 (valid memory, never read as a live position); the table itself
    when every base is 0."""
    bases = torch.as_tensor(bases, dtype=torch.long)
    if not bool(bases.any()):
        return block_table
    width = block_table.shape[1]
    index = bases.unsqueeze(1) + torch.arange(width)
    inside = index < width
    return torch.where(inside, block_table.gather(1, index.clamp(max=width - 1)), 0)


def _relocate(ev: EvictionBatch, relocate: torch.Tensor, private_table: torch.Tensor,
              block_size: int) -> None:
    """Mark ``ev``'s rows whose survivors move to their private blocks (``private_table``:
    each batch row's table from the block base it has after the eviction)."""
    max_keep = max(ev.keep_list)
    positions = torch.arange(max_keep)
    dest = private_table[ev.rows.unsqueeze(1), positions // block_size] * block_size
    ev.dest_slots = dest + positions % block_size
    ev.relocate = relocate
    ev.one_drop_each = False


def _plan_decode(requests: Sequence[RequestStep], block_table: torch.Tensor,
                 block_size: int, copy_on_write: bool = False) -> Phase:
    """Steady decode, vectorized: one token per request, written at slot min(n, C)."""
    computed = torch.tensor([r.num_computed for r in requests], dtype=torch.long)
    budget = torch.tensor([r.cache_size for r in requests], dtype=torch.long)
    live_before = torch.minimum(computed, budget)
    block_table = block_table.to(torch.long)
    raw_table = block_table
    relocating = None
    if copy_on_write:
        first = torch.tensor([r.schedule().first_eviction() for r in requests],
                             dtype=torch.long)
        private = -(-first // block_size)
        block_table = from_bases(raw_table, torch.where(computed >= first, private, 0))
        relocating = computed + 1 == first
    rows = torch.arange(len(requests))
    slots = block_table[rows, live_before // block_size] * block_size + live_before % block_size
    evicting = torch.nonzero(computed >= budget).flatten()
    evictions = None
    if evicting.numel():
        live = budget[evicting] + 1
        width = int(live.max())
        positions = torch.arange(width)
        padded = torch.where(positions.unsqueeze(0) < live.unsqueeze(1), positions, 0)
        keep_list = budget[evicting].tolist()
        evictions = EvictionBatch(
            rows=evicting,
            query_index=evicting,
            query_position=computed[evicting],
            block_ids=block_table[evicting.unsqueeze(1), padded // block_size],
            block_offsets=padded % block_size,
            live=live,
            keep=budget[evicting],
            keep_list=keep_list,
            live_list=[k + 1 for k in keep_list],
            one_drop_each=True,
        )
        if relocating is not None and bool(relocating[evicting].any()):
            _relocate(evictions, relocating[evicting], from_bases(raw_table, private),
                      block_size)
    return Phase(
        rows=list(range(len(requests))),
        token_index=None,
        query_start_loc=torch.arange(len(requests) + 1, dtype=torch.int32),
        cache_lens=(live_before + 1).to(torch.int32),
        slots=slots,
        positions=computed,
        max_query_len=1,
        evictions=evictions,
        block_table=None if block_table is raw_table else block_table.to(torch.int32),
    )





def _eviction_batch(rows, query_index, query_position, live, keep, block_table, block_size):
    if not rows:
        return None
    width = max(live)
    positions = torch.arange(width, dtype=torch.long)
    live_t = torch.tensor(live, dtype=torch.long)
    # Padding positions point at position 0 of the row: valid memory, masked in scoring.
    padded = torch.where(positions.unsqueeze(0) < live_t.unsqueeze(1), positions, 0)
    row_ids = torch.tensor(rows, dtype=torch.long).unsqueeze(1)
    return EvictionBatch(
        rows=torch.tensor(rows, dtype=torch.long),
        query_index=torch.tensor(query_index, dtype=torch.long),
        query_position=torch.tensor(query_position, dtype=torch.long),
        block_ids=block_table[row_ids, padded // block_size],
        block_offsets=padded % block_size,
        live=live_t,
        keep=torch.tensor(keep, dtype=torch.long),
        keep_list=list(keep),
        live_list=list(live),
        one_drop_each=all(lv == kp + 1 for lv, kp in zip(live, keep)),
    )


def query_batch(phase: Phase, members: Sequence[int], block_table: torch.Tensor,
                block_size: int) -> QueryBatch:
    """Every query of the phase rows ``members`` (indices into ``phase.rows``) with the
    cache positions each attends to: the row's cache before the phase, plus its own
    segment up to and including the query (causal)."""
    query_start = phase.query_start_loc.tolist()
    lengths = [query_start[j + 1] - query_start[j] for j in members]
    cache_lens = [int(phase.cache_lens[j]) for j in members]
    longest, width = max(lengths), max(cache_lens)
    local = torch.tensor(
        [[query_start[j] + min(q, n - 1) for q in range(longest)] for j, n in zip(members, lengths)],
        dtype=torch.long,
    )
    query_index = local if phase.token_index is None else phase.token_index[local]
    length_t = torch.tensor(lengths, dtype=torch.long).view(-1, 1, 1)
    cache_len_t = torch.tensor(cache_lens, dtype=torch.long).view(-1, 1, 1)
    q = torch.arange(longest).view(1, -1, 1)
    s = torch.arange(width).view(1, 1, -1)
    # Query q of a row sees cache positions up to (cache_len - length) + q.
    visible = (q < length_t) & (s <= cache_len_t - length_t + q)
    positions = torch.arange(width)
    in_use = positions.unsqueeze(0) < cache_len_t.view(-1, 1)
    padded = torch.where(in_use, positions, 0)
    row_ids = torch.tensor([phase.rows[j] for j in members], dtype=torch.long).unsqueeze(1)
    table = block_table.to(torch.long)
    slot_ids = table[row_ids, padded // block_size] * block_size + padded % block_size
    return QueryBatch(query_index=query_index, visible=visible, slot_ids=slot_ids,
                      in_use=in_use)
