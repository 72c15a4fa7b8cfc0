"""The TOVA attention impl's step, shared by every platform: the phase loop.

A mixin placed before vLLM's own attention impl (as ``phased_builder.TovaPhasedBuilder``
is before its builder).  For each phase of the step plan it writes the phase's K/V (vLLM's
own cache update already wrote the first phase), records side state, runs the stock
attention over the live cache positions, then hands the layer to the platform's
:class:`~.evictor.Evictor`.  Layers TOVA does not manage, and steps without eviction, go
through the stock code.

A platform supplies: ``_tova_unsupported()`` (features that refuse a layer),
``_make_evictor(layer, kv_cache)``, ``_evictor_cache(kv_cache)`` (what its evictor reads),
``_write_kv(...)`` and, optionally, ``_attend(...)`` returning the per-token log-sum-exp
and ``_attend_and_score(...)`` (decode attention that gives TOVA's scores).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from .evictor import Evictor
from .layer_setup import TensorParallel, setup_tova_impl
from .phased_builder import TovaPhaseMetadata, TovaStepMetadata
from .side_state import SlotSideState


class TovaImplMixin:
    """``class Impl(TovaImplMixin, StockImpl)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: Tensor-parallel facts of this layer; None when TOVA does not manage it.
        self._tp: Optional[TensorParallel] = setup_tova_impl(self, self._tova_unsupported())
        self._evictor: Optional[Evictor] = None
        #: Per-slot side state of this layer (``side_state.py``), made on first use.
        self._side: Optional[SlotSideState] = None
        #: ``(kv_cache, its _evictor_cache view)``: the runner hands the same cache tensor
        #: every step, and a view made once keeps the tensor lists of a step's layer batch
        #: identical from step to step (``native`` validates such a list once).
        self._cache_view: Optional[tuple[torch.Tensor, object]] = None

    def _tova_unsupported(self) -> Iterable[tuple[str, bool]]:
        raise NotImplementedError

    def _make_evictor(self, layer, kv_cache: torch.Tensor) -> Evictor:
        raise NotImplementedError

    def _evictor_cache(self, kv_cache: torch.Tensor):
        raise NotImplementedError

    def _write_kv(self, layer, key, value, kv_cache, slots) -> None:
        raise NotImplementedError

    def _attend(self, layer, q, k, v, kv_cache, phase: TovaPhaseMetadata,
                out) -> Optional[torch.Tensor]:
        """Attention of one phase into ``out``; the per-token log-sum-exp ``[q_heads,
        tokens]`` when the platform's kernel gives it, else None."""
        super().forward(layer, q, k, v, kv_cache, phase.attention, out)
        return None

    def _attend_and_score(self, q, cache, phase: TovaPhaseMetadata, out, batch,
                          side: Optional[SlotSideState]) -> bool:
        """Attention of a decode phase (over ``cache``, the evictor's view of the layer's
        cache; ``side`` its side state) into ``out`` that also fills the layer's slice of
        ``batch.scores`` (``Evictor.attend_and_score``); False when the platform cannot,
        and the stock kernel runs."""
        return False

    def _all_reduce(self):
        return self._tp.all_reduce

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not isinstance(attn_metadata, TovaStepMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if self._evictor is None:
            self._evictor = self._make_evictor(layer, kv_cache)
        if self._cache_view is None or self._cache_view[0] is not kv_cache:
            self._cache_view = (kv_cache, self._evictor_cache(kv_cache))
        evictor, cache = self._evictor, self._cache_view[1]
        side = None
        if attn_metadata.side_state:
            side = self._side = SlotSideState.sized(
                self._side, kv_cache.shape[0] * evictor.block_size(cache), kv_cache.device)
        num_tokens = attn_metadata.num_actual_tokens
        batch = attn_metadata.layer_batch
        for i, phase in enumerate(attn_metadata.phases):
            if phase.token_index is None:
                q, k, v = query[:num_tokens], key[:num_tokens], value[:num_tokens]
                out = output[:num_tokens]
            else:
                idx = phase.token_index
                q, k, v = query[idx], key[idx], value[idx]
                out = torch.empty_like(output[: idx.numel()])
            if i > 0:  # vLLM's own cache update already wrote the first phase
                self._write_kv(layer, k, v, kv_cache, phase.slots)
            if side is not None and batch is None:
                side.write(phase.slots, phase.positions)  # (the layer batch writes all)
            # The first layer that cannot give its scores from attention turns it off for
            # the step (all layers share shapes, so it is the first or none).
            scored = (batch is not None and batch.attention_scores
                      and self._attend_and_score(q, cache, phase, out, batch, side))
            if batch is not None and batch.scores is None:
                batch.attention_scores = False
            lse = None if scored else self._attend(layer, q, k, v, kv_cache, phase, out)
            if phase.token_index is not None:
                output[phase.token_index] = out
            if phase.accumulate is not None:
                evictor.accumulate(query, cache, phase.accumulate, side)
            if phase.evictions is not None and batch is not None:
                needed = batch.needs_queries and not scored
                batch.add(evictor, cache,
                          query[phase.evictions.query_index] if needed else None, side)
            elif phase.evictions is not None:
                row_lse = None if lse is None else lse[:, phase.eviction_queries].t().float()
                evictor.evict(query, cache, phase.evictions, row_lse, phase.eviction_groups,
                              side)
        return output
