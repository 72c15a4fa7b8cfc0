"""Attention metadata for a TOVA step, shared by the CPU and CUDA backends.

A mixin placed before vLLM's own metadata builder: it plans the step once (``plan.py``),
points vLLM's KV write at the first phase's cache slots, and asks the stock builder for one
metadata object per phase, so each platform keeps its own attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import os

import torch

from ..config import settings_from_additional_config
from .device_copy import host_to_device
from .layer_batch import LayerBatch
from .plan import EvictionBatch, Phase, QueryBatch, RequestStep, plan_step, query_batch
from .spec import TovaSpec
from .side_state import PolicyGroups, group_rows
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


@dataclass
class TovaStepMetadata:
    phases: list[TovaPhaseMetadata]
    num_actual_tokens: int
    #: Some row's policy reads per-slot side state, so every write must record it.
    side_state: bool
    #: Steady decode with TOVA scores only: every layer defers its eviction to this batch
    #: (``layer_batch.py``); None: each layer evicts right after its attention.
    layer_batch: Optional[LayerBatch] = None


class TovaPhasedBuilder:
    """Mixin: ``class Builder(TovaPhasedBuilder, StockBuilder)``."""

    #: The platform's evictor can evict all layers at once (``Evictor.evict_layers``).
    batches_layers: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tova_spec = kv_cache_spec if isinstance(kv_cache_spec, TovaSpec) else None
        self.settings = settings_from_additional_config(vllm_config.additional_config)
        self.num_layers = len(layer_names)
        self._layer_batch_on = (self.batches_layers
                                and os.environ.get("TOVA_VLLM_LAYER_BATCH", "1") != "0")
        self._last_layer_batch: Optional[LayerBatch] = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        if self.tova_spec is None:
            return super().build(common_prefix_len, cm, fast_build)
        if self._last_layer_batch is not None:
            self._last_layer_batch.check_finished()
            self._last_layer_batch = None
        planned = self._plan(cm)
        if planned is None:
            # Nothing has been or will be evicted this step: cache positions are logical
            # positions, and vLLM's own metadata and KV write are exactly right.
            return super().build(common_prefix_len, cm, fast_build)
        plan, policies, host_table, side_state = planned
        device = cm.slot_mapping.device
        self._point_vllm_write(cm, plan[0], device)
        phases = [self._phase_metadata(common_prefix_len, cm, fast_build, phase, policies,
                                       host_table, side_state, device) for phase in plan]
        layer_batch = None
        last = phases[-1]
        groups = last.eviction_groups
        if (self._layer_batch_on and len(phases) == 1 and last.evictions is not None
                and last.evictions.one_drop_each and last.accumulate is None
                and not any(policy.needs_accumulated for policy, _ in groups or ())):
            layer_batch = self._last_layer_batch = LayerBatch(last.evictions, self.num_layers,
                                                              groups=groups)
        return TovaStepMetadata(phases=phases, num_actual_tokens=cm.num_actual_tokens,
                                side_state=side_state, layer_batch=layer_batch)

    def _plan(self, cm):
        """The step's phases, each row's policy, the host block table and whether side
        state is kept; None when nothing is or was evicted.  Made on the host, from host
        copies: no wait for the device (the runner's host seq_lens are exact except for
        async speculative decoding, which TOVA refuses)."""
        num_reqs = cm.num_reqs
        host_seq_lens = cm.seq_lens_cpu_upper_bound
        if host_seq_lens is None:  # not filled by this runner: read the device copy
            host_seq_lens = cm.seq_lens.cpu()
        seq_lens = host_seq_lens[:num_reqs].tolist()
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
        return plan, policies, host_table, side_state

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

    def _phase_metadata(self, common_prefix_len, cm, fast_build, phase: Phase, policies,
                        host_table, side_state: bool, device) -> TovaPhaseMetadata:
        """The stock attention metadata of one phase, with its eviction inputs on the
        device (made once per step, read by every layer)."""

        def on_device(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else host_to_device(t, device)

        max_seq_len = int(phase.cache_lens.max())
        slots = on_device(phase.slots)
        # Copy-on-write: rows whose cache starts past block 0 read from their block base.
        block_table = cm.block_table_tensor
        if phase.block_table is not None:
            host_table = phase.block_table
            block_table = block_table.clone()
            block_table[: cm.num_reqs] = on_device(phase.block_table)
        if phase.token_index is None:
            phase_cm = cm.replace(seq_lens=on_device(phase.cache_lens),
                                  seq_lens_cpu_upper_bound=phase.cache_lens,
                                  max_seq_len=max_seq_len, slot_mapping=slots,
                                  block_table_tensor=block_table)
        else:
            rows = host_to_device(torch.tensor(phase.rows, dtype=torch.long), device)
            phase_cm = cm.replace(
                query_start_loc=on_device(phase.query_start_loc),
                query_start_loc_cpu=phase.query_start_loc,
                seq_lens=on_device(phase.cache_lens),
                seq_lens_cpu_upper_bound=phase.cache_lens,
                num_reqs=len(phase.rows),
                num_actual_tokens=int(phase.slots.numel()),
                max_query_len=phase.max_query_len,
                max_seq_len=max_seq_len,
                block_table_tensor=block_table[: cm.num_reqs][rows],
                slot_mapping=slots,
                is_prefilling=None,
                positions=None,
            )
        attention = super().build(common_prefix_len, phase_cm, fast_build)
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
        return TovaPhaseMetadata(
            attention=attention, token_index=on_device(phase.token_index), slots=slots,
            positions=on_device(phase.positions),
            evictions=None if ev is None else ev.prepared(self.block_size, device),
            eviction_groups=ev_groups, accumulate=accumulate,
            eviction_queries=eviction_queries,
        )
