"""Heavy-Hitter Oracle (Zhang et al., 2023): the ``recent`` most recent tokens plus the
tokens with the highest *accumulated* attention, i.e. the sum over every query processed
so far (prompt queries included) of its softmax weight averaged over all query heads.
Like TOVA here, all heads of a layer keep the same tokens (H2O proper keeps tokens per
head; one set per layer is what a paged cache can hold)."""

import torch

from ..registry import PROTECTED, PolicyUnit


class H2O(PolicyUnit):
    name = "h2o"
    needs = frozenset({"positions", "accumulated"})
    keeps = ("the `recent` most recent + the heaviest by attention *accumulated* over every "
             "query so far, prompt queries included, averaged over heads (H2O, Zhang et al. "
             "2023; one token set per layer, as for TOVA, since a paged cache holds one set)")
    side_state = "position + fp32 accumulated attention"

    @staticmethod
    def check_budget(params, cache_size: int) -> None:
        if params.recent is not None and params.recent >= cache_size:
            raise ValueError(
                f"h2o keeps the {params.recent} most recent tokens, so the cache size must "
                f"be larger than that, got {cache_size}"
            )

    @staticmethod
    def keep_scores(params, *, cache_size, query_position, positions, accumulated, **_):
        recent = params.recent_window(cache_size.to(torch.long))
        newest_unprotected = query_position.to(torch.long) - recent
        protected = positions > newest_unprotected.unsqueeze(-1)
        return accumulated.double() + protected.double() * PROTECTED
