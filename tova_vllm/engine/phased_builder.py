"""Attention metadata for a TOVA step, shared by the CPU and CUDA backends.

A mixin placed before vLLM's own metadata builder: it plans the step once (``plan.py``),
points vLLM's KV write at the first phase's cache slots, and asks the stock builder for one
metadata object per phase, so each platform keeps its own attention kernel.  A steady step
(:class:`SteadyStep`) reuses the last step's plan instead of planning again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import operator
import os

import torch

from ..config import settings_from_additional_config
from .device_copy import host_to_device
from .layer_batch import LayerBatch
from .plan import EvictionBatch, Phase, QueryBatch, RequestStep, plan_step, query_batch
from .spec import TovaSpec
from .side_state import PolicyGroups, group_rows, under_position_rules
from .handoff import step_runner
from .step_context import batch_rows, host_block_table


@dataclass
class TovaPhaseMetadata:
    attention: Any  # the stock builder's attention metadata for this phase's tokens
    token_index: Optional[torch.Tensor]  # batch tokens of the phase; None: all, in order
    slots: torch.Tensor  # cache slot written by each of the phase's tokens
    positions: torch.Tensor  # logical position of each of the phase's tokens
    evictions: Optional[EvictionBatch]  # prepared (``EvictionBatch.prepared``) on the device
    #: Eviction rows grouped by policy (``side_state.group_rows``, on the device); None
    #: when every row uses the default TOVA scorer.
    eviction_groups: Optional[PolicyGroups]
    #: Rows whose policy accumulates the attention of every query (H2O).
    accumulate: Optional[QueryBatch]
    #: Index of each eviction row's last query among the phase's tokens (for the
    #: attention kernel's per-token log-sum-exp).
    eviction_queries: Optional[torch.Tensor] = None
    #: Decode only (one token per row, all rows), and each eviction row attends exactly
    #: the cache positions it scores: the attention's own softmax weights are then TOVA's
    #: scores (``Evictor.attend_and_score``).
    scored_by_attention: bool = False


@dataclass
class TovaStepMetadata:
    phases: list[TovaPhaseMetadata]
    num_actual_tokens: int
    #: Some row's policy reads per-slot side state, so every write must record it.
    side_state: bool
    #: Steady decode with TOVA scores only: every layer defers its eviction to this batch
    #: (``layer_batch.py``); None: each layer evicts right after its attention.
    layer_batch: Optional[LayerBatch] = None


@dataclass
class SteadyStep:
    """The last step, kept when it was a *steady step*: one phase of decode tokens, each
    row either in steady decode (``EvictionSchedule.steady_decode``: at its budget, layout
    settled, one eviction) or still growing towards its budget (no eviction yet).  The next
    step of the same rows, one token further on the same block tables, in which no growing
    row reaches its budget, evicts the same rows at the same cache slots: only the logical
    positions move, and the growing rows' write slot and length.  So it reuses this plan
    instead of making it again (on a small model, planning costs more than the eviction).
    Anything else is planned afresh."""

    states: list  # each row's request state in the runner (compared by identity)
    seq_lens: torch.Tensor  # [rows] host: tokens each row held after the first such step
    block_table: torch.Tensor  # [rows, blocks] host copy of the step's block table
    #: [rows, blocks] host int64: the table the phase's slots come from (each row's own
    #: from its block base, with copy-on-write)
    row_table: torch.Tensor
    budgets: torch.Tensor  # [rows] host: each row's budget C
    evicting: torch.Tensor  # [rows] host bool: the rows that evict (the others grow)
    every_row_evicts: bool  # no growing row: nothing but the positions changes per step
    side_state: bool
    phase: TovaPhaseMetadata  # the step's one phase (its stock metadata is rebuilt)
    #: The phase's replacements in ``CommonAttentionMetadata`` for the stock build
    #: (``block_table_tensor`` only when copy-on-write shifted it).
    stock_inputs: dict
    block_size: int

    def __post_init__(self) -> None:
        self._expect_next(self.seq_lens)

    def _expect_next(self, seq_lens: torch.Tensor) -> None:
        # What the next steady step's seq_lens are, and whether the same rows evict in it
        # (no growing row reaches its budget): computed once per step here, not per check.
        self.next_seq_lens = seq_lens + 1
        self.next_evicts_same = self.every_row_evicts or torch.equal(
            seq_lens >= self.budgets, self.evicting)

    def follows(self, states: list, seq_lens: torch.Tensor, block_table: torch.Tensor) -> bool:
        """Whether a step of rows ``states`` at ``seq_lens`` is this one's next steady step.
        (One token per row is checked by the caller.)"""
        return (self.next_evicts_same and len(states) == len(self.states)
                and all(map(operator.is_, states, self.states))
                and torch.equal(seq_lens, self.next_seq_lens)
                and torch.equal(block_table, self.block_table))

    def advance(self, seq_lens: torch.Tensor, device) -> TovaPhaseMetadata:
        """The phase of the next step (``follows`` holds), without stock metadata."""
        phase = self.phase
        computed = seq_lens.to(torch.long) - 1
        positions = host_to_device(computed, device)
        # Updated in place: the last step, which shared these objects, has run (its layer
        # batch is checked finished) or, on a GPU, has had its kernels launched.
        phase.positions = positions
        if phase.evictions is not None:
            phase.evictions.query_position = (positions if self.every_row_evicts
                                              else positions[phase.evictions.rows])
        if not self.every_row_evicts:
            # Growing rows write at cache position = logical position, in ordinary blocks.
            bs = self.block_size
            live = torch.minimum(computed, self.budgets)
            lens = (live + 1).to(torch.int32)
            slots = (self.row_table.gather(1, (live // bs).unsqueeze(1)).squeeze(1) * bs
                     + live % bs)
            phase.slots = host_to_device(slots, device)
            self.stock_inputs.update(seq_lens=host_to_device(lens, device),
                                     seq_lens_cpu_upper_bound=lens,
                                     max_seq_len=int(lens.max()), slot_mapping=phase.slots)
        self._expect_next(seq_lens)
        return phase


class TovaPhasedBuilder:
    """Mixin: ``class Builder(TovaPhasedBuilder, StockBuilder)``."""

    #: The platform's evictor can evict all layers at once (``Evictor.evict_layers``).
    batches_layers: bool = False
    #: The stock builder's metadata is a function of its inputs alone, holding nothing a
    #: step changes but through them: a steady step in which every row evicts has the same
    #: inputs as the last (seq_lens C + 1, slots, block table: ``SteadyStep.follows``), so
    #: it keeps the last step's stock metadata instead of building it again.
    stock_metadata_is_pure: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tova_spec = kv_cache_spec if isinstance(kv_cache_spec, TovaSpec) else None
        self.settings = settings_from_additional_config(vllm_config.additional_config)
        self.num_layers = len(layer_names)
        self._layer_batch_on = (self.batches_layers
                                and os.environ.get("TOVA_VLLM_LAYER_BATCH", "1") != "0")
        self._last_layer_batch: Optional[LayerBatch] = None
        self._steady: Optional[SteadyStep] = None
        self._reuse_steady = os.environ.get("TOVA_VLLM_REUSE_STEADY", "1") != "0"
        self._attention_scores = os.environ.get("TOVA_VLLM_ATTENTION_SCORES", "1") != "0"

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        if self.tova_spec is None:
            return super().build(common_prefix_len, cm, fast_build)
        if self._last_layer_batch is not None:
            self._last_layer_batch.check_finished()
            self._last_layer_batch = None
        steady, self._steady = self._steady, None
        decode = cm.max_query_len == 1 and cm.num_actual_tokens == cm.num_reqs
        if steady is not None and decode:
            step = self._next_steady_step(common_prefix_len, cm, fast_build, steady)
            if step is not None:
                return step
        planned = self._plan(cm)
        if planned is None:
            # Nothing has been or will be evicted this step: cache positions are logical
            # positions, and vLLM's own metadata and KV write are exactly right.
            return super().build(common_prefix_len, cm, fast_build)
        plan, requests, policies, host_table, side_state = planned
        device = cm.slot_mapping.device
        self._point_vllm_write(cm, plan[0], device)
        phases, stock_inputs = [], None
        for phase in plan:
            stock_inputs = self._stock_inputs(cm, phase, device)
            phases.append(self._phase_metadata(common_prefix_len, cm, fast_build, phase,
                                               policies, host_table, side_state, device,
                                               stock_inputs))
        if (self._reuse_steady and decode and len(phases) == 1
                and phases[0].accumulate is None
                and all(self._steady_row(r) for r in requests)):
            runner = step_runner.require()
            budgets = torch.tensor([r.cache_size for r in requests], dtype=torch.long)
            seq_lens = self._host_seq_lens(cm).clone()
            evicting = seq_lens - 1 >= budgets
            row_table = host_table if plan[0].block_table is None else plan[0].block_table
            self._steady = SteadyStep(
                states=self._row_states(runner, cm.num_reqs), seq_lens=seq_lens,
                block_table=host_table.clone(), row_table=row_table.to(torch.long, copy=True),
                budgets=budgets, evicting=evicting, every_row_evicts=bool(evicting.all()),
                side_state=side_state, phase=phases[0], stock_inputs=stock_inputs,
                block_size=self.block_size)
        return self._step_metadata(cm, phases, side_state)

    def _step_metadata(self, cm, phases: list[TovaPhaseMetadata],
                       side_state: bool) -> TovaStepMetadata:
        layer_batch = None
        last = phases[-1]
        groups = last.eviction_groups
        if (self._layer_batch_on and len(phases) == 1 and last.evictions is not None
                and last.evictions.one_drop_each and last.accumulate is None
                and not any(policy.needs_accumulated for policy, _ in groups or ())):
            layer_batch = self._last_layer_batch = LayerBatch(
                last.evictions, self.num_layers, groups=groups,
                side_writes=(last.slots, last.positions) if side_state else None,
                attention_scores=(self._attention_scores and last.scored_by_attention
                                  and (groups is None or under_position_rules(groups))))
        return TovaStepMetadata(phases=phases, num_actual_tokens=cm.num_actual_tokens,
                                side_state=side_state, layer_batch=layer_batch)

    def _next_steady_step(self, common_prefix_len, cm, fast_build,
                          steady: SteadyStep) -> Optional[TovaStepMetadata]:
        """This step from the last one's plan when it is its next steady step (see
        :class:`SteadyStep`); None otherwise."""
        runner = step_runner.require()
        seq_lens = self._host_seq_lens(cm)
        host_table = host_block_table(cm.block_table_tensor[: cm.num_reqs])
        if not steady.follows(self._row_states(runner, cm.num_reqs), seq_lens, host_table):
            return None
        phase = steady.advance(seq_lens, cm.slot_mapping.device)
        vllm_slots = cm.slot_mapping[: cm.num_actual_tokens]
        vllm_slots.copy_(phase.slots.to(vllm_slots.dtype))
        if not (self.stock_metadata_is_pure and steady.every_row_evicts):
            stock = dict(steady.stock_inputs)
            stock.setdefault("block_table_tensor", cm.block_table_tensor)
            phase.attention = super().build(common_prefix_len, cm.replace(**stock), fast_build)
        self._steady = steady
        return self._step_metadata(cm, [phase], steady.side_state)

    def _steady_row(self, request: RequestStep) -> bool:
        """Whether a row may take part in a steady step: one decode token either below its
        budget or in steady decode."""
        schedule = request.schedule()
        return (schedule.decode_below_budget(request.num_computed, request.num_new)
                or schedule.steady_decode(request.num_computed, request.num_new,
                                          self.tova_spec.tova_copy_on_write))

    @staticmethod
    def _row_states(runner, num_reqs: int) -> list:
        return [runner.requests[r] for r in runner.input_batch.req_ids[:num_reqs]]

    @staticmethod
    def _host_seq_lens(cm) -> torch.Tensor:
        # The runner's host seq_lens are exact except for async speculative decoding,
        # which TOVA refuses; not filled by every runner: then the device copy.
        host = cm.seq_lens_cpu_upper_bound
        if host is None:
            host = cm.seq_lens.cpu()
        return host[: cm.num_reqs]

    def _plan(self, cm):
        """The step's phases, each row's policy, the host block table and whether side
        state is kept; None when nothing is or was evicted.  Made on the host, from host
        copies: no wait for the device (the runner's host seq_lens are exact except for
        async speculative decoding, which TOVA refuses)."""
        num_reqs = cm.num_reqs
        seq_lens = self._host_seq_lens(cm).tolist()
        prompt_lens, budgets, policies = batch_rows(num_reqs, self.settings)
        side_state = any(p.needs_positions for p in policies)
        if not side_state and all(n <= c for n, c in zip(seq_lens, budgets)):
            return None
        query_start = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        requests = [
            RequestStep(num_computed=seq_lens[row] - (query_start[row + 1] - query_start[row]),
                        num_new=query_start[row + 1] - query_start[row],
                        prompt_len=prompt_lens[row], cache_size=budgets[row],
                        prompt_chunk=self.tova_spec.prompt_chunk)
            for row in range(num_reqs)
        ]
        host_table = host_block_table(cm.block_table_tensor[:num_reqs])
        plan = plan_step(requests, host_table, self.block_size,
                         copy_on_write=self.tova_spec.tova_copy_on_write)
        return plan, requests, policies, host_table, side_state

    @staticmethod
    def _point_vllm_write(cm, first: Phase, device) -> None:
        """vLLM's own KV write (before attention, same slot tensor, updated in place) stores
        the first phase; later phases are written by the phase loop, after their eviction."""
        vllm_slots = cm.slot_mapping[: cm.num_actual_tokens]
        first_slots = host_to_device(first.slots, device).to(vllm_slots.dtype)
        if first.token_index is None:
            vllm_slots.copy_(first_slots)
        else:
            vllm_slots.fill_(-1)  # negative slots are skipped by the write op
            vllm_slots[host_to_device(first.token_index, device)] = first_slots

    @staticmethod
    def _stock_inputs(cm, phase: Phase, device) -> dict:
        """What the stock builder must see instead of the step's own
        ``CommonAttentionMetadata`` fields to build one phase's attention metadata."""

        def on_device(t: torch.Tensor) -> torch.Tensor:
            return host_to_device(t, device)

        inputs = dict(seq_lens=on_device(phase.cache_lens),
                      seq_lens_cpu_upper_bound=phase.cache_lens,
                      max_seq_len=int(phase.cache_lens.max()),
                      slot_mapping=on_device(phase.slots))
        # Copy-on-write: rows whose cache starts past block 0 read from their block base.
        if phase.block_table is not None:
            block_table = cm.block_table_tensor.clone()
            block_table[: cm.num_reqs] = on_device(phase.block_table)
            inputs["block_table_tensor"] = block_table
        if phase.token_index is not None:
            block_table = inputs.get("block_table_tensor", cm.block_table_tensor)
            rows = on_device(torch.tensor(phase.rows, dtype=torch.long))
            inputs.update(
                query_start_loc=on_device(phase.query_start_loc),
                query_start_loc_cpu=phase.query_start_loc,
                num_reqs=len(phase.rows),
                num_actual_tokens=int(phase.slots.numel()),
                max_query_len=phase.max_query_len,
                block_table_tensor=block_table[: cm.num_reqs][rows],
                is_prefilling=None,
                positions=None,
            )
        return inputs

    def _phase_metadata(self, common_prefix_len, cm, fast_build, phase: Phase, policies,
                        host_table, side_state: bool, device,
                        stock_inputs: dict) -> TovaPhaseMetadata:
        """The stock attention metadata of one phase (from ``stock_inputs``), with its
        eviction inputs on the device (made once per step, read by every layer)."""

        def on_device(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else host_to_device(t, device)

        if phase.block_table is not None:
            host_table = phase.block_table
        slots = stock_inputs["slot_mapping"]
        attention = super().build(common_prefix_len, cm.replace(**stock_inputs), fast_build)
        ev = phase.evictions
        ev_groups = eviction_queries = None
        if ev is not None:
            if side_state:
                ev_groups = group_rows([policies[r] for r in ev.rows.tolist()], device)
            # The eviction rows' last queries among the phase's tokens.
            eviction_queries = on_device(
                ev.query_index if phase.token_index is None else
                torch.searchsorted(phase.token_index, ev.query_index))
        accumulating = [j for j, r in enumerate(phase.rows) if policies[r].needs_accumulated]
        accumulate = (query_batch(phase, accumulating, host_table, self.block_size).to(device)
                      if accumulating else None)
        scored = (ev is not None and phase.token_index is None and not accumulating
                  and phase.slots.numel() == len(phase.rows)
                  and torch.equal(ev.query_index, ev.rows)
                  and torch.equal(ev.live.to(torch.long),
                                  phase.cache_lens.to(torch.long)[ev.rows]))
        return TovaPhaseMetadata(
            attention=attention, token_index=on_device(phase.token_index), slots=slots,
            positions=on_device(phase.positions),
            evictions=None if ev is None else ev.prepared(self.block_size, device),
            eviction_groups=ev_groups, accumulate=accumulate,
            eviction_queries=eviction_queries, scored_by_attention=scored,
        )
