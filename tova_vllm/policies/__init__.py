"""Eviction policy: how cached tokens are scored and which survive.

Pure torch, no vLLM import: the engine and the plain-PyTorch reference both call these
functions, so the policy is tested once and shared.
"""

from .schedule import EvictionSchedule, cdiv
from .scoring import head_summed_probs, tova_scores
from .selection import compaction_moves, slot_to_drop, slots_to_keep

__all__ = [
    "EvictionSchedule",
    "cdiv",
    "compaction_moves",
    "head_summed_probs",
    "slot_to_drop",
    "slots_to_keep",
    "tova_scores",
]
