"""Eviction counters from the engine core to the API server's ``/metrics``.

The scheduler (engine-core process) knows what TOVA evicts and holds; Prometheus lives in
the API server process, and vLLM's ``SchedulerStats`` has no field a plugin may fill (its
msgpack encoding drops unknown attributes).  The scheduler therefore writes three int64
counters into a small shared-memory file named after the engine's ``instance_id`` (the same
in every process of one engine), and the ``vllm.stat_logger_plugins`` logger in the API
server reads them on every stats update.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Optional

_FORMAT = "<qqq"  # evicted tokens (cumulative), KV blocks held, KV blocks saved
_SIZE = struct.calcsize(_FORMAT)


def channel_path(instance_id: str, engine_index: int) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"tova-vllm-{instance_id or 'default'}-{engine_index}.stats"


class StatsWriter:
    """Engine-core side: cumulative evictions and the current block counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.evicted_tokens = 0
        self._blocks = (0, 0)

    def set_blocks(self, held: int, saved: int) -> None:
        self._blocks = (held, saved)

    def publish(self) -> None:
        self._map[:] = struct.pack(_FORMAT, self.evicted_tokens, *self._blocks)

    def close(self) -> None:
        self._map.close()
        self.path.unlink(missing_ok=True)


def read_stats(path: Path) -> Optional[tuple[int, int, int]]:
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE)
    except FileNotFoundError:
        return None
    return struct.unpack(_FORMAT, data) if len(data) == _SIZE else None
