"""The state tova-vllm hands between vLLM hooks (``tova_vllm/engine/handoff.py``).

Each hand-off exists because vLLM 0.32 calls one hook before another with no argument in
common.  These tests fail if vLLM changes that order: a read before its write raises
``HandoffOrderError`` (never a silent run without TOVA), and inside a real engine every
write comes before the first read.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from engine_harness import Req, kv_manager, make_llm, random_prompts, run, scheduler_of, shutdown
from tova_vllm.config import settings_from_additional_config
from tova_vllm.engine import handoff
from tova_vllm.engine.handoff import HandoffOrderError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CACHE_SIZE = 32


def _full_attention_spec():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=16, dtype=torch.float32)


# ------------------------------------------------------------------ worker settings


def test_spec_asked_before_any_layer_is_an_order_error(monkeypatch):
    """customize_spec before any TOVA impl was built: an error, not the plain spec."""
    from tova_vllm.engine.layer_setup import customize_tova_spec
    from tova_vllm.engine.spec import TovaSpec

    monkeypatch.setattr(handoff, "worker_settings", handoff.WorkerSettings())
    spec = _full_attention_spec()
    with pytest.raises(HandoffOrderError, match="before any TOVA attention impl was built"):
        customize_tova_spec(spec)

    handoff.worker_settings.publish(None)  # TOVA off: the plain spec
    assert customize_tova_spec(spec) is spec

    handoff.worker_settings.publish(
        settings_from_additional_config({"tova": {"cache_size": CACHE_SIZE}}))
    tova_spec = customize_tova_spec(spec)
    assert isinstance(tova_spec, TovaSpec) and tova_spec.tova_cache_size == CACHE_SIZE
    assert tova_spec.page_size_bytes == spec.page_size_bytes
    assert not tova_spec.tova_copy_on_write

    # Prefix caching on: the spec says so, for the scheduler's manager and the builder.
    handoff.worker_settings.publish(
        settings_from_additional_config({"tova": {"cache_size": CACHE_SIZE}}),
        copy_on_write=True)
    assert customize_tova_spec(spec).tova_copy_on_write


# ------------------------------------------------------------------ step runner


def test_builder_outside_the_runner_is_an_order_error():
    from tova_vllm.engine.step_context import batch_rows

    settings = settings_from_additional_config({"tova": {"cache_size": CACHE_SIZE}})
    assert handoff.step_runner.current() is None
    with pytest.raises(HandoffOrderError, match="outside GPUModelRunner"):
        batch_rows(1, settings)


def test_step_runner_is_scoped_and_per_thread():
    runner, inner = SimpleNamespace(), SimpleNamespace()
    seen_by_other_thread = []
    with handoff.step_runner.publishing(runner):
        assert handoff.step_runner.require() is runner
        with handoff.step_runner.publishing(inner):
            assert handoff.step_runner.current() is inner
        assert handoff.step_runner.current() is runner
        thread = threading.Thread(
            target=lambda: seen_by_other_thread.append(handoff.step_runner.current()))
        thread.start()
        thread.join()
    assert seen_by_other_thread == [None]
    assert handoff.step_runner.current() is None


# ------------------------------------------------------------------ scheduler -> manager


def test_manager_before_the_scheduler_shared_requests_is_an_order_error():
    from tova_vllm.engine.spec import TovaManager

    unshared = SimpleNamespace(requests=None)
    with pytest.raises(HandoffOrderError, match="did not share its request table"):
        TovaManager._schedule(unshared, "0")


# ------------------------------------------------------------------ in vLLM's engine


@pytest.fixture(scope="module")
def engine_events(tiny_models):
    """One TOVA engine (stats on) built and run with every hand-off recorded in order."""
    from tova_vllm.engine import phased_builder

    events: list[tuple[str, object]] = []
    patch = pytest.MonkeyPatch()
    settings, runner = handoff.worker_settings, handoff.step_runner
    publish, read = settings.publish, settings.read

    def recording_publish(value, **kwargs):
        events.append(("publish settings", value))
        publish(value, **kwargs)

    def recording_read():
        value = read()
        events.append(("read settings", value))
        return value

    original_build = phased_builder.TovaPhasedBuilder.build

    def recording_build(self, common_prefix_len, cm, fast_build=False):
        if self.tova_spec is not None:
            events.append(("build", runner.current()))
        return original_build(self, common_prefix_len, cm, fast_build)

    patch.setattr(settings, "publish", recording_publish)
    patch.setattr(settings, "read", recording_read)
    patch.setattr(phased_builder.TovaPhasedBuilder, "build", recording_build)
    llm = make_llm(tiny_models["llama_gqa"], {"cache_size": CACHE_SIZE},
                   disable_log_stats=False)
    try:
        scheduler = scheduler_of(llm)
        manager = kv_manager(scheduler)
        layers = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        impls = [layer.impl for layer in layers.values() if hasattr(layer, "impl")]
        run(llm, [Req(p, 8) for p in random_prompts((100, 40), seed=3)])
        yield SimpleNamespace(events=events, scheduler=scheduler, manager=manager,
                              impls=impls, runner_after=runner.current())
    finally:
        patch.undo()
        shutdown(llm)


def test_every_layer_publishes_before_vllm_asks_for_specs(engine_events):
    kinds = [kind for kind, _ in engine_events.events]
    assert "publish settings" in kinds and "read settings" in kinds
    first_read = kinds.index("read settings")
    publishes = [i for i, kind in enumerate(kinds) if kind == "publish settings"]
    assert publishes[-1] < first_read, "vLLM asked for a KV spec before building every layer"
    reads = [value for kind, value in engine_events.events if kind == "read settings"]
    assert all(value is not None and value.cache_size == CACHE_SIZE for value in reads)


def test_the_scheduler_got_tova_specs_and_shared_its_state(engine_events):
    from tova_vllm.engine.spec import TovaManager, TovaSpec

    manager = engine_events.manager
    assert isinstance(manager, TovaManager) and isinstance(manager.kv_cache_spec, TovaSpec)
    assert manager.kv_cache_spec.tova_cache_size == CACHE_SIZE
    assert manager.requests is engine_events.scheduler.requests
    assert manager.stats is not None and manager.stats.evicted_tokens > 0


def test_every_tova_build_runs_inside_the_runners_metadata_build(engine_events):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [value for kind, value in engine_events.events if kind == "build"]
    assert runners, "no TOVA metadata was built"
    assert all(isinstance(r, GPUModelRunner) for r in runners)
    assert len({id(r) for r in runners}) == 1
    assert engine_events.runner_after is None  # published only while it builds


def test_impls_hold_their_tensor_parallel_facts(engine_events):
    from tova_vllm.engine.layer_setup import TensorParallel

    assert engine_events.impls
    for impl in engine_events.impls:
        assert isinstance(impl._tp, TensorParallel)
        assert (impl._tp.size, impl._tp.group, impl._tp.all_reduce) == (1, None, None)
        assert impl._tp.total_q_heads == impl.num_heads
        assert not hasattr(impl, "tp_group") and not hasattr(impl, "total_q_heads")
