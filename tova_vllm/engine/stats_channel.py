"""Eviction counters from the engine core to the API server's ``/metrics``.

The scheduler (engine-core process) knows what TOVA evicts and holds; Prometheus lives in
the API server process, and vLLM's ``SchedulerStats`` has no field a plugin may fill (its
msgpack encoding drops unknown attributes).  The scheduler therefore writes three int64
counters into a small shared-memory file named after the engine's ``instance_id`` (the same
in every process of one engine), and the ``vllm.stat_logger_plugins`` logger in the API
server reads them on every stats update.

A file must neither outlive its server nor be believed after its writer died: vLLM kills
the engine core at once on shutdown, so the API server removes the file too (at exit), the
next engine on the host removes files whose writer is gone, and a reader ignores them.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Optional

_FORMAT = "<qqqq"  # evicted tokens (cumulative), KV blocks held, KV blocks saved, writer pid
_SIZE = struct.calcsize(_FORMAT)


def _channel_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def channel_path(instance_id: str, engine_index: int) -> Path:
    return _channel_dir() / f"tova-vllm-{instance_id or 'default'}-{engine_index}.stats"


def _writer_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # created, not yet published (and os.kill(0) would mean our group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def remove_channel(path: Path) -> None:
    path.unlink(missing_ok=True)


def remove_orphaned_channels() -> None:
    """Delete channel files whose writer process is gone.

    An engine core that is killed (or exits through ``os._exit``) cannot remove its file;
    the next engine on the host cleans up after it.  Files of live engines are kept.
    """
    for path in _channel_dir().glob("tova-vllm-*.stats"):
        try:
            with open(path, "rb") as f:
                pid = struct.unpack(_FORMAT, f.read(_SIZE))[3]
        except (OSError, struct.error):
            continue  # unreadable, half-written or not ours to judge: leave it
        if pid > 0 and not _writer_alive(pid):
            remove_channel(path)


class StatsWriter:
    """Engine-core side: cumulative evictions and the current block counts."""

    def __init__(self, path: Path) -> None:
        remove_orphaned_channels()
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
        self._map[:] = struct.pack(_FORMAT, self.evicted_tokens, *self._blocks, os.getpid())

    def close(self) -> None:
        self._map.close()
        remove_channel(self.path)


def read_stats(path: Path) -> Optional[tuple[int, int, int]]:
    """(evicted tokens, blocks held, blocks saved), or None before the first publish and
    once the writer is gone (its last numbers no longer describe any engine)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE)
    except FileNotFoundError:
        return None
    if len(data) != _SIZE:
        return None
    *stats, pid = struct.unpack(_FORMAT, data)
    return tuple(stats) if _writer_alive(pid) else None
