"""Per-request facts that vLLM does not put into ``CommonAttentionMetadata``.

TOVA's eviction points depend on each request's prompt length and budget, but attention
metadata builders only see lengths and block tables (the block table only on the device).
The ``runner_publishes_batch`` patch (see ``tova_vllm/_patches.py``) publishes the model
runner while it builds attention metadata (``handoff.step_runner``); the TOVA builder reads
the batch's rows, and the host copy of its block table, from it.
"""

from __future__ import annotations

import torch

from ..config import TovaSettings, resolve_request
from ..policies import EvictionPolicy
from .handoff import step_runner


def batch_rows(num_reqs: int, settings: TovaSettings
               ) -> tuple[list[int], list[int], list[EvictionPolicy]]:
    """Prompt length, budget and eviction policy of each of the batch's first rows."""
    runner = step_runner.require()
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
    planning on CUDA does not wait for the device.  Falls back to copying it back.

    Found by matching ``data_ptr()`` because vLLM 0.32 gives builders the device table only
    and no way to name the buffer it is a view of; this cannot be made explicit without an
    upstream change: ``patches/03-host-batch-facts-in-attention-metadata.diff`` proposes
    ``CommonAttentionMetadata.block_table_cpu``, which would replace this lookup."""
    runner = step_runner.current()
    if runner is not None:
        for table in runner.input_batch.block_table.block_tables:
            buffer = table.block_table
            if buffer.gpu.data_ptr() == block_table.data_ptr():
                num_rows, width = block_table.shape
                return buffer.cpu[:num_rows, :width]
    return block_table.cpu()
