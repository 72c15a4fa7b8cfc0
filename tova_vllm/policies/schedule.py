"""When a request evicts, and how many tokens it holds: a pure function of positions.

Evictions happen at fixed *boundaries* of the logical token stream, never where the
scheduler happened to cut a chunk, so a request's result does not depend on what else
shares its batches:

* ``prompt`` mode (the paper): the end of the prompt, then after every generated token;
* ``chunked`` mode: additionally after prompt tokens K, 2K, ... (K = ``prompt_chunk``).

A boundary ``b`` means "after the token at position ``b - 1`` has attended, keep at most
C tokens".  Because every eviction brings the live count back to exactly C (or leaves
fewer than C untouched), the live count after ``n`` processed tokens is
``min(b, C) + (n - b)`` with ``b`` the last boundary ``<= n``.  Worker and scheduler both
derive the cache layout from this formula instead of carrying per-request state, which is
what makes recompute after preemption replay exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_positions(cache_size: int) -> int:
    """Cache positions a decoding request holds: C kept + the new token that attends."""
    return cache_size + 1


def peak_positions(cache_size: int, prompt_chunk: Optional[int], max_model_len: int) -> int:
    """Most cache positions one request of any length up to ``max_model_len`` can hold.

    ``chunked`` prompts peak at C + prompt_chunk before an eviction; the paper's ``prompt``
    mode holds the whole prompt until its last token, so its peak stays max_model_len.
    """
    peak = cache_size + (prompt_chunk or max_model_len)
    return min(max_model_len, max(peak, decode_positions(cache_size)))


def peak_table_blocks(cache_size: int, prompt_chunk: Optional[int], max_model_len: int,
                      block_size: int, copy_on_write: bool = False) -> int:
    """Most block-table entries one request of any length up to ``max_model_len`` holds.

    In place (prefix caching off) that is the cache positions of :func:`peak_positions`.
    Copy-on-write (prefix caching on) adds the private blocks that the first eviction
    gathers its survivors into while the request still holds the ordinary blocks it read
    them from: those are released only once the eviction's step has been processed.
    """
    in_place = cdiv(peak_positions(cache_size, prompt_chunk, max_model_len), block_size)
    if not copy_on_write or cache_size >= max_model_len:
        return in_place
    if prompt_chunk is None:  # the whole prompt, then the decode rule
        first, private = max_model_len, decode_positions(cache_size)
    else:
        first = min(max_model_len, (cache_size // prompt_chunk + 1) * prompt_chunk)
        private = cache_size + max(prompt_chunk, 1)
    return max(in_place, cdiv(first, block_size) + cdiv(private, block_size))


@dataclass(frozen=True)
class EvictionSchedule:
    cache_size: int
    prompt_len: int
    # None: the paper's one selection at the end of the prompt.
    prompt_chunk: Optional[int] = None

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.prompt_chunk is not None and self.prompt_chunk < 1:
            raise ValueError(f"prompt_chunk must be >= 1, got {self.prompt_chunk}")
        # Asked several times per request and step by the KV manager and the planner.
        object.__setattr__(self, "_first_eviction", self.next_boundary_after(self.cache_size))

    def is_boundary(self, b: int) -> bool:
        if b <= 0:
            return False
        if b >= self.prompt_len:
            return True
        return self.prompt_chunk is not None and b % self.prompt_chunk == 0

    def last_boundary_at_or_before(self, n: int) -> int:
        """Largest boundary <= n, or 0 when there is none (0 acts as an empty start)."""
        if n >= self.prompt_len:
            return n
        if self.prompt_chunk is None:
            return 0
        return (n // self.prompt_chunk) * self.prompt_chunk

    def next_boundary_after(self, n: int) -> int:
        """Smallest boundary > n."""
        if n + 1 >= self.prompt_len:
            return n + 1
        if self.prompt_chunk is None:
            return self.prompt_len
        return min(self.prompt_len, (n // self.prompt_chunk + 1) * self.prompt_chunk)

    def first_eviction(self) -> int:
        """The boundary of the request's first eviction: the first boundary past C (the
        live count there is the boundary itself, > C, as nothing was dropped before)."""
        return self._first_eviction

    def steady_decode(self, start: int, num_new: int,
                      copy_on_write: bool = False) -> bool:
        """Whether processing [start, start + num_new) is one decode token at the budget
        past every change of layout: C live before it, one eviction after it, and (copy-on-
        write) the survivors already in the private blocks.  Such a step touches the same
        cache positions and block-table entries as the one before it."""
        return (num_new == 1 and start >= self.prompt_len and start >= self.cache_size
                and (not copy_on_write or start >= self._first_eviction))

    def decode_below_budget(self, start: int, num_new: int) -> bool:
        """Whether processing [start, start + num_new) is one decode token that still fits
        the budget: nothing is evicted, cache position = logical position."""
        return num_new == 1 and self.prompt_len <= start < self.cache_size

    def private_base(self, n: int, block_size: int) -> int:
        """Copy-on-write: the block index of cache position 0 once ``n`` tokens are
        processed and any eviction at ``n`` is done.  Before the first eviction the cache
        is the ordinary blocks (cache position = logical position, index 0); the first
        eviction gathers the survivors into private blocks appended after them."""
        first = self.first_eviction()
        return cdiv(first, block_size) if n >= first else 0

    def table_blocks(self, start: int, num_new: int, block_size: int,
                     copy_on_write: bool = False) -> int:
        """Block-table entries needed to process [start, start + num_new): the cache
        positions of :meth:`peak_live` in place; with copy-on-write, each segment's
        positions counted from its block base, and the first eviction's destination."""
        if self.steady_decode(start, num_new, copy_on_write):  # the common case
            return (self.private_base(start, block_size) if copy_on_write else 0) + cdiv(
                decode_positions(self.cache_size), block_size)
        if self.decode_below_budget(start, num_new):
            return cdiv(start + 1, block_size)
        if not copy_on_write:
            return cdiv(self.peak_live(start, num_new), block_size)
        first = self.first_eviction()
        need = self.private_base(start, block_size) + cdiv(self.live_after(start), block_size)
        for seg_start, seg_end, evicts in self.segments(start, num_new):
            live = self.live_after(seg_start) + (seg_end - seg_start)
            need = max(need, self.private_base(seg_start, block_size) + cdiv(live, block_size))
            if evicts and seg_end == first:
                need = max(need, self.private_base(first, block_size)
                           + cdiv(self.cache_size, block_size))
        return need

    def held_table(self, n: int, block_size: int,
                   copy_on_write: bool = False) -> tuple[int, Optional[int]]:
        """The block-table entries ``[start, end)`` a request may still hold once ``n``
        tokens are processed (``end`` None: no bound yet); the KV manager frees the rest.
        Copy-on-write frees the ordinary blocks once the first eviction is processed; the
        tail past the decode bound goes once the prompt is processed (with copy-on-write,
        once it also lives in private blocks: before that, the first eviction's
        destination may already be allocated past it)."""
        start = self.private_base(n, block_size) if copy_on_write else 0
        if n >= self.prompt_len > 0 and (not copy_on_write or n >= self.first_eviction()):
            return start, start + cdiv(decode_positions(self.cache_size), block_size)
        return start, None

    def live_after(self, n: int) -> int:
        """Tokens held once ``n`` tokens are processed and any eviction at ``n`` is done."""
        b = self.last_boundary_at_or_before(n)
        return min(b, self.cache_size) + (n - b)

    def segments(self, start: int, num_new: int) -> Iterator[tuple[int, int, bool]]:
        """Split the new tokens [start, start + num_new) at boundaries.

        Yields ``(seg_start, seg_end, evicts)`` where ``evicts`` says that ``seg_end`` is a
        boundary at which the live count exceeds the budget, so the last query of the
        segment scores the cache and the surplus is dropped.

        Boundaries where nothing is dropped do not split: a segment ends only where an
        eviction happens or where the new tokens end.
        """
        seg_start, pos, end = start, start, start + num_new
        while pos < end:
            pos = min(end, self.next_boundary_after(pos))
            live_before_evict = self.live_after(seg_start) + (pos - seg_start)
            evicts = self.is_boundary(pos) and live_before_evict > self.cache_size
            if evicts or pos == end:
                yield seg_start, pos, evicts
                seg_start = pos

    def tokens_evicted(self, start: int, num_new: int) -> int:
        """Tokens dropped while processing [start, start + num_new)."""
        if num_new == 1 and start >= self.prompt_len:  # a decode token: the common case
            return int(start >= self.cache_size)
        return sum(self.live_after(seg_start) + (seg_end - seg_start) - self.cache_size
                   for seg_start, seg_end, evicts in self.segments(start, num_new) if evicts)

    def peak_live(self, start: int, num_new: int) -> int:
        """Most cache positions in use at once while processing [start, start + num_new)."""
        peak = self.live_after(start)
        for seg_start, seg_end, _ in self.segments(start, num_new):
            peak = max(peak, self.live_after(seg_start) + (seg_end - seg_start))
        return peak
