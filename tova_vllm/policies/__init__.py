"""Eviction policy: how cached tokens are scored and which survive.

Pure torch, no vLLM import: the engine and the plain-PyTorch reference both call these
functions, so the policy is tested once and shared.
"""

from .eviction import (
    ACCUMULATE_QUERY_BLOCK,
    DEFAULT_SINKS,
    POLICY_NAMES,
    EvictionPolicy,
    accumulated_from_logits,
)
from .registry import PolicyUnit, policy_table, policy_units
from .schedule import EvictionSchedule, cdiv, decode_positions, peak_positions, peak_table_blocks
from .scoring import gqa_logits, head_summed_probs, head_summed_probs_from_logits, head_mean
from .selection import compaction_moves, prompt_eviction_moves, position_to_drop, positions_to_keep

__all__ = [
    "ACCUMULATE_QUERY_BLOCK",
    "PolicyUnit",
    "policy_table",
    "policy_units",
    "DEFAULT_SINKS",
    "POLICY_NAMES",
    "EvictionPolicy",
    "accumulated_from_logits",
    "EvictionSchedule",
    "cdiv",
    "decode_positions",
    "peak_positions",
    "peak_table_blocks",
    "compaction_moves",
    "gqa_logits",
    "head_summed_probs",
    "head_mean",
    "head_summed_probs_from_logits",
    "prompt_eviction_moves",
    "position_to_drop",
    "positions_to_keep",
]
