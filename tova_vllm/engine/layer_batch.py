"""Steady decode's eviction, done once per step for every layer at once.

In a step with one phase whose eviction rows each drop one token (steady decode: the
common case) by a score that needs no accumulation over queries (TOVA's, or the
position-only baselines' from the side state), nothing reads a layer's cache between its
attention and the next step's cache write.  So each layer's eviction may wait until the
last layer has attended, and all layers can then be scored, selected and compacted
together: a handful of tensor operations per step instead of the same dozen per layer,
which is what a decode step with eviction costs on top of a vanilla one when layers are
small (per-operation overhead, not bandwidth, dominates there).

The builder makes one :class:`LayerBatch` per such step (``TovaStepMetadata.layer_batch``);
every layer of the attention group adds its evictor, cache and eviction rows' queries to
it from the phase loop; the last one to arrive runs the eviction of all.  A step whose
batch did not see every layer is an error (``check_finished``), never a silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .plan import EvictionBatch
from .side_state import PolicyGroups, position_protect


@dataclass
class LayerBatch:
    evictions: EvictionBatch  # prepared; the same rows evict in every layer
    num_layers: int  # layers of the attention group: the last one runs the batch
    caches: list[Any] = field(default_factory=list)  # each layer's cache, as its evictor reads it
    queries: list[torch.Tensor] = field(default_factory=list)  # [E, q_heads, D] per layer
    evictor: Any = None  # the first layer's evictor: all layers share its shapes and group
    #: Rows by policy (``side_state.group_rows``) when not all are TOVA; then every layer
    #: also hands over its side state.
    groups: Optional[PolicyGroups] = None
    sides: list[Any] = field(default_factory=list)  # each layer's SlotSideState, or None
    #: ``(slots, positions)`` of the step's new tokens when side state is kept: written
    #: into every layer's side state by the step's eviction, at once, instead of by each
    #: layer (nothing reads it before the eviction; no row of a batched step accumulates
    #: attention, so only the positions are kept up to date).
    side_writes: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    #: Every row is TOVA's or under a position rule, the step is decode only and each
    #: eviction row attends exactly the positions it scores (``TovaPhaseMetadata.
    #: scored_by_attention``): a platform's attention may then give TOVA's scores itself
    #: (``Evictor.attend_and_score``), so K is read once per step instead of twice, and
    #: evict right there, by those scores or by the rows' position rules.
    attention_scores: bool = False
    #: Some row's score needs its last query (TOVA's rows; not the position-only
    #: baselines'): otherwise the layers hand over no queries.  From :attr:`groups`.
    needs_queries: bool = field(init=False)
    #: ``[E]`` int64 each eviction row's ``position_rule`` when every row has one (then
    #: drops come from the side state's positions, not from scores); else None.
    protect: Optional[torch.Tensor] = field(init=False)
    #: ``[L, rows, kv_heads, W]`` fp32 for every row of the step (evicting or not), each
    #: layer's slice filled by its attention: each kv head's sum of its query heads'
    #: softmax weights.  None: the scores are computed here from the queries.
    scores: Optional[torch.Tensor] = None
    #: What the first layer's attention derived from the step's attention metadata, for
    #: the next layers (the platform's; e.g. a block table cut to the longest row).
    attention_inputs: Any = None
    #: ``(evicts [rows] int32, src [L, rows], dst [L, rows] int64)`` when the platform's
    #: attention also evicts, layer by layer, right after attending (``native.
    #: RowEvictions``): then nothing is left to evict at the step's end.
    row_evictions: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    #: ``(src [E], dst [L, E])``: the slots each eviction row moved in each layer, once
    #: the step's eviction is done (``evict_layers``' or the attention's).
    moves: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    done: bool = False

    def __post_init__(self) -> None:
        self.needs_queries = self.groups is None or any(
            policy.needs_last_query_probs for policy, _ in self.groups)
        self.protect = None if self.groups is None else position_protect(
            self.groups, self.evictions.rows.numel())
        self._position_inputs = None

    def position_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(protect [rows], new slots, new positions)``, int64, for an attention over the
        step's ``rows`` rows that evicts by position rules (``native.RowEvictions``): made
        once per step."""
        if self._position_inputs is None:
            protect = torch.zeros(rows, dtype=torch.int64)
            protect[self.evictions.rows] = self.protect
            slots, positions = self.side_writes
            self._position_inputs = (protect, slots.to(torch.int64).contiguous(),
                                     positions.to(torch.int64).contiguous())
        return self._position_inputs

    def scores_of_next_layer(self, make, shape: tuple) -> torch.Tensor:
        """The slice of :attr:`scores` the next layer to :meth:`add` fills (``shape``:
        ``(rows, kv_heads, W)``); ``make(shape)`` gives the buffer on first use."""
        if self.scores is None:
            self.scores = make((self.num_layers,) + tuple(shape))
        return self.scores[len(self.caches)]

    def row_evictions_of_next_layer(self, rows: int) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
        """``(evicts, src, dst)`` for the next layer to :meth:`add`, whose attention over
        the step's ``rows`` rows also evicts (``native.RowEvictions``)."""
        if self.row_evictions is None:
            if self.caches:
                raise RuntimeError("tova-vllm: some layers of a step evicted in their "
                                   "attention and others did not")
            evicts = torch.zeros(rows, dtype=torch.int32)
            evicts[self.evictions.rows] = 1
            self.row_evictions = (evicts,
                                  torch.empty(self.num_layers, rows, dtype=torch.int64),
                                  torch.empty(self.num_layers, rows, dtype=torch.int64))
        evicts, src, dst = self.row_evictions
        layer = len(self.caches)
        return evicts, src[layer], dst[layer]

    def add(self, evictor, cache, queries: Optional[torch.Tensor], side=None) -> None:
        """Layer by layer, in order: ``queries`` are the eviction rows' last queries, or
        None when the layer's attention filled its slice of :attr:`scores` or no row's
        score needs them (:attr:`needs_queries`)."""
        if self.done:
            raise RuntimeError("tova-vllm: a layer attended after its step's eviction ran")
        if self.needs_queries and (queries is None) != (self.scores is not None):
            raise RuntimeError("tova-vllm: some layers of a step gave their scores from "
                               "attention and others did not")
        self.evictor = self.evictor or evictor
        self.caches.append(cache)
        self.queries.append(queries)
        self.sides.append(side)
        if len(self.caches) == self.num_layers:
            if self.row_evictions is not None:  # every layer evicted in its attention
                _, src, dst = self.row_evictions
                rows = self.evictions.rows
                self.moves = (src[0, rows], dst[:, rows])
            else:
                scores = self.scores
                if scores is not None and scores.shape[1] != self.evictions.rows.numel():
                    scores = scores[:, self.evictions.rows]  # growing rows attended too
                self.moves = self.evictor.evict_layers(
                    self.queries, self.caches, self.evictions, self.groups, self.sides,
                    scores=scores, new_positions=self.side_writes)
            self.done = True
            self.caches, self.queries, self.sides = [], [], []

    def check_finished(self) -> None:
        """Called when the next step is built: every layer of this one must have evicted."""
        if not self.done:
            raise RuntimeError(
                f"tova-vllm: {len(self.caches)} of {self.num_layers} layers of the attention "
                "group attended in the last step, so its batched eviction never ran; "
                "set TOVA_VLLM_LAYER_BATCH=0 to evict layer by layer and report this")

