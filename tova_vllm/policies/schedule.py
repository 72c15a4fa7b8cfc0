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

    def peak_live(self, start: int, num_new: int) -> int:
        """Most cache positions in use at once while processing [start, start + num_new)."""
        peak = self.live_after(start)
        for seg_start, seg_end, _ in self.segments(start, num_new):
            peak = max(peak, self.live_after(seg_start) + (seg_end - seg_start))
        return peak
