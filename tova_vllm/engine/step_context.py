"""Per-request facts that vLLM does not put into ``CommonAttentionMetadata``.

TOVA's eviction points depend on each request's prompt length and budget, but attention
metadata builders only see lengths and block tables (the block table only on the device).
The ``runner_publishes_batch`` patch (see ``tova_vllm/_patches.py``) records the model runner
while it builds attention metadata; the TOVA builder reads the batch's rows, and the host
copy of its block table, from it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import torch

from ..config import TovaSettings, resolve_request
from ..policies import EvictionPolicy

_local = threading.local()


@contextlib.contextmanager
def publishing_runner(runner: Any) -> Iterator[None]:
    previous = getattr(_local, "runner", None)
    _local.runner = runner
    try:
        yield
    finally:
        _local.runner = previous


def current_runner() -> Optional[Any]:
    return getattr(_local, "runner", None)


def batch_rows(num_reqs: int, settings: TovaSettings
               ) -> tuple[list[int], list[int], list[EvictionPolicy]]:
    """Prompt length, budget and eviction policy of each of the batch's first rows."""
    runner = current_runner()
    if runner is None:
        raise RuntimeError(
            "tova-vllm: attention metadata was built outside GPUModelRunner."
            "_build_attention_metadata, so the batch's prompt lengths are unknown"
        )
    batch = runner.input_batch
    budgets, policies = [], []
    for req_id in batch.req_ids[:num_reqs]:
        # Validated when the request entered the engine (input_processor_validates_budget).
        extra_args = getattr(runner.requests[req_id].sampling_params, "extra_args", None)
        budget, policy = resolve_request(extra_args, settings)
        budgets.append(budget)
        policies.append(policy)
    return batch.num_prompt_tokens[:num_reqs].tolist(), budgets, policies


def host_block_table(block_table: torch.Tensor) -> torch.Tensor:
    """The rows of ``block_table`` (a view of one of the runner's device block tables) from
    the runner's host copy, which it filled and committed before building metadata; so
    planning on CUDA does not wait for the device.  Falls back to copying it back."""
    runner = current_runner()
    if runner is not None:
        for table in runner.input_batch.block_table.block_tables:
            buffer = table.block_table
            if buffer.gpu.data_ptr() == block_table.data_ptr():
                num_rows, width = block_table.shape
                return buffer.cpu[:num_rows, :width]
    return block_table.cpu()
