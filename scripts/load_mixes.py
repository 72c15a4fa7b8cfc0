"""The load test's workload: a mix of request kinds, each with its own body and its own
check of the response.  Imported by ``load_test.py`` (run that).

Kinds (shares in ``MIX``): ``greedy`` (streamed, temperature 0), ``seeded`` (temperature
0.8 with a seed: the kind that killed the CPU engine once its prompt took several steps),
``n2`` (two choices), ``stop`` (stop strings), ``logprobs`` (top-3 per token), ``echo``
(non-streamed, the prompt echoed with its prompt logprobs), ``budget`` (a per-request
``tova_cache_size`` / ``tova_policy``), ``bad`` (a bad per-request value: must be refused
with 400 naming it, streamed or not).  A share of the streamed ones disconnect mid-stream.
Half of the prompts of every kind begin with one of a few shared prefixes, so requests hit
vLLM's prefix cache (TOVA keeps it on, evicting copy-on-write) while others evict, abort
and disconnect beside them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from load_metrics import error_text

TOKEN_ID_RANGE = (3, 96)  # the tiny byte-level tokenizer's clean ids (as tests/test_serving.py)
MIX = {"greedy": 4, "seeded": 2, "n2": 1, "stop": 1, "logprobs": 1, "echo": 1, "budget": 2,
       "bad": 1}
POLICIES = ("tova", "window", "sink_window", "h2o")
SHARED_PREFIXES = 3  # distinct shared prompt beginnings
SHARED_SHARE = 0.5  # share of the prompts that begin with one
BAD_XARGS = (  # (vllm_xargs, the parameter the refusal must name)
    ({"tova_cache_size": True}, "tova_cache_size"),
    ({"tova_cache_size": 0}, "tova_cache_size"),
    ({"tova_cache_size": 10 ** 9}, "tova_cache_size"),
    ({"tova_policy": "lru"}, "tova_policy"),
    ({"tova_cache_sizee": 8}, "tova_cache_sizee"),
)


@dataclass
class Job:
    index: int
    kind: str
    prompt: list[int]
    max_tokens: int
    disconnect_after: Optional[int]  # chunks to read before closing on purpose; None: read all
    body: dict = field(default_factory=dict)  # what the kind adds to the request
    refused_param: Optional[str] = None  # ``bad``: the parameter the 400 must name

    @property
    def streamed(self) -> bool:
        return self.body.get("stream", True)

    @property
    def n(self) -> int:
        return self.body.get("n", 1)


@dataclass
class Result:
    outcome: str  # "completed" | "refused" | "disconnected" | "error" | "cancelled"
    ttft: Optional[float] = None
    latency: Optional[float] = None
    output_tokens: int = 0
    error: Optional[str] = None


def _kind_body(kind: str, rng: random.Random, cache_size: int) -> tuple[dict, Optional[str]]:
    if kind == "seeded":
        return {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(1 << 30)}, None
    if kind == "n2":
        return {"n": 2, "temperature": 0.8, "seed": rng.randrange(1 << 30)}, None
    if kind == "stop":
        return {"stop": ["a", "e", "\n"], "ignore_eos": False}, None
    if kind == "logprobs":
        return {"logprobs": 3}, None
    if kind == "echo":
        return {"stream": False, "echo": True, "logprobs": 1, "prompt_logprobs": 1}, None
    if kind == "budget":
        return {"vllm_xargs": {"tova_cache_size": rng.randint(8, cache_size),
                               "tova_policy": rng.choice(POLICIES)}}, None
    if kind == "bad":
        xargs, param = rng.choice(BAD_XARGS)
        return {"vllm_xargs": xargs, "stream": rng.random() < 0.5}, param
    return {}, None


def make_jobs(args) -> list[Job]:
    rng = random.Random(args.seed)
    kinds = [k for k, share in MIX.items() for _ in range(share)]
    jobs = []
    short_max = min(args.cache_size, args.max_prompt)
    prefixes = [[rng.randint(*TOKEN_ID_RANGE) for _ in range(args.max_prompt)]
                for _ in range(SHARED_PREFIXES)]
    for i in range(args.requests):
        kind = rng.choice(kinds)
        # A third of the prompts fit in the TOVA budget, the rest must evict.
        if rng.random() < 1 / 3 or short_max >= args.max_prompt:
            length = rng.randint(args.min_prompt, max(args.min_prompt, short_max))
        else:
            length = rng.randint(max(args.min_prompt, short_max + 1), args.max_prompt)
        prompt = [rng.randint(*TOKEN_ID_RANGE) for _ in range(length)]
        if rng.random() < SHARED_SHARE:  # a shared beginning, then the prompt's own tail
            shared = rng.choice(prefixes)[: length - max(1, length // 8)]
            prompt = shared + prompt[len(shared):]
        max_tokens = rng.randint(args.min_tokens, args.max_tokens)
        body, refused_param = _kind_body(kind, rng, args.cache_size)
        job = Job(i, kind, prompt, max_tokens, None, body, refused_param)
        if job.streamed and kind != "bad" and rng.random() < args.disconnect_share:
            job.disconnect_after = rng.randint(1, max(1, min(4, max_tokens // 4)))
        jobs.append(job)
    return jobs


def request_body(model: str, job: Job) -> dict:
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, **job.body}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


def _refusal(job: Job, status: int, text: str) -> Result:
    """A ``bad`` job must get 400 in vLLM's error body naming the parameter."""
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        error = {}
    if status == 400 and error.get("param") == job.refused_param:
        return Result("refused")
    return Result("error", error=f"bad value not refused as expected: HTTP {status}: "
                  f"{text[:200]}")


