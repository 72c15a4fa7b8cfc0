"""Eviction policies: TOVA and the paper's baselines, as one scoring interface.

Every policy turns what the mechanism knows about a request's live cache slots into a
*keep score* per slot (higher is kept); selection (``selection.py``) is shared, so ties
break the same way for every policy: equal scores rank by cache slot, the highest slot
is dropped.

* ``tova``: the last query's softmax weights averaged over all query heads (the paper).
* ``window``: the C most recent tokens (score = logical position).
* ``sink_window``: the first ``sinks`` tokens of the sequence plus the most recent ones
  (the paper's "window + i" baseline; StreamingLLM's attention sinks).
* ``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023): the ``recent`` most recent tokens
  plus the tokens with the highest *accumulated* attention, i.e. the sum over every query
  processed so far (prompt queries included) of its softmax weight averaged over all query
  heads.  Like TOVA here, all heads of a layer keep the same tokens (H2O proper keeps
  tokens per head; one set per layer is what a paged cache can hold).

What a policy needs beside the cache, per live slot and per layer:

* ``positions`` (every policy but ``tova``): the slot's logical position.  Slots are in
  compaction order, not position order, so this is side state moved by compaction.
* ``accumulated`` (``h2o``): fp32 accumulated attention, reset when a slot is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

POLICY_NAMES = ("tova", "window", "sink_window", "h2o")
DEFAULT_SINKS = 4

# Protected slots (sinks, H2O's recent window) score above anything a real score reaches:
# attention sums are at most the number of queries, positions are far below 2**40.
_PROTECTED = float(2**40)


@dataclass(frozen=True)
class EvictionPolicy:
    name: str = "tova"
    #: ``sink_window``: how many of the sequence's first tokens are always kept.
    sinks: int = DEFAULT_SINKS
    #: ``h2o``: how many of the most recent tokens are always kept; None: half the budget.
    recent: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {list(POLICY_NAMES)}, got {self.name!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if self.recent is not None and (
            isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0
        ):
            raise ValueError(f"recent must be an integer >= 0 or None, got {self.recent!r}")

    @property
    def needs_last_query_probs(self) -> bool:
        return self.name == "tova"

    @property
    def needs_positions(self) -> bool:
        return self.name != "tova"

    @property
    def needs_accumulated(self) -> bool:
        return self.name == "h2o"

    def check_budget(self, cache_size: int) -> None:
        """Raise ValueError when the policy cannot run with this budget."""
        if self.name == "sink_window" and self.sinks >= cache_size:
            raise ValueError(
                f"sink_window keeps {self.sinks} sink tokens, so the cache size must be "
                f"larger than that, got {cache_size}"
            )
        if self.name == "h2o" and self.recent is not None and self.recent >= cache_size:
            raise ValueError(
                f"h2o keeps the {self.recent} most recent tokens, so the cache size must be "
                f"larger than that, got {cache_size}"
            )

    def recent_window(self, cache_size: Union[int, torch.Tensor]):
        return cache_size // 2 if self.recent is None else self.recent + 0 * cache_size

    def keep_scores(
        self,
        *,
        cache_size: torch.Tensor,
        query_position: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        last_query_probs: Optional[torch.Tensor] = None,
        accumulated: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Keep score of each slot, ``[rows, slots]`` (padding slots are ignored later):
        fp32 for ``tova``, fp64 (exact positions) for the others.

        ``cache_size``/``query_position``: ``[rows]`` budget and logical position of the
        query at which the eviction happens (the newest token).  ``positions``,
        ``last_query_probs`` (mean over query heads) and ``accumulated`` are ``[rows,
        slots]`` and needed as the ``needs_*`` properties say.
        """
        if self.name == "tova":
            _require(last_query_probs, "last_query_probs")
            return last_query_probs  # fp32; widening would change no order
        _require(positions, "positions")
        pos = positions.double()
        if self.name == "window":
            return pos
        if self.name == "sink_window":
            return pos + (positions < self.sinks).double() * _PROTECTED
        _require(accumulated, "accumulated")
        recent = self.recent_window(cache_size.to(torch.long))
        newest_unprotected = query_position.to(torch.long) - recent
        protected = positions > newest_unprotected.unsqueeze(-1)
        return accumulated.double() + protected.double() * _PROTECTED


def _require(value: Optional[torch.Tensor], name: str) -> None:
    if value is None:
        raise ValueError(f"this policy needs {name}")


def accumulated_from_logits(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax of many queries per row, summed over query heads and over the queries.

    ``logits``: fp32 ``[rows, kv_heads, group, queries, slots]``; ``visible``: bool
    ``[rows, queries, slots]``, which slots each query attends to (causality, padding;
    an all-False query row contributes nothing).  Returns fp32 ``[rows, slots]``: H2O's
    increment *summed* over heads (divide by the total head count after any tensor-parallel
    all-reduce, as for :func:`~tova_vllm.policies.tova_scores`).
    """
    masked = logits.masked_fill(~visible.unsqueeze(1).unsqueeze(1), float("-inf"))
    probs = torch.softmax(masked, dim=-1).nan_to_num_(0.0)  # all-masked rows: 0, not NaN
    return probs.sum(dim=(1, 2)).sum(dim=1)

