"""Scheduler side: a KV-cache spec that carries the budget, and a manager that allocates by
cache position instead of by logical position.

The engine core's KV managers get no config, only the spec, so the budget travels inside
it (``TovaSpec``).  ``TovaManager`` asks the request's ``EvictionSchedule`` how many cache
positions a step touches at most, allocates blocks for that, and once the prompt has been
processed frees every block past ``ceil((C + 1) / block_size)`` (nulling them in place, so
scheduler and worker block indices stay aligned, as sliding-window freeing does).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..config import request_cache_size
from ..policies import EvictionSchedule, cdiv, decode_positions, peak_positions
from .handoff import HandoffOrderError
from .stats_channel import StatsWriter


@dataclass(frozen=True, kw_only=True)
class TovaSpec(FullAttentionSpec):
    tova_cache_size: int = 0
    tova_prompt_chunk: int = 0  # 0: the paper's prompt mode

    @property
    def prompt_chunk(self) -> Optional[int]:
        return self.tova_prompt_chunk or None

    @classmethod
    def from_full_attention(cls, spec: FullAttentionSpec, cache_size: int,
                            prompt_chunk: Optional[int]) -> "TovaSpec":
        base = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
        return cls(**base, tova_cache_size=cache_size, tova_prompt_chunk=prompt_chunk or 0)

    @classmethod
    def merge(cls, specs: list["TovaSpec"]) -> "TovaSpec":
        # FullAttentionSpec.merge rebuilds from base fields only and would reset ours.
        merged = FullAttentionSpec.merge.__func__(FullAttentionSpec, specs)
        budgets = {(s.tova_cache_size, s.tova_prompt_chunk) for s in specs}
        if len(budgets) != 1:
            raise ValueError(f"tova-vllm: layers of one KV group disagree on the budget: {budgets}")
        (cache_size, prompt_chunk), = budgets
        return cls.from_full_attention(merged, cache_size, prompt_chunk or None)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        """Blocks one request can hold at its peak (startup fit check, max concurrency).

        Decoding requests hold ceil((C + 1) / block_size) blocks; ``chunked`` prompts peak
        at C + prompt_chunk; the paper's ``prompt`` mode holds the whole prompt until its
        last token, so its peak stays max_model_len.
        """
        positions = peak_positions(self.tova_cache_size, self.prompt_chunk,
                                   vllm_config.model_config.max_model_len)
        return cdiv(positions, self.block_size) * self.page_size_bytes


class TovaManager(FullAttentionManager):
    """Full-attention manager whose token counts are cache positions, not logical ones."""

    # Set by the scheduler patches right after ``Scheduler.__init__`` (see handoff.py).
    #: The scheduler's request table (``scheduler_shares_requests``): manager calls carry
    #: only a request id, and the schedule needs the prompt length.
    requests: Optional[dict] = None
    #: The scheduler's TOVA counters for ``/metrics`` (``scheduler_reports_evictions``),
    #: on the scheduler's first TOVA manager when it logs stats; None otherwise.
    stats: Optional[StatsWriter] = None

    def __init__(self, kv_cache_spec: TovaSpec, *args, **kwargs) -> None:
        super().__init__(kv_cache_spec, *args, **kwargs)
        assert not self.enable_caching, "tova-vllm requires prefix caching to be off"
        self._positions_to_allocate: dict[str, int] = {}

    def _schedule(self, request_id: str) -> EvictionSchedule:
        if self.requests is None:
            raise HandoffOrderError(
                "tova-vllm: the scheduler did not share its request table (patch "
                "scheduler_shares_requests runs right after Scheduler.__init__)")
        return self.schedule_of(self.requests[request_id])

    def schedule_of(self, request) -> EvictionSchedule:
        spec: TovaSpec = self.kv_cache_spec
        # Validated when the request entered the engine (input_processor_validates_budget).
        budget = request_cache_size(
            getattr(request.sampling_params, "extra_args", None), spec.tova_cache_size
        )
        return EvictionSchedule(budget, request.num_prompt_tokens, spec.prompt_chunk)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        schedule = self._schedule(request_id)
        positions = schedule.peak_live(total_computed_tokens, num_tokens - total_computed_tokens)
        # allocate_new_blocks is not told the computed count; remember the answer for it.
        self._positions_to_allocate[request_id] = positions
        return super().get_num_blocks_to_allocate(
            request_id, positions, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, positions, apply_admission_cap, prefill_end,
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        positions = self._positions_to_allocate.pop(request_id)
        blocks = self.req_to_blocks[request_id]
        # Never re-grow into positions whose blocks were freed: the worker still maps
        # those indices to stale block ids that now belong to other requests.
        assert not any(b is self._null_block for b in blocks[: cdiv(positions, self.block_size)]), (
            f"tova-vllm: request {request_id} would re-grow into freed blocks"
        )
        return super().allocate_new_blocks(request_id, positions, positions)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                              num_prompt_tokens=None) -> None:
        schedule = self._schedule(request_id)
        if processed_computed_tokens >= schedule.prompt_len > 0:
            keep_blocks = cdiv(decode_positions(schedule.cache_size), self.block_size)
            self._remove_blocks_in_range(request_id, keep_blocks, len(self.req_to_blocks[request_id]))

    def free(self, request_id: str) -> None:
        self._positions_to_allocate.pop(request_id, None)
        super().free(request_id)
