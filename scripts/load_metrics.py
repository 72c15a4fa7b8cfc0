"""What the load test reads from a server: loopback-only HTTP, ``GET /metrics`` parsed into
the KV state and counters it compares, and waiting until the server is idle.  Imported by
``load_test.py`` (run that)."""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Optional

# Only loopback traffic: urllib must not route through any proxy from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ----------------------------------------------------------------------------- helpers

def check_loopback_url(url: str) -> str:
    """``url`` without a trailing slash; raises unless it names a loopback host."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--url must be an http(s) URL with a host, got {url!r}")
    host = parsed.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        if host != "localhost":
            raise ValueError(f"--url must name a loopback address, got host {host!r}")
        infos = socket.getaddrinfo(host, parsed.port or 80, proto=socket.IPPROTO_TCP)
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not addresses or not all(a.is_loopback for a in addresses):
        raise ValueError(f"--url must name a loopback address; {host!r} is "
                         f"{sorted(map(str, addresses))}")
    return url.rstrip("/")


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt_s(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f} s"




def error_text(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict, float, str]]:
    """(name, labels, value, line) for each sample of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        samples.append((m.group(1), dict(_LABEL.findall(m.group(3) or "")), value, line))
    return samples


@dataclass
class KvState:
    running: Optional[float]
    waiting: Optional[float]
    usage: Optional[float]
    num_blocks: Optional[int]
    tova_lines: list[str]

    @property
    def blocks_in_use(self) -> Optional[int]:
        if self.usage is None or not self.num_blocks:
            return None
        # BlockPool.get_usage(): 1 - free / (num_gpu_blocks - 1), the null block excluded.
        return round(self.usage * (self.num_blocks - 1))

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.usage == 0

    def describe(self) -> str:
        usage = "n/a" if self.usage is None else f"{self.usage:.6f}"
        return (f"running {num(self.running)}, waiting {num(self.waiting)}, "
                f"kv_cache_usage_perc {usage}, KV blocks in use "
                f"{num(self.blocks_in_use)} of {num(self.num_blocks)}")


def num(value) -> str:
    if value is None:
        return "n/a"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def read_kv_state(base_url: str) -> KvState:
    status, text = http_get(f"{base_url}/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}: {text[:200]}")
    sums: dict[str, Optional[float]] = {"running": None, "waiting": None, "usage": None}
    names = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
             "vllm:kv_cache_usage_perc": "usage"}
    num_blocks = None
    tova_lines = []
    for name, labels, value, line in parse_metrics(text):
        if name in names:  # one sample per engine (and model): add them up
            key = names[name]
            sums[key] = (sums[key] or 0.0) + value
        elif name == "vllm:cache_config_info" and labels.get("num_gpu_blocks", "None") != "None":
            num_blocks = (num_blocks or 0) + int(labels["num_gpu_blocks"])
        if "tova_" in name:
            tova_lines.append(line)
    return KvState(sums["running"], sums["waiting"], sums["usage"], num_blocks, tova_lines)


_COUNTERS = {"vllm:request_success_total": "finished", "vllm:num_preemptions_total": "preemptions",
             "vllm:prompt_tokens_total": "prompt tokens",
             "vllm:generation_tokens_total": "generation tokens",
             "vllm:prefix_cache_queries_total": "prefix cache queries",
             "vllm:prefix_cache_hits_total": "prefix cache hits"}


def read_counters(base_url: str) -> Counter:
    """Server-side counters to compare before and after the run: finished requests by
    reason, preemptions, prompt and generation tokens, prefix-cache queries and hits
    (summed over engines)."""
    status, text = http_get(f"{base_url}/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}: {text[:200]}")
    counters: Counter = Counter()
    for name, labels, value, _ in parse_metrics(text):
        key = _COUNTERS.get(name)
        if key == "finished":
            key = f"finished {labels.get('finished_reason', '?')}"
        if key:
            counters[key] += value
    return counters


def probe_request(base_url: str, model: str) -> None:
    """One tiny complete request: it makes the engine take a step, which republishes the
    scheduler's gauges (vLLM publishes them only after a step, and aborts alone take none)."""
    body = json.dumps({"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 1,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with _NO_PROXY_OPENER.open(req, timeout=60) as resp:
        resp.read()


def wait_idle(base_url: str, model: str, timeout: float) -> tuple[KvState, list[str]]:
    """Poll /metrics until running, waiting and KV usage are all 0 (or ``timeout``)."""
    notes = []
    start = time.monotonic()
    state = read_kv_state(base_url)
    first = state
    probed = False
    while not state.idle and time.monotonic() - start < timeout:
        # If the gauges are still unchanged after a few seconds, the last step may predate
        # the final aborts: a probe request refreshes them (it cannot free leaked blocks).
        if not probed and time.monotonic() - start > min(8.0, timeout / 3):
            notes.append(f"not idle after {time.monotonic() - start:.0f} s ({state.describe()}); "
                         "sent one 1-token probe request to refresh the gauges")
            try:
                probe_request(base_url, model)
            except (urllib.error.URLError, OSError) as exc:
                notes.append(f"probe request failed: {error_text(exc)}")
            probed = True
        time.sleep(1.0)
        state = read_kv_state(base_url)
    waited = time.monotonic() - start
    if first is not state:
        notes.insert(0, f"first reading after the run: {first.describe()}")
    notes.append(f"{'idle' if state.idle else 'NOT idle'} after {waited:.1f} s of polling")
    return state, notes


