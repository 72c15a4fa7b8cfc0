"""TOVA (the paper): keep the positions the last query attends to most."""

from ..registry import PolicyUnit


class Tova(PolicyUnit):
    name = "tova"
    needs = frozenset({"last_query_probs"})
    keeps = "the C tokens the last query attends to most (mean over all query heads)"
    side_state = "none"

    @staticmethod
    def keep_scores(params, *, last_query_probs, **_):
        return last_query_probs  # fp32; widening would change no order
