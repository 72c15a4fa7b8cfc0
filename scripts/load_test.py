"""Load-and-fault driver for a TOVA server: a mix of request kinds, some cut off mid-stream,
some with bad values that must be refused.

By default it builds the tiny offline ``llama_gqa`` checkpoint, starts ``vllm serve`` on
127.0.0.1 (a free port, TOVA ``cache_size`` 64) and always stops it again, also on Ctrl-C
or failure.  ``--url`` targets a server that is already running instead (loopback only).

It sends ``--requests`` completions at ``--concurrency``: token-id prompts of mixed length
(a third at most ``cache_size`` tokens, the rest longer, ids 3..96), mixed ``max_tokens``,
``ignore_eos``, in the kinds of ``load_mixes.MIX`` (greedy, seeded sampling, ``n`` = 2, stop
strings, logprobs, echo with prompt logprobs, per-request budgets and policies, bad values).
A share of the streamed ones (``--disconnect-share``) close their connection on purpose after
a few chunks.  Every response is checked against its kind (``load_mixes``).  At
``--deadline`` seconds into the load phase it cancels whatever is still outstanding.

Afterwards it waits until the server is idle and reads ``GET /metrics``: requests running
and waiting, ``vllm:kv_cache_usage_perc``, and the KV blocks still in use (from the usage
and ``num_gpu_blocks`` of ``vllm:cache_config_info``; vLLM 0.32 has no direct gauge).
Any ``tova_`` series are printed too.  A server it started is stopped at the end and its
``/dev/shm`` metrics channel must be gone.

Exit status 0 only if no request failed unexpectedly, every bad value was refused, the run
finished before the deadline, no KV block is left in use, the server log has no ERROR, and
nothing is left in /dev/shm.  Run:

    python3 scripts/load_test.py [--requests 500] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from load_metrics import (check_loopback_url, fmt_s, http_get, num, percentile, read_counters,
                          wait_idle, parse_metrics)
from load_mixes import MIX, TOKEN_ID_RANGE, Job, Result, make_jobs, run_one

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder and the server harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_NAME = "tiny"
ARCH = "llama_gqa"


# ----------------------------------------------------------------------------- load

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
    print(f"bad values refused (400): {counts['refused']} (planned "
          f"{sum(j.kind == 'bad' for j in jobs)})")
    print(f"deliberate disconnects:  {counts['disconnected']} (planned {planned_disconnects})")
    print(f"errors:                  {counts['error']}")
    kinds = Counter(j.kind for j in jobs)
    print("kinds:                   " + ", ".join(f"{k} {kinds[k]}" for k in MIX))
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
    print(f"workload: {len(jobs)} completions at concurrency {args.concurrency}, "
          f"prompts {min(prompt_lens)}..{max(prompt_lens)} tokens (ids {TOKEN_ID_RANGE[0]}.."
          f"{TOKEN_ID_RANGE[1]}), max_tokens {args.min_tokens}..{args.max_tokens}, "
          f"ignore_eos, {args.disconnect_share:.0%} of streams disconnect mid-stream, "
          f"deadline {args.deadline:.0f} s, seed {args.seed}", flush=True)
    before = read_counters(base_url)
    report = asyncio.run(run_load(base_url, model, jobs, args.concurrency, args.deadline,
                                  args.progress_every))
    n_errors = print_report(args, jobs, report)

    print("\n=== server state after the run (GET /metrics) ===")
    state, notes = wait_idle(base_url, model, args.idle_timeout)
    for note in notes:
        print(f"  ({note})")
    print(f"vllm:num_requests_running: {num(state.running)}")
    print(f"vllm:num_requests_waiting: {num(state.waiting)}")
    usage = "n/a" if state.usage is None else f"{state.usage:.6f}"
    print(f"vllm:kv_cache_usage_perc:  {usage}")
    print(f"KV blocks in use after the run: {num(state.blocks_in_use)} "
          f"(of {num(state.num_blocks)}; usage x (num_gpu_blocks - 1), the null block excluded)")
    after = read_counters(base_url)
    delta = {k: after[k] - before[k] for k in sorted(set(after) | set(before))
             if after[k] != before[k]}
    probe = " (one of them the probe)" if any("probe" in n for n in notes) else ""
    print("server counters during the run: "
          + (", ".join(f"{k} {num(v)}" for k, v in delta.items()) or "no change") + probe)
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
    if log_problems:
        failures.append(f"{len(log_problems)} kinds of ERROR/Traceback lines in the server log")
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
        channels = []
        try:
            cmd = ["vllm", "serve", f"<tiny {ARCH} checkpoint>", "--host", "127.0.0.1",
                   "--port", str(server.port), *server_args(args)]
            print("server: " + " ".join(cmd), flush=True)
            took = wait_healthy(server, args.startup_timeout)
            print(f"server healthy after {took:.0f} s at {server.base_url}", flush=True)
            code = main_with(args, server.base_url, args.model or MODEL_NAME, server)
            channels = server.tova_channels()
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
            left = [str(path) for path in channels if path.exists()]
            print(f"after stopping the server: its metrics channel {channels and channels[0]} "
                  f"{'LEFT BEHIND' if left else 'removed'}")
            if left:
                sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
