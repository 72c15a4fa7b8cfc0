"""Budgets, policies and progress output shared by the quality study's parts
(``scripts/eval_quality.py``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)


class Budget:
    label: str       # as the user wrote it ("1/16", "64", "full")
    cache_size: int  # C (for "full": the length)
    full: bool

    def fraction(self, length: int) -> float:
        return self.cache_size / length


def parse_budgets(spec: str, length: int) -> list[Budget]:
    """``"1/16,0.25,64,full"`` -> budgets sorted by size; duplicates merged; ``full`` (or
    any size >= ``length``) evicts nothing and is always included."""
    out: dict[int, Budget] = {}
    for raw in (x.strip() for x in spec.split(",")):
        if not raw:
            continue
        if raw == "full":
            size = length
        elif "/" in raw or "." in raw:
            try:
                if "/" in raw:
                    num, den = raw.split("/")
                    frac = float(num) / float(den)
                else:
                    frac = float(raw)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"bad budget {raw!r}") from None
            if not 0 < frac <= 1:
                raise ValueError(f"budget fraction must be in (0, 1], got {raw!r}")
            size = max(1, round(frac * length))
        else:
            try:
                size = int(raw)
            except ValueError:
                raise ValueError(f"bad budget {raw!r}") from None
            if size < 1:
                raise ValueError(f"budget must be >= 1, got {raw!r}")
        size = min(size, length)
        full = size >= length
        out.setdefault(size, Budget("full" if full else raw, size, full))
    out.setdefault(length, Budget("full", length, True))
    return [out[k] for k in sorted(out)]


class Progress:
    """tqdm when installed, otherwise a line every ~5% of the work."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._next_print = 0.0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
            print(f"[{desc}] 0/{total}", flush=True)
        else:
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def note(self, text: str) -> None:
        """Progress inside one item (callers throttle it)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def update(self, text: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.done >= self._next_print or self.done == self.total:
            print(f"[{self.desc}] {self.done}/{self.total} {text}", flush=True)
            self._next_print = self.done + max(1, self.total // 20)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def policy_of(name: str, args):
    from tova_vllm.policies import EvictionPolicy

    return EvictionPolicy(name, sinks=args.sinks, recent=args.recent)


def budget_error(name: str, budget: Budget, args) -> Optional[str]:
    if budget.full:
        return None
    try:
        policy_of(name, args).check_budget(budget.cache_size)
    except ValueError as exc:
        return str(exc)
    return None


def budget_cell(name: str, budget: Budget, length: int) -> tuple[tuple, dict[str, Any]]:
    """The results key of ``name`` at ``budget`` (the full budget is one cell shared by
    every policy: it evicts nothing) and the fields every table cell starts with."""
    key = ("*", budget.cache_size) if budget.full else (name, budget.cache_size)
    return key, {"cache_size": budget.cache_size, "label": budget.label,
                 "fraction": budget.fraction(length), "shared_full": budget.full}
