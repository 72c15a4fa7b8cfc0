"""The policy a request runs: a registered policy by name, with the settings it reads.

Every policy turns what the mechanism knows about a request's live cache positions into a
*keep score* per position (higher is kept); selection (``selection.py``) is shared, so ties
break the same way for every policy: equal scores rank by cache position, the highest one
is dropped.  The policies themselves are the classes in ``policies/units/`` (see
``registry.py``); this module holds the choice (name + settings) the engine, the
reference and the settings pass around, and H2O-style accumulation over many queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .registry import PolicyUnit, policy_unit, policy_units

#: Every policy's name, the default (``tova``) first; scripts and settings list these.
POLICY_NAMES: tuple[str, ...] = tuple(policy_units())
DEFAULT_SINKS = 4
#: H2O scores every query of a prompt chunk; this bounds the fp32 logits one pass holds.
ACCUMULATE_QUERY_BLOCK = 64


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
    def unit(self) -> type[PolicyUnit]:
        return policy_unit(self.name)

    @property
    def needs_last_query_probs(self) -> bool:
        return "last_query_probs" in self.unit.needs

    @property
    def needs_positions(self) -> bool:
        """Whether the mechanism must keep side state (positions, and accumulated
        attention when :attr:`needs_accumulated`) for this policy."""
        return bool({"positions", "accumulated"} & self.unit.needs)

    @property
    def needs_accumulated(self) -> bool:
        return "accumulated" in self.unit.needs

    @property
    def position_rule(self) -> Optional[int]:
        """See :meth:`~tova_vllm.policies.registry.PolicyUnit.position_rule`."""
        return self.unit.position_rule(self)

    def check_budget(self, cache_size: int) -> None:
        """Raise ValueError when the policy cannot run with this budget."""
        self.unit.check_budget(self, cache_size)

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
        """Keep score of each cache position, ``[rows, positions]`` (padding is ignored
        later): fp32 for ``tova``, fp64 (exact positions) for the others.

        ``cache_size``/``query_position``: ``[rows]`` budget and logical position of the
        query at which the eviction happens (the newest token).  ``positions``,
        ``last_query_probs`` (mean over query heads) and ``accumulated`` are ``[rows,
        positions]`` and needed as the policy's ``needs`` says.
        """
        inputs = {"positions": positions, "last_query_probs": last_query_probs,
                  "accumulated": accumulated}
        for name in sorted(self.unit.needs):
            if inputs[name] is None:
                raise ValueError(f"this policy needs {name}")
        return self.unit.keep_scores(self, cache_size=cache_size,
                                     query_position=query_position, **inputs)


def accumulated_from_logits(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax of many queries per row, summed over query heads and over the queries.

    ``logits``: fp32 ``[rows, kv_heads, group, queries, slots]``; ``visible``: bool
    ``[rows, queries, slots]``, which slots each query attends to (causality, padding;
    an all-False query row contributes nothing).  Returns fp32 ``[rows, slots]``: H2O's
    increment *summed* over heads (divide by the total head count after any tensor-parallel
    all-reduce, as for :func:`~tova_vllm.policies.head_mean`).
    """
    masked = logits.masked_fill(~visible.unsqueeze(1).unsqueeze(1), float("-inf"))
    probs = torch.softmax(masked, dim=-1).nan_to_num_(0.0)  # all-masked rows: 0, not NaN
    return probs.sum(dim=(1, 2)).sum(dim=1)

