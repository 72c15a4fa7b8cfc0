"""The policy registry: every eviction policy is one small class in ``policies/units/``.

A policy class (a :class:`PolicyUnit`) says three things: which inputs its keep score
reads (``needs``), the keep score itself, and what budgets it refuses.  Registering is
defining it in its own module under ``policies/units/``: :func:`policy_units` imports
every module there, so adding a policy is one new module and its test.  Every list of
policies (settings, per-request arguments, the engine, the reference, scripts, the
README's table, which a test checks) comes from :data:`POLICY_NAMES`.

Inputs a keep score may read, per live cache position of an evicting row:

* ``last_query_probs``: the last query's softmax weights, mean over all query heads;
* ``positions``: the logical position held there (side state the mechanism keeps);
* ``accumulated``: attention summed over every query so far (side state; the mechanism
  also scores every query of every phase for it, which costs a pass over the keys).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar, Optional

import torch

INPUTS = ("last_query_probs", "positions", "accumulated")
DEFAULT_POLICY = "tova"

# Protected positions (sinks, H2O's recent window) score above anything a real score
# reaches: attention sums are at most the number of queries, positions far below 2**40.
PROTECTED = float(2**40)
#: Below every int32 logical position: a position rule that protects nothing.
NO_POSITION_PROTECTED = -(2**31)


class PolicyUnit:
    """Base class of a policy; subclasses set ``name``, ``needs``, ``keeps``, ``side_state``
    and implement :meth:`keep_scores`.  ``params`` is the
    :class:`~tova_vllm.policies.EvictionPolicy` choice (name + settings such as sinks)."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    #: For the README's table: what survives, and the side state per cache slot and layer.
    keeps: ClassVar[str]
    side_state: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.needs) - set(INPUTS)
        if unknown:
            raise TypeError(f"{cls.__name__}.needs: unknown inputs {sorted(unknown)}")
        if cls.name in _UNITS:
            raise TypeError(f"two policies are named {cls.name!r}")
        _UNITS[cls.name] = cls

    @staticmethod
    def check_budget(params, cache_size: int) -> None:
        """Raise ValueError when the policy cannot run with this budget."""

    @staticmethod
    def position_rule(params) -> Optional[int]:
        """``n`` when the keep score is exactly ``positions + PROTECTED * (positions <
        n)`` (keep the newest tokens, and every one below position n): the mechanism may
        then pick decode drops from the positions alone, without computing scores (a test
        holds every unit's claim against its :meth:`keep_scores`).  None: any other
        score."""
        return None

    @staticmethod
    def keep_scores(params, *, cache_size: torch.Tensor, query_position: torch.Tensor,
                    positions: Optional[torch.Tensor], last_query_probs: Optional[torch.Tensor],
                    accumulated: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


_UNITS: dict[str, type[PolicyUnit]] = {}
_loaded = False


def policy_units() -> dict[str, type[PolicyUnit]]:
    """Every registered policy by name: the default first, then by name."""
    global _loaded
    if not _loaded:
        from . import units

        for info in sorted(pkgutil.iter_modules(units.__path__), key=lambda m: m.name):
            importlib.import_module(f"{units.__name__}.{info.name}")
        _loaded = True
    order = sorted(_UNITS, key=lambda n: (n != DEFAULT_POLICY, n))
    return {n: _UNITS[n] for n in order}


def policy_unit(name: str) -> type[PolicyUnit]:
    """The registered policy ``name`` (KeyError when there is none); asked several times
    per engine step, so without :func:`policy_units`' sorting."""
    if not _loaded:
        policy_units()
    return _UNITS[name]


def policy_table() -> str:
    """The README's policy table (a test checks the README holds exactly this)."""
    lines = ["| policy | keeps | side state per cache slot and layer |", "|---|---|---|"]
    for name, unit in policy_units().items():
        lines.append(f"| `{name}` | {unit.keeps} | {unit.side_state} |")
    return "\n".join(lines)
