"""The paper's "window + i" baseline (StreamingLLM's attention sinks): the sequence's
first ``sinks`` tokens plus the most recent ones."""

from ..registry import PROTECTED, PolicyUnit


class SinkWindow(PolicyUnit):
    name = "sink_window"
    needs = frozenset({"positions"})
    keeps = ('the first `sinks` tokens + the C - `sinks` most recent ("window + i" in the '
             "paper; StreamingLLM's sinks)")
    side_state = "logical position"

    @staticmethod
    def check_budget(params, cache_size: int) -> None:
        if params.sinks >= cache_size:
            raise ValueError(
                f"sink_window keeps {params.sinks} sink tokens, so the cache size must be "
                f"larger than that, got {cache_size}"
            )

    @staticmethod
    def keep_scores(params, *, positions, **_):
        return positions.double() + (positions < params.sinks).double() * PROTECTED

    @staticmethod
    def position_rule(params):
        return params.sinks
