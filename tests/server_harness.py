"""Run the real ``vllm serve`` command as a subprocess for end-to-end tests.

``VllmServer.start(...)`` launches the CLI in its own process group with its stdout and
stderr in a log file; ``wait_healthy`` polls ``GET /health`` (bounded, failing early if
the server exits) and ``stop`` always ends it: SIGTERM, then SIGKILL to its whole process
group (API server, engine core, worker) after a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


def free_port() -> int:
    """A port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<no server log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class VllmServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, model_dir, args: Sequence[str], log_path: Path,
              env_updates: Optional[dict] = None) -> "VllmServer":
        port = free_port()
        cmd = ["vllm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               *args]
        env = {**os.environ, **(env_updates or {})}
        log_path = Path(log_path)
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        return cls(proc=proc, port=port, log_path=log_path)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def tova_channels(self) -> list[Path]:
        """The TOVA metrics channel files in /dev/shm written by this server's processes
        (other servers on the host may have theirs)."""
        import struct

        from tova_vllm.engine import stats_channel

        found = []
        for path in stats_channel._channel_dir().glob("tova-vllm-*.stats"):
            try:
                pid = struct.unpack(stats_channel._FORMAT, path.read_bytes())[3]
                if pid > 0 and os.getpgid(pid) == self.proc.pid:
                    found.append(path)
            except (OSError, struct.error):
                continue
        return found

    def health_status(self, timeout: float = 5.0) -> Optional[int]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def wait_healthy(self, timeout: float = 240.0, interval: float = 1.0) -> float:
        """Seconds until ``GET /health`` answered 200; raises with the log tail otherwise."""
        start = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {code} before it was healthy; log tail "
                    f"({self.log_path}):\n{self.tail()}")
            if self.health_status() == 200:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"vllm serve not healthy after {timeout:.0f} s; log tail "
                    f"({self.log_path}):\n{self.tail()}")
            time.sleep(interval)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server, SIGKILL its process group if it or a child outlives that."""
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(pgid)
                self.proc.wait(timeout=30)
        # Children (engine core, worker) exit with the server; give them a moment.
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            _killpg(pgid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
