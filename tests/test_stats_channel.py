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
    stats_channel.StatsWriter(stats_channel.channel_path("next", 0)).close()
    assert not orphan.exists()
    assert path.exists()  # a live writer's file (this process) is kept
    assert stats_channel.read_stats(path)[0] == 111
    writer.close()
    assert not path.exists()
