"""What a ``vllm serve`` with TOVA leaves behind when it ends with streams in flight: on
SIGTERM (vLLM kills its engine core at once) and when the engine core is killed.  The
metrics channel in /dev/shm must be gone in both cases, and the streams must end."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from server_harness import VllmServer
from tova_vllm.engine import stats_channel

STREAMS = 4
READ_TIMEOUT = 20.0
SERVER_ARGS = [
    "--dtype", "float32", "--max-model-len", "1024", "--block-size", "32",
    "--max-num-batched-tokens", "64", "--enforce-eager", "--served-model-name", "tiny",
    "--additional-config", json.dumps({"tova": {"cache_size": 32}}),
]


def _channel_of(server: VllmServer, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channels = server.tova_channels()
        if channels:
            (channel,) = channels
            return channel
        time.sleep(0.2)
    raise AssertionError(f"no channel file of the server\n{server.tail()}")


def _stream(server: VllmServer, outcome: dict, started: threading.Event) -> None:
    body = dict(model="tiny", prompt="hello " * 40, max_tokens=900, temperature=0,
                ignore_eos=True, stream=True)
    request = urllib.request.Request(f"{server.base_url}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    events = 0
    try:
        # A read timeout: on SIGTERM vLLM 0.32 stops the engine but leaves streams open,
        # and the server exits only once their clients close them.
        with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as resp:
            outcome["status"] = resp.status
            for line in resp:
                if line.startswith(b"data:"):
                    events += 1
                    started.set()
                    if b'"error"' in line:
                        outcome["error_event"] = True
                    payload = line[len(b"data:"):].strip()
                    if payload.startswith(b"{"):
                        for choice in json.loads(payload).get("choices", ()):
                            if choice.get("finish_reason"):
                                outcome["finish_reason"] = choice["finish_reason"]
                    if line.strip() == b"data: [DONE]":
                        outcome["done"] = True
    except Exception as error:  # the server went away mid-stream: what the client sees
        outcome["exception"] = type(error).__name__
    outcome["events"] = events


def _serve_with_streams(tiny_models, tmp_path):
    server = VllmServer.start(tiny_models["llama_gqa"], SERVER_ARGS, tmp_path / "server.log",
                              env_updates={"VLLM_CPU_KVCACHE_SPACE": "1",
                                           "HF_HUB_OFFLINE": "1"})
    try:
        server.wait_healthy(timeout=240)
        outcomes = [dict() for _ in range(STREAMS)]
        started = [threading.Event() for _ in range(STREAMS)]
        threads = [threading.Thread(target=_stream, args=(server, o, s), daemon=True)
                   for o, s in zip(outcomes, started)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(120), server.tail()
        channel = _channel_of(server)
        assert stats_channel.read_stats(channel) is not None
    except BaseException:
        server.stop()
        raise
    return server, channel, outcomes, threads


def _ended(server: VllmServer, threads, timeout: float = 90.0) -> None:
    server.proc.wait(timeout=timeout)
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a stream still hangs after the server exited"


@pytest.fixture
def stopped():
    servers = []
    yield servers.append
    for server in servers:
        server.stop()


def test_sigterm_with_streams_in_flight_leaves_nothing(tiny_models, tmp_path, stopped):
    server, channel, outcomes, threads = _serve_with_streams(tiny_models, tmp_path)
    stopped(server)
    server.proc.send_signal(signal.SIGTERM)
    _ended(server, threads)
    assert not channel.exists(), server.tail()
    for outcome in outcomes:
        assert outcome["status"] == 200 and outcome["events"] > 0, outcome
        # Never reported as complete (no finish reason "length" or "stop": max_tokens is
        # far away).  How it ends is a race inside vLLM: usually the stream is cut (no
        # further event, no [DONE]; the client's read timeout ends it), but when the
        # engine core's death reaches the API server first, the stream gets an error
        # event, then [DONE]; once in a full run here it got [DONE] with no error event
        # (its finish reason was not recorded then; it is now, in the message below).
        cut = not outcome.get("done") and outcome.get("exception") == "TimeoutError"
        ended = outcome.get("done") and outcome.get("finish_reason") not in ("length", "stop")
        assert cut or ended, outcome


def test_killed_engine_core_leaves_nothing(tiny_models, tmp_path, stopped):
    server, channel, outcomes, threads = _serve_with_streams(tiny_models, tmp_path)
    stopped(server)
    engine_pid = struct.unpack(stats_channel._FORMAT, channel.read_bytes())[3]
    os.kill(engine_pid, signal.SIGKILL)
    _ended(server, threads)
    # vLLM stops a server whose engine died (_ended waited for it; exit code 0).
    assert not channel.exists(), server.tail()
    for outcome in outcomes:
        assert outcome["status"] == 200 and outcome["events"] > 0, outcome
        # Each stream gets an error event, then [DONE].
        assert outcome.get("error_event"), outcome