def _problems(job: Job, finish: dict[int, Optional[str]], usage: Optional[dict],
              logprobs_missing: bool, done: bool) -> list[str]:
    problems = []
    if job.streamed and not done:
        problems.append("stream ended without [DONE]")
    if sorted(finish) != list(range(job.n)):
        problems.append(f"choices {sorted(finish)} (expected {job.n})")
    allowed = ("stop", "length") if job.kind == "stop" else ("length",)
    if any(reason not in allowed for reason in finish.values()):
        problems.append(f"finish_reason {sorted(set(map(str, finish.values())))} "
                        f"(expected {allowed})")
    if logprobs_missing:
        problems.append("logprobs missing")
    if usage is None:
        problems.append("no usage")
        return problems
    tokens = usage.get("completion_tokens")
    want = job.n * job.max_tokens
    if tokens is None or (tokens > want if job.kind == "stop" else tokens != want):
        problems.append(f"completion_tokens {tokens} (expected {want})")
    if usage.get("prompt_tokens") != len(job.prompt):
        problems.append(f"prompt_tokens {usage.get('prompt_tokens')} != {len(job.prompt)}")
    return problems


async def run_one(session, base_url: str, model: str, job: Job) -> Result:
    start = time.monotonic()
    ttft = None
    chunks = 0
    finish: dict[int, Optional[str]] = {}
    usage = None
    done = False
    logprobs_missing = False
    wants_logprobs = "logprobs" in job.body
    try:
        async with session.post(f"{base_url}/v1/completions",
                                json=request_body(model, job)) as resp:
            if job.kind == "bad" or resp.status != 200:
                text = await resp.text()
                if job.kind == "bad":
                    return _refusal(job, resp.status, text)
                return Result("error", error=f"HTTP {resp.status}: {text[:300]}")
            if not job.streamed:
                payload = await resp.json()
                ttft = time.monotonic() - start
                usage = payload.get("usage")
                for choice in payload.get("choices") or []:
                    finish[choice["index"]] = choice.get("finish_reason")
                    logprobs_missing |= not choice.get("logprobs")
                    if job.kind == "echo" and len(choice.get("prompt_logprobs") or ()) != len(
                            job.prompt):
                        logprobs_missing = True
                done = True
            else:
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
                        index = choice.get("index", 0)
                        finish[index] = choice.get("finish_reason") or finish.get(index)
                        if wants_logprobs and choice.get("text") and not choice.get("logprobs"):
                            logprobs_missing = True
                    if job.disconnect_after is not None and chunks >= job.disconnect_after:
                        resp.close()  # drop the connection mid-stream, as a vanished client does
                        return Result("disconnected", ttft=ttft, output_tokens=chunks)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001  (HTTP, timeout, bad JSON: each one is reported)
        return Result("error", ttft=ttft, error=f"{job.kind}: {error_text(exc)}")
    latency = time.monotonic() - start
    if job.disconnect_after is not None:
        # The whole response arrived before the client could cut it off: still a client
        # that closed its stream (the server may just not have noticed); not an error.
        return Result("disconnected", ttft=ttft, output_tokens=chunks)
    problems = _problems(job, finish, usage, logprobs_missing, done)
    if problems:
        # Lengths vary per request: keep the kinds of problem distinct, not every number.
        kind = "; ".join(re.sub(r"\d+", "N", p) for p in problems)
        return Result("error", ttft=ttft, latency=latency, error=f"{job.kind}: {kind}")
    return Result("completed", ttft=ttft, latency=latency,
                  output_tokens=usage["completion_tokens"])
