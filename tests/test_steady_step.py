"""Steady decode reuses the last step's plan (``phased_builder.SteadyStep``).

* In the engine, every step the builder took from the last one's plan is checked against
  the plan made afresh for the same step (slots, positions, eviction rows, block tables,
  stock attention inputs), over batches with staggered arrivals, prompts shorter and
  longer than the budget, per-request budgets and policies, ``chunked`` mode, prefix
  caching on and off, on the CPU backend and on the CUDA backend's builder (FlashAttention
  stand-ins on CPU); the reuse must have happened, and the tokens equal the reference.
* ``EvictionSchedule.steady_decode`` (what makes a step reusable, and the KV manager's
  short cut) holds from a point on, and nothing it promises changes from one such step to
  the next.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from flash_attn_on_cpu import flash_attention_on_cpu

from tova_vllm.policies import EvictionSchedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("cache_size,prompt_len,prompt_chunk",
                         [(8, 3, None), (8, 8, None), (8, 30, None), (8, 30, 4), (8, 30, 7),
                          (1, 5, None), (5, 1, 2), (16, 17, 16)])
@pytest.mark.parametrize("block_size", (1, 4, 16))
@pytest.mark.parametrize("cow", (False, True))
def test_steady_decode_is_a_fixed_point(cache_size, prompt_len, prompt_chunk, block_size, cow):
    s = EvictionSchedule(cache_size, prompt_len, prompt_chunk)
    steady = [s.steady_decode(n, 1, cow) for n in range(prompt_len + cache_size + 8)]
    first = steady.index(True)
    assert all(steady[first:]) and not any(steady[:first])
    assert first == max(prompt_len, cache_size, s.first_eviction() if cow else 0)
    for n in range(first, len(steady)):
        # C live before the token, one eviction after it, at the same table entries.
        assert s.live_after(n) == cache_size
        assert list(s.segments(n, 1)) == [(n, n + 1, True)]
        if cow:  # the survivors already live in the private blocks
            assert s.private_base(n, block_size) == s.private_base(n + 1, block_size) > 0
        assert s.table_blocks(n, 1, block_size, cow) == s.table_blocks(first, 1, block_size, cow)
        assert s.held_table(n, block_size, cow) == s.held_table(first, block_size, cow)
    assert not s.steady_decode(first, 2, cow)


def _same(a, b, what):
    assert (a is None) == (b is None), what
    if a is not None:
        assert torch.equal(a.cpu(), b.cpu()), what


@pytest.mark.parametrize("backend,prefix_caching,prompt_chunk", [
    ("cpu", True, None), ("cpu", False, None), ("cpu", True, 8), ("cpu", False, 8),
    # The CUDA backend's builder shares the mixin (FlashAttention stand-ins on CPU).
    ("cuda on cpu", True, None), ("cuda on cpu", False, None),
])
def test_engine_reused_steps_equal_fresh_plans(tiny_models, hf_models, monkeypatch, backend,
                                               prefix_caching, prompt_chunk):
    from engine_harness import Req, random_prompts, run_equals_reference

    from tova_vllm.engine import phased_builder

    builder_cls = phased_builder.TovaPhasedBuilder
    original = builder_cls._next_steady_step
    reused, planned, kept_steps, last_attention = [], [], [], {}

    def checked(self, common_prefix_len, cm, fast_build, steady):
        step = original(self, common_prefix_len, cm, fast_build, steady)
        if step is None:
            return None
        (phase,) = step.phases
        fresh_plan, _, _, _, _ = self._plan(cm)
        (fresh,) = fresh_plan
        block_size = self.block_size
        want = fresh.evictions.prepared(block_size, torch.device("cpu"))
        got = phase.evictions
        for name in ("rows", "query_index", "query_position", "block_ids", "block_offsets",
                     "live", "keep", "slots", "block_table", "padding", "relocate",
                     "dest_slots"):
            _same(getattr(got, name), getattr(want, name), name)
        assert got.one_drop_each and want.one_drop_each
        assert (got.keep_list, got.live_list) == (want.keep_list, want.live_list)
        _same(phase.slots, fresh.slots, "slots")
        _same(phase.positions, fresh.positions, "positions")
        _same(phase.token_index, fresh.token_index, "token_index")
        stock = self._stock_inputs(cm, fresh, torch.device("cpu"))
        inputs = steady.stock_inputs
        for name in ("seq_lens", "seq_lens_cpu_upper_bound", "slot_mapping"):
            _same(inputs[name], stock[name], name)
        assert inputs["max_seq_len"] == stock["max_seq_len"]
        _same(inputs.get("block_table_tensor"), stock.get("block_table_tensor"),
              "block_table_tensor")
        # vLLM's own KV write goes to the fresh plan's slots.
        _same(cm.slot_mapping[: cm.num_actual_tokens], fresh.slots, "vLLM write")
        # The stock metadata (kept from the last step where every row evicts and the
        # platform's is pure) equals the one the stock builder makes for this step.
        stock.setdefault("block_table_tensor", cm.block_table_tensor)
        made = super(builder_cls, self).build(common_prefix_len, cm.replace(**stock),
                                              fast_build)
        kept = phase.attention is last_attention.get(id(self))
        assert not kept or (self.stock_metadata_is_pure and steady.every_row_evicts)
        kept_steps.append(kept)
        last_attention[id(self)] = phase.attention
        for name, value in vars(made).items():
            if name == "scheduler_metadata":
                continue  # has uninitialised bytes: two builds of the same inputs differ
            got_value = getattr(phase.attention, name)
            if isinstance(value, torch.Tensor):
                rows = cm.num_reqs if name == "block_table" else None
                _same(got_value[:rows], value[:rows], f"stock metadata {name}")
            else:
                assert got_value == value, f"stock metadata {name}"
        reused.append((cm.num_reqs, bool(steady.evicting.all())))
        return step

    def counted_plan(self, cm):
        planned.append(cm.num_reqs)
        return original_plan(self, cm)

    original_plan = builder_cls._plan
    monkeypatch.setattr(builder_cls, "_next_steady_step", checked)
    monkeypatch.setattr(builder_cls, "_plan", counted_plan)
    # Prompts shorter and longer than C, arrivals while others decode, per-request budgets
    # and the position-only policies in the same batch.
    prompts = random_prompts([5, 40, 90, 17, 33, 60], seed=11)
    # Row 0 reaches its budget inside a block (no new block marks the change).
    extra = [{"tova_cache_size": 20}, {"tova_cache_size": 24}, {}, {"tova_policy": "window"},
             {"tova_policy": "sink_window", "tova_cache_size": 20}, {}]
    arrivals = [0, 0, 3, 10, 10, 25]
    requests = [Req(p, 48, a, x) for p, a, x in zip(prompts, arrivals, extra)]
    tova = {"cache_size": 32}
    if prompt_chunk is not None:
        tova.update(prompt_mode="chunked", prompt_chunk=prompt_chunk)
    with contextlib.ExitStack() as stack:
        if backend == "cuda on cpu":
            stack.enter_context(flash_attention_on_cpu())
        run_equals_reference(tiny_models["llama_gqa"], hf_models["llama_gqa"], requests, tova,
                             enable_prefix_caching=prefix_caching)
    # Most decode steps of this workload are steady ones, with several rows, some while a
    # short prompt's row still grows towards its budget.
    assert len(reused) > 20 and max(n for n, _ in reused) >= 3, (len(reused), len(planned))
    assert {True, False} <= {all_evict for _, all_evict in reused}
    # The CPU builder keeps its stock metadata in most of them; the CUDA one never does.
    assert (sum(kept_steps) > 10) == (backend == "cpu"), sum(kept_steps)


def test_engine_without_reuse_plans_every_step(tiny_models, monkeypatch):
    """``TOVA_VLLM_REUSE_STEADY=0`` turns the reuse off (every evicting step planned)."""
    from engine_harness import Req, make_llm, random_prompts, run, shutdown

    from tova_vllm.engine import phased_builder

    monkeypatch.setenv("TOVA_VLLM_REUSE_STEADY", "0")
    original = phased_builder.TovaPhasedBuilder._next_steady_step
    calls = []
    monkeypatch.setattr(phased_builder.TovaPhasedBuilder, "_next_steady_step",
                        lambda *a: calls.append(1) or original(*a))
    llm = make_llm(tiny_models["llama_gqa"], {"cache_size": 16})
    try:
        on = run(llm, [Req(p, 24) for p in random_prompts([20, 30], seed=2)])
    finally:
        shutdown(llm)
    assert not calls and len(on.tokens[0]) == 24
