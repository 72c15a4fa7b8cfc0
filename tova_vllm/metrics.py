"""Prometheus series for TOVA on the API server's ``/metrics`` (``tova_`` prefix).

Registered through vLLM's ``vllm.stat_logger_plugins`` entry point; inert when TOVA is not
enabled.  The numbers come from the engine core through ``engine.stats_channel``.
"""

from __future__ import annotations

import weakref

from vllm.v1.metrics.loggers import StatLoggerBase

from .config import settings_from_additional_config
from .engine.stats_channel import channel_path, read_stats, remove_channel

_METRICS: dict = {}


def _metric(kind, name: str, documentation: str):
    # One collector per process, shared by all engines (the engine is a label).
    if name not in _METRICS:
        _METRICS[name] = kind(name, documentation, labelnames=["engine"])
    return _METRICS[name]


class TovaStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.enabled = settings_from_additional_config(vllm_config.additional_config) is not None
        if not self.enabled:
            return
        from prometheus_client import Counter, Gauge

        self.path = channel_path(vllm_config.instance_id, engine_index)
        # The engine core is killed on shutdown and cannot remove it: this process does,
        # at exit at the latest (weakref.finalize runs at interpreter exit).
        weakref.finalize(self, remove_channel, self.path)
        label = str(engine_index)
        self.evicted = _metric(
            Counter, "tova_evicted_tokens",
            "Tokens TOVA dropped from requests' KV caches (each layer drops this many)",
        ).labels(label)
        self.held = _metric(
            Gauge, "tova_kv_blocks_held", "KV blocks held by running requests under TOVA"
        ).labels(label)
        self.saved = _metric(
            Gauge, "tova_kv_blocks_saved",
            "KV blocks running requests would hold in addition with a full cache",
        ).labels(label)
        self._evicted_seen = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if not self.enabled:
            return
        stats = read_stats(self.path)
        if stats is None:
            return
        evicted, held, saved = stats
        if evicted > self._evicted_seen:
            self.evicted.inc(evicted - self._evicted_seen)
            self._evicted_seen = evicted
        self.held.set(held)
        self.saved.set(saved)

    def log_engine_initialized(self) -> None:
        pass
