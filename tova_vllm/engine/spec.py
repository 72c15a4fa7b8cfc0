"""Scheduler side: a KV-cache spec that carries the budget, and a manager that allocates by
cache position instead of by logical position.

The engine core's KV managers get no config, only the spec, so the budget travels inside
it (``TovaSpec``).  ``TovaManager`` asks the request's ``EvictionSchedule`` how many block
table entries a step touches at most, allocates blocks for that, and once the prompt has
been processed frees every block past ``ceil((C + 1) / block_size)`` (nulling them in place,
so scheduler and worker block indices stay aligned, as sliding-window freeing does).

With prefix caching on, eviction is copy-on-write (``plan.py``): the blocks written before
a request's first eviction are ordinary vLLM blocks, hashed, shared and cached as usual;
the first eviction gathers the survivors into private blocks appended after them, the
ordinary ones are released to the pool once that step is processed, and the private ones
are never hashed (``cache_blocks`` stops before them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..config import request_cache_size
from ..policies import EvictionSchedule, peak_table_blocks
from .handoff import HandoffOrderError
from .stats_channel import StatsWriter


@dataclass(frozen=True, kw_only=True)
class TovaSpec(FullAttentionSpec):
    tova_cache_size: int = 0
    tova_prompt_chunk: int = 0  # 0: the paper's prompt mode
    tova_copy_on_write: bool = False  # prefix caching on: see the module docstring

    @property
    def prompt_chunk(self) -> Optional[int]:
        return self.tova_prompt_chunk or None

    @classmethod
    def from_full_attention(cls, spec: FullAttentionSpec, cache_size: int,
                            prompt_chunk: Optional[int], copy_on_write: bool = False
                            ) -> "TovaSpec":
        base = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
        return cls(**base, tova_cache_size=cache_size, tova_prompt_chunk=prompt_chunk or 0,
                   tova_copy_on_write=copy_on_write)

    @classmethod
    def merge(cls, specs: list["TovaSpec"]) -> "TovaSpec":
        # FullAttentionSpec.merge rebuilds from base fields only and would reset ours.
        merged = FullAttentionSpec.merge.__func__(FullAttentionSpec, specs)
        budgets = {(s.tova_cache_size, s.tova_prompt_chunk, s.tova_copy_on_write) for s in specs}
        if len(budgets) != 1:
            raise ValueError(f"tova-vllm: layers of one KV group disagree on the budget: {budgets}")
        (cache_size, prompt_chunk, copy_on_write), = budgets
        return cls.from_full_attention(merged, cache_size, prompt_chunk or None, copy_on_write)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        """Blocks one request can hold at its peak (startup fit check, max concurrency).

        Decoding requests hold ceil((C + 1) / block_size) blocks; ``chunked`` prompts peak
        at C + prompt_chunk; the paper's ``prompt`` mode holds the whole prompt until its
        last token, so its peak stays max_model_len.  Copy-on-write adds the private blocks
        of the first eviction (``policies.peak_table_blocks``).
        """
        blocks = peak_table_blocks(self.tova_cache_size, self.prompt_chunk,
                                   vllm_config.model_config.max_model_len, self.block_size,
                                   self.tova_copy_on_write)
        return blocks * self.page_size_bytes


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
        if bool(self.enable_caching) != kv_cache_spec.tova_copy_on_write:
            raise HandoffOrderError(
                f"tova-vllm: the scheduler's prefix caching ({self.enable_caching}) differs "
                f"from what the workers built the KV spec for "
                f"({kv_cache_spec.tova_copy_on_write}); the cache layout would disagree")
        self.copy_on_write = kv_cache_spec.tova_copy_on_write
        #: Per request: (block table entries, block base) of the coming allocate_new_blocks.
        self._table_to_allocate: dict[str, tuple[int, int]] = {}
        #: Per request: the (start, end, table length) its blocks were last trimmed to.
        self._held: dict[str, tuple[int, Optional[int], int]] = {}
        #: Per request: (request, prompt length, schedule), asked several times per step.
        self._schedules: dict[str, tuple[Any, int, EvictionSchedule]] = {}

    def _schedule(self, request_id: str) -> EvictionSchedule:
        if self.requests is None:
            raise HandoffOrderError(
                "tova-vllm: the scheduler did not share its request table (patch "
                "scheduler_shares_requests runs right after Scheduler.__init__)")
        return self.schedule_of(self.requests[request_id])

    def schedule_of(self, request) -> EvictionSchedule:
        known = self._schedules.get(request.request_id)
        if known is not None and known[0] is request and known[1] == request.num_prompt_tokens:
            return known[2]
        spec: TovaSpec = self.kv_cache_spec
        # Validated when the request entered the engine (input_processor_validates_budget).
        budget = request_cache_size(
            getattr(request.sampling_params, "extra_args", None), spec.tova_cache_size
        )
        schedule = EvictionSchedule(budget, request.num_prompt_tokens, spec.prompt_chunk)
        self._schedules[request.request_id] = (request, request.num_prompt_tokens, schedule)
        return schedule

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        schedule = self._schedule(request_id)
        entries = schedule.table_blocks(total_computed_tokens,
                                        num_tokens - total_computed_tokens, self.block_size,
                                        self.copy_on_write)
        base = schedule.private_base(total_computed_tokens, self.block_size) \
            if self.copy_on_write else 0
        # allocate_new_blocks is not told the computed count; remember the answer for it.
        self._table_to_allocate[request_id] = (entries, base)
        tokens = entries * self.block_size
        return super().get_num_blocks_to_allocate(
            request_id, tokens, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, tokens, apply_admission_cap, prefill_end,
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        entries, base = self._table_to_allocate.pop(request_id)
        blocks = self.req_to_blocks[request_id]
        # Never re-grow into entries whose blocks were freed: the worker still maps those
        # indices to stale block ids that now belong to other requests.  (Copy-on-write
        # frees the ordinary blocks below the base, which the request never reads again.)
        assert not any(b is self._null_block for b in blocks[base:entries]), (
            f"tova-vllm: request {request_id} would re-grow into freed blocks"
        )
        tokens = entries * self.block_size
        return super().allocate_new_blocks(request_id, tokens, tokens)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                              num_prompt_tokens=None) -> None:
        # On the processed basis (vLLM's caller): with copy-on-write, the step that
        # gathered the survivors out of the ordinary blocks has run, so no step reads them.
        start, end = self._schedule(request_id).held_table(
            processed_computed_tokens, self.block_size, self.copy_on_write)
        blocks = self.req_to_blocks[request_id]
        if (start, end, len(blocks)) == self._held.get(request_id):
            return  # steady decode: freed up to here already, nothing new past the end
        self._held[request_id] = (start, end, len(blocks))
        if start:
            self._remove_blocks_in_range(request_id, 0, start)
        if end is not None:
            self._remove_blocks_in_range(request_id, end, len(blocks))

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        """Publish only blocks written before the request's first eviction: they hold the
        same K/V as without TOVA, whatever the budget or policy.  vLLM hashes by block
        index, so without this cap the private blocks appended after them would be
        published under the hashes of logical blocks they do not hold."""
        if self.copy_on_write:
            first = self.schedule_of(request).first_eviction()
            num_tokens = min(num_tokens, first // self.block_size * self.block_size)
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def max_cache_hit(self, request) -> int:
        """Most prompt tokens a prefix-cache hit may cover for ``request``: the hit must end
        before its first eviction, whose scores need the attention of the token before it
        (and every evicted token's K/V is then no longer vanilla)."""
        return (self.schedule_of(request).first_eviction() - 1) // self.block_size * self.block_size

    def free(self, request_id: str) -> None:
        self._table_to_allocate.pop(request_id, None)
        self._schedules.pop(request_id, None)
        self._held.pop(request_id, None)
        super().free(request_id)
