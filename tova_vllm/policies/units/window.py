"""The paper's window baseline: the most recent tokens."""

from ..registry import NO_POSITION_PROTECTED, PolicyUnit


class Window(PolicyUnit):
    name = "window"
    needs = frozenset({"positions"})
    keeps = "the C most recent tokens"
    side_state = "logical position (int32)"

    @staticmethod
    def keep_scores(params, *, positions, **_):
        return positions.double()

    @staticmethod
    def position_rule(params):
        return NO_POSITION_PROTECTED
