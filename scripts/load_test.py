"""Load-and-fault driver for a TOVA server: many streamed requests, some cut off mid-stream.

By default it builds the tiny offline ``llama_gqa`` checkpoint, starts ``vllm serve`` on
127.0.0.1 (a free port, TOVA ``cache_size`` 64) and always stops it again, also on Ctrl-C
or failure.  ``--url`` targets a server that is already running instead (loopback only).

It sends ``--requests`` streamed completions at ``--concurrency``: token-id prompts of mixed
length (a third at most ``cache_size`` tokens, the rest longer, ids 3..96), mixed
``max_tokens``, greedy, ``ignore_eos``.  A share of them (``--disconnect-share``) close their
connection on purpose after a few chunks.  Every completed stream is checked (``[DONE]``,
``finish_reason == "length"``, usage equal to the prompt length and ``max_tokens``).  At
``--deadline`` seconds into the load phase it cancels whatever is still outstanding.

Afterwards it waits until the server is idle and reads ``GET /metrics``: requests running
and waiting, ``vllm:kv_cache_usage_perc``, and the KV blocks still in use (from the usage
and ``num_gpu_blocks`` of ``vllm:cache_config_info``; vLLM 0.32 has no direct gauge).
Any ``tova_`` series are printed too.

Exit status 0 only if no request failed unexpectedly, the run finished before the
deadline, and no KV block is left in use.  Run:

    python3 scripts/load_test.py [--requests 500] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder and the server harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_NAME = "tiny"
ARCH = "llama_gqa"
TOKEN_ID_RANGE = (3, 96)  # the tiny byte-level tokenizer's clean ids (as tests/test_serving.py)

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


# ----------------------------------------------------------------------------- workload

@dataclass
class Job:
    index: int
    prompt: list[int]
    max_tokens: int
    disconnect_after: Optional[int]  # chunks to read before closing on purpose; None: read all


@dataclass
class Result:
    outcome: str  # "completed" | "disconnected" | "error" | "cancelled"
    ttft: Optional[float] = None
    latency: Optional[float] = None
    output_tokens: int = 0
    error: Optional[str] = None


def make_jobs(args) -> list[Job]:
    rng = random.Random(args.seed)
    n_disconnect = round(args.requests * args.disconnect_share)
    disconnect_ids = set(rng.sample(range(args.requests), n_disconnect))
    short_max = min(args.cache_size, args.max_prompt)
    jobs = []
    for i in range(args.requests):
        # A third of the prompts fit in the TOVA budget, the rest must evict.
        if rng.random() < 1 / 3 or short_max >= args.max_prompt:
            length = rng.randint(args.min_prompt, max(args.min_prompt, short_max))
        else:
            length = rng.randint(max(args.min_prompt, short_max + 1), args.max_prompt)
        prompt = [rng.randint(*TOKEN_ID_RANGE) for _ in range(length)]
        max_tokens = rng.randint(args.min_tokens, args.max_tokens)
        disconnect_after = None
        if i in disconnect_ids:
            disconnect_after = rng.randint(1, max(1, min(4, max_tokens // 4)))
        jobs.append(Job(i, prompt, max_tokens, disconnect_after))
    return jobs


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


async def run_one(session, base_url: str, model: str, job: Job) -> Result:
    body = {
        "model": model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # what the openai client's extra_body would add
    }
    start = time.monotonic()
    ttft = None
    chunks = 0
    finish_reason = None
    usage = None
    done = False
    try:
        async with session.post(f"{base_url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300].replace("\n", " ")
                return Result("error", error=f"HTTP {resp.status}: {text}")
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                payload = json.loads(data)
                if "error" in payload:
                    err = payload["error"]
                    message = err.get("message", err) if isinstance(err, dict) else err
                    return Result("error", ttft=ttft,
                                  error=f"error event in stream: {str(message)[:300]}")
                if payload.get("usage"):
                    usage = payload["usage"]
                for choice in payload.get("choices") or []:
                    if ttft is None:
                        ttft = time.monotonic() - start
                    chunks += 1
                    finish_reason = choice.get("finish_reason") or finish_reason
                if job.disconnect_after is not None and chunks >= job.disconnect_after:
                    resp.close()  # drop the connection mid-stream, as a vanished client does
                    return Result("disconnected", ttft=ttft, output_tokens=chunks)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001  (HTTP, timeout, bad JSON: each one is reported)
        return Result("error", ttft=ttft, error=_error_text(exc))
    latency = time.monotonic() - start
    if job.disconnect_after is not None:
        # The whole response arrived before the client could cut it off: still a client
        # that closed its stream (the server may just not have noticed); not an error.
        return Result("disconnected", ttft=ttft, output_tokens=chunks)
    problems = []
    if not done:
        problems.append("stream ended without [DONE]")
    if finish_reason != "length":
        problems.append(f"finish_reason {finish_reason!r} (expected 'length' with ignore_eos)")
    if usage is None:
        problems.append("no usage chunk")
    else:
        if usage.get("completion_tokens") != job.max_tokens:
            problems.append(f"completion_tokens {usage.get('completion_tokens')} "
                            f"!= max_tokens {job.max_tokens}")
        if usage.get("prompt_tokens") != len(job.prompt):
            problems.append(f"prompt_tokens {usage.get('prompt_tokens')} "
                            f"!= prompt length {len(job.prompt)}")
    if problems:
        # Lengths vary per request: keep the kinds of problem distinct, not every number.
        kind = "; ".join(re.sub(r"\d+", "N", p) for p in problems)
        return Result("error", ttft=ttft, latency=latency, error=f"bad response: {kind}")
    tokens = usage["completion_tokens"]
    return Result("completed", ttft=ttft, latency=latency, output_tokens=tokens)


@dataclass
class LoadReport:
    results: dict[int, Result] = field(default_factory=dict)
    wall: float = 0.0
    deadline_hit: bool = False


async def run_load(base_url: str, model: str, jobs: list[Job], concurrency: int,
                   deadline: float, progress_every: float) -> LoadReport:
    import aiohttp

    report = LoadReport()
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    in_flight: dict[int, Job] = {}

    # No proxies from the environment (trust_env False) and one connection per worker.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     trust_env=False) as session:

        async def worker():
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                in_flight[job.index] = job
                try:
                    report.results[job.index] = await run_one(session, base_url, model, job)
                except asyncio.CancelledError:
                    report.results[job.index] = Result("cancelled")  # by the deadline
                    raise
                finally:
                    in_flight.pop(job.index, None)

        async def progress():
            while True:
                await asyncio.sleep(progress_every)
                counts = Counter(r.outcome for r in report.results.values())
                print(f"  [{time.monotonic() - start:6.0f} s] done {len(report.results)}"
                      f"/{len(jobs)} (completed {counts['completed']}, disconnected "
                      f"{counts['disconnected']}, errors {counts['error']}), in flight "
                      f"{len(in_flight)}", flush=True)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        ticker = asyncio.create_task(progress()) if progress_every > 0 else None
        try:
            _, pending = await asyncio.wait(workers, timeout=deadline)
            if pending:
                report.deadline_hit = True
                print(f"  deadline of {deadline:.0f} s reached: cancelling {len(in_flight)} "
                      f"requests in flight, {queue.qsize()} not sent", flush=True)
        finally:
            for task in workers:
                task.cancel()
            if ticker is not None:
                ticker.cancel()
            await asyncio.gather(*workers, *([ticker] if ticker else []),
                                 return_exceptions=True)
    report.wall = time.monotonic() - start
    return report


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
        return (f"running {_num(self.running)}, waiting {_num(self.waiting)}, "
                f"kv_cache_usage_perc {usage}, KV blocks in use "
                f"{_num(self.blocks_in_use)} of {_num(self.num_blocks)}")


def _num(value) -> str:
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
             "vllm:generation_tokens_total": "generation tokens"}


def read_counters(base_url: str) -> Counter:
    """Server-side counters to compare before and after the run: finished requests by
    reason, preemptions, prompt and generation tokens (summed over engines)."""
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
                notes.append(f"probe request failed: {_error_text(exc)}")
            probed = True
        time.sleep(1.0)
        state = read_kv_state(base_url)
    waited = time.monotonic() - start
    if first is not state:
        notes.insert(0, f"first reading after the run: {first.describe()}")
    notes.append(f"{'idle' if state.idle else 'NOT idle'} after {waited:.1f} s of polling")
    return state, notes


# ----------------------------------------------------------------------------- server

def discover_model(base_url: str) -> str:
    status, text = http_get(f"{base_url}/v1/models")
    if status != 200:
        raise RuntimeError(f"GET /v1/models answered {status}: {text[:200]}")
    return json.loads(text)["data"][0]["id"]


def wait_healthy(server, timeout: float) -> float:
    start = time.monotonic()
    while True:
        code = server.proc.poll()
        if code is not None:
            raise RuntimeError(f"vllm serve exited with code {code} before it was healthy; "
                               f"log tail ({server.log_path}):\n{server.tail()}")
        try:
            if http_get(f"{server.base_url}/health", timeout=5)[0] == 200:
                return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s; log tail "
                               f"({server.log_path}):\n{server.tail()}")
        time.sleep(1.0)


def server_args(args) -> list[str]:
    return [
        "--dtype", "float32", "--max-model-len", str(args.max_model_len),
        "--block-size", "32", "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--enforce-eager", "--seed", "0", "--served-model-name", MODEL_NAME,
        "--additional-config", json.dumps({"tova": {"cache_size": args.cache_size}}),
    ]


def server_log_problems(log_text: str) -> list[str]:
    """Distinct ERROR / Traceback lines of the server log (timestamps and ids masked)."""
    seen: Counter[str] = Counter()
    for line in log_text.splitlines():
        if "ERROR" in line or "Traceback" in line or "Exception" in line:
            key = re.sub(r"\d+", "N", re.sub(r"^.*?(ERROR|Traceback|Exception)", r"\1", line))
            seen[key[:200]] += 1
    return [f"{count}x {key}" for key, count in seen.most_common()]


# ----------------------------------------------------------------------------- report

def print_report(args, jobs: list[Job], report: LoadReport) -> int:
    results = report.results
    counts = Counter(r.outcome for r in results.values())
    completed = [r for r in results.values() if r.outcome == "completed"]
    latencies = [r.latency for r in completed]
    ttfts = [r.ttft for r in results.values() if r.ttft is not None]
    out_tokens = sum(r.output_tokens for r in completed)
    errors = Counter(r.error for r in results.values() if r.outcome == "error")
    planned_disconnects = sum(j.disconnect_after is not None for j in jobs)
    not_sent = len(jobs) - len(results)

    print("\n=== load test results ===")
    print(f"total requests:          {len(jobs)}")
    print(f"completed:               {counts['completed']}")
    print(f"deliberate disconnects:  {counts['disconnected']} (planned {planned_disconnects})")
    print(f"errors:                  {counts['error']}")
    for message, count in errors.most_common():
        print(f"  {count}x {message}")
    if report.deadline_hit:
        print(f"cancelled at deadline:   {counts['cancelled']} in flight, {not_sent} not sent")
    print(f"wall time (load phase):  {report.wall:.1f} s")
    print(f"latency p50 / p99:       {fmt_s(percentile(latencies, 50))} / "
          f"{fmt_s(percentile(latencies, 99))}  (end to end, completed requests)")
    print(f"TTFT p50 / p99:          {fmt_s(percentile(ttfts, 50))} / "
          f"{fmt_s(percentile(ttfts, 99))}  (every request that got a first chunk)")
    rate = out_tokens / report.wall if report.wall > 0 else 0.0
    print(f"output throughput:       {rate:.1f} tokens/s ({out_tokens} tokens of completed "
          f"requests / load-phase wall time)")
    return counts["error"]


def main_with(args, base_url: str, model: str, server=None) -> int:
    jobs = make_jobs(args)
    prompt_lens = [len(j.prompt) for j in jobs]
    print(f"workload: {len(jobs)} streamed completions at concurrency {args.concurrency}, "
          f"prompts {min(prompt_lens)}..{max(prompt_lens)} tokens (ids {TOKEN_ID_RANGE[0]}.."
          f"{TOKEN_ID_RANGE[1]}), max_tokens {args.min_tokens}..{args.max_tokens}, "
          f"temperature 0, ignore_eos, {args.disconnect_share:.0%} disconnect mid-stream, "
          f"deadline {args.deadline:.0f} s, seed {args.seed}", flush=True)
    before = read_counters(base_url)
    report = asyncio.run(run_load(base_url, model, jobs, args.concurrency, args.deadline,
                                  args.progress_every))
    n_errors = print_report(args, jobs, report)

    print("\n=== server state after the run (GET /metrics) ===")
    state, notes = wait_idle(base_url, model, args.idle_timeout)
    for note in notes:
        print(f"  ({note})")
    print(f"vllm:num_requests_running: {_num(state.running)}")
    print(f"vllm:num_requests_waiting: {_num(state.waiting)}")
    usage = "n/a" if state.usage is None else f"{state.usage:.6f}"
    print(f"vllm:kv_cache_usage_perc:  {usage}")
    print(f"KV blocks in use after the run: {_num(state.blocks_in_use)} "
          f"(of {_num(state.num_blocks)}; usage x (num_gpu_blocks - 1), the null block excluded)")
    after = read_counters(base_url)
    delta = {k: after[k] - before[k] for k in sorted(set(after) | set(before))
             if after[k] != before[k]}
    probe = " (one of them the probe)" if any("probe" in n for n in notes) else ""
    print("server counters during the run: "
          + (", ".join(f"{k} {_num(v)}" for k, v in delta.items()) or "no change") + probe)
    if state.tova_lines:
        print("tova_ series:")
        for line in state.tova_lines:
            print(f"  {line}")
        held = [line for line in state.tova_lines
                if "held" in line.split("{")[0] and parse_metrics(line)[0][2] != 0]
        if held and state.usage == 0:
            print("  note: a tova_ 'held' gauge is non-zero while vLLM's kv_cache_usage_perc "
                  "is 0 (informational only; the exit status uses vLLM's gauge)")
    else:
        print("tova_ series: none on /metrics")

    log_problems = []
    if server is not None:
        log_problems = server_log_problems(server.log())
        print(f"server log ERROR/Traceback lines: {len(log_problems) or 'none'}")
        for line in log_problems[:10]:
            print(f"  {line}")

    failures = []
    if n_errors:
        failures.append(f"{n_errors} unexpected request errors")
    if report.deadline_hit:
        failures.append("deadline reached before all requests finished")
    if state.blocks_in_use is None:
        failures.append("KV cache usage not readable from /metrics")
    elif state.blocks_in_use != 0 or state.usage != 0:
        failures.append(f"{state.blocks_in_use} KV blocks still in use")
    if state.running or state.waiting:
        failures.append("server not idle after the run")
    print(f"\nRESULT: {'PASS' if not failures else 'FAIL (' + '; '.join(failures) + ')'}")
    return 1 if failures else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="target an already running server (loopback only), e.g. "
                   "http://127.0.0.1:8000; default: start one on the tiny model")
    p.add_argument("--model", help="served model name (default: asked from /v1/models)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--disconnect-share", type=float, default=0.10,
                   help="share of requests that close their stream after a few chunks")
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=600)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--deadline", type=float, default=900.0,
                   help="seconds for the load phase; then outstanding requests are cancelled")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds to wait after the run for the server to become idle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=float, default=30.0,
                   help="seconds between progress lines (0: none)")
    g = p.add_argument_group("server started by this script")
    g.add_argument("--cache-size", type=int, default=64, help="TOVA cache_size")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=1024)
    g.add_argument("--startup-timeout", type=float, default=300.0)
    g.add_argument("--server-log", type=Path,
                   help="keep the server log here (default: a temporary file)")
    args = p.parse_args(argv)
    if not 0 <= args.disconnect_share <= 1:
        p.error("--disconnect-share must be in [0, 1]")
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be positive")
    if not 1 <= args.min_prompt <= args.max_prompt:
        p.error("need 1 <= --min-prompt <= --max-prompt")
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if args.url is None and args.max_prompt + args.max_tokens > args.max_model_len:
        p.error("--max-prompt + --max-tokens must fit in --max-model-len")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Stop the server on SIGTERM as on Ctrl-C, and take Ctrl-C even where the shell that
    # started us in the background set SIGINT to "ignore".
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if args.url is not None:
        try:
            base_url = check_loopback_url(args.url)
        except ValueError as exc:
            print(f"refusing: {exc}", file=sys.stderr)
            return 2
        model = args.model or discover_model(base_url)
        print(f"target: {base_url} (model {model!r}, already running)")
        return main_with(args, base_url, model)

    from server_harness import VllmServer
    from tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tova_load_") as tmp:
        model_dir = build_tiny_model(ARCH, Path(tmp) / ARCH)
        log_path = args.server_log or Path(tmp) / "server.log"
        server = VllmServer.start(model_dir, server_args(args), log_path,
                                  env_updates={"VLLM_CPU_KVCACHE_SPACE": "1",
                                               "HF_HUB_OFFLINE": "1"})
        try:
            cmd = ["vllm", "serve", f"<tiny {ARCH} checkpoint>", "--host", "127.0.0.1",
                   "--port", str(server.port), *server_args(args)]
            print("server: " + " ".join(cmd), flush=True)
            took = wait_healthy(server, args.startup_timeout)
            print(f"server healthy after {took:.0f} s at {server.base_url}", flush=True)
            code = main_with(args, server.base_url, args.model or MODEL_NAME, server)
            if server.proc.poll() is not None:
                print(f"server exited during the run with code {server.proc.returncode}")
                code = 1
            return code
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the server", file=sys.stderr)
            return 130
        except Exception:
            print(f"--- server log tail ({log_path}) ---\n{server.tail(40)}", file=sys.stderr)
            raise
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
