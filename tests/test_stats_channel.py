"""The engine-core -> API-server channel behind the tova_ metrics."""

from __future__ import annotations

import subprocess
import sys

from tova_vllm.engine import stats_channel


def test_round_trip_and_orphan_cleanup(tmp_path, monkeypatch):
    monkeypatch.setattr(stats_channel, "_channel_dir", lambda: tmp_path)
    path = stats_channel.channel_path("abc", 0)
    assert stats_channel.read_stats(path) is None

    writer = stats_channel.StatsWriter(path)
    writer.evicted_tokens = 111
    writer.set_blocks(held=2, saved=5)
    writer.publish()
    assert stats_channel.read_stats(path) == (111, 2, 5)

    # A file left by a writer that died without cleaning up (its pid no longer exists).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = stats_channel.channel_path("dead", 0)
    orphan.write_bytes(stats_channel.struct.pack(stats_channel._FORMAT, 7, 1, 1,
                                                 int(dead.stdout)))
    # Never believed: a dead engine's last numbers describe no engine.
    assert stats_channel.read_stats(orphan) is None
    stats_channel.StatsWriter(stats_channel.channel_path("next", 0)).close()
    assert not orphan.exists()
    assert path.exists()  # a live writer's file (this process) is kept
    assert stats_channel.read_stats(path)[0] == 111
    writer.close()
    assert not path.exists()


def test_reader_removes_the_file_at_exit(tmp_path):
    """The engine core is killed on shutdown; the API server's stat logger removes the
    channel when its process exits."""
    script = f"""
import sys
from pathlib import Path
from types import SimpleNamespace
from tova_vllm.engine import stats_channel
stats_channel._channel_dir = lambda: Path({str(tmp_path)!r})
from tova_vllm.metrics import TovaStatLogger
config = SimpleNamespace(additional_config={{"tova": {{"cache_size": 8}}}}, instance_id="x")
logger = TovaStatLogger(config)
writer = stats_channel.StatsWriter(logger.path)
writer.publish()
print(logger.path)
sys.exit(0)  # without closing the writer: as if the engine core had been killed
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "tova-vllm-x-0.stats"
    assert proc.stdout.strip() == str(path)
    assert not path.exists()
