"""TOVA through the real ``vllm serve`` CLI and the official ``openai`` client.

One server per module (TOVA budget 32 tokens, block size 32, chunked prefill at 64
tokens).  Its greedy outputs must equal an in-process offline engine with the same
settings, and differ from a vanilla offline engine where eviction changed the context,
which shows the plugin is active in the served engine.  Every request here has
prompt + output longer than the budget, so it evicts.
"""

from __future__ import annotations

import json
import random

import pytest

from engine_harness import make_llm, shutdown
from server_harness import VllmServer

CACHE_SIZE = 32
TOVA = {"cache_size": CACHE_SIZE}
MAX_TOKENS = 24
BLOCK_SIZE = 32
MAX_BATCHED = 64
MAX_MODEL_LEN = 1024
# The server's max_num_seqs: vLLM's CPU default for the OpenAI server (128), capped at
# max_num_batched_tokens.  The offline engine copies it.
SERVER_MAX_NUM_SEQS = min(128, MAX_BATCHED)
MODEL_NAME = "tiny"
ARCH = "llama_gqa"

# Token-id prompts (exact on both sides).  Ids 3..96 are the printable ASCII bytes of the
# tiny byte-level tokenizer, so the prompts also decode to clean text.
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(3, 97) for _ in range(n)] for n in (10, 120)]
LONG = 1  # index of the prompt that is far beyond the budget

CONVERSATION = [
    {"role": "system", "content": "You are a tiny test model."},
    {"role": "user", "content": "Hello! Can you tell me what TOVA does to a KV cache?"},
    {"role": "assistant", "content": "It keeps the tokens that get the most attention."},
    {"role": "user", "content": "And what happens to the others?"},
]

GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0)
SMALL_BUDGET = 8  # a per-request budget below the server's
EXTRA = {"ignore_eos": True, "return_token_ids": True}

SERVER_ARGS = [
    "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
    "--block-size", str(BLOCK_SIZE), "--max-num-batched-tokens", str(MAX_BATCHED),
    "--enforce-eager", "--seed", "0", "--served-model-name", MODEL_NAME,
    "--additional-config", json.dumps({"tova": TOVA}),
]


@pytest.fixture(scope="module")
def server_process(tiny_models, tmp_path_factory):
    """The CLI server, started but not yet awaited (offline work overlaps its start-up)."""
    log_path = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    server = VllmServer.start(
        tiny_models[ARCH], SERVER_ARGS, log_path,
        env_updates={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(server_process):
    server_process.wait_healthy(timeout=240)
    return server_process


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                         timeout=300)


def _offline_outputs(llm):
    from vllm import SamplingParams

    params = SamplingParams(**GREEDY, ignore_eos=True)
    completions = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                               use_tqdm=False)
    (chat,) = llm.chat(CONVERSATION, params, use_tqdm=False)
    (small_budget,) = llm.generate(
        [{"prompt_token_ids": PROMPTS[LONG]}],
        SamplingParams(**GREEDY, ignore_eos=True, extra_args={"tova_cache_size": SMALL_BUDGET}),
        use_tqdm=False)
    (h2o,) = llm.generate(
        [{"prompt_token_ids": PROMPTS[LONG]}],
        SamplingParams(**GREEDY, ignore_eos=True, extra_args={"tova_policy": "h2o"}),
        use_tqdm=False)
    return {
        "small_budget": list(small_budget.outputs[0].token_ids),
        "h2o": list(h2o.outputs[0].token_ids),
        "completions": [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in completions],
        "chat": (list(chat.prompt_token_ids), list(chat.outputs[0].token_ids),
                 chat.outputs[0].text),
    }


@pytest.fixture(scope="module")
def offline(server_process, tiny_models):
    """Greedy outputs of in-process offline engines: TOVA (same settings) and vanilla."""
    results = {}
    for name, tova in (("tova", TOVA), ("vanilla", None)):
        llm = make_llm(tiny_models[ARCH], tova, block_size=BLOCK_SIZE,
                       max_num_batched_tokens=MAX_BATCHED, max_model_len=MAX_MODEL_LEN,
                       max_num_seqs=SERVER_MAX_NUM_SEQS)
        try:
            results[name] = _offline_outputs(llm)
        finally:
            shutdown(llm)
    return results


def _with_log(server, message: str) -> str:
    return f"{message}\n--- server log tail ({server.log_path}) ---\n{server.tail(40)}"


def test_completions_equal_offline_engine(client, server, offline):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, **GREEDY,
                                     extra_body=EXTRA)
    choices = sorted(resp.choices, key=lambda c: c.index)
    assert len(choices) == len(PROMPTS)
    for prompt, choice, (tokens, text) in zip(PROMPTS, choices, offline["tova"]["completions"]):
        assert len(prompt) + MAX_TOKENS > CACHE_SIZE  # every request evicts
        assert choice.finish_reason == "length"
        assert choice.token_ids == tokens, _with_log(server, f"prompt of {len(prompt)}")
        assert choice.text == text
        assert choice.prompt_token_ids == prompt
    assert resp.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert resp.usage.completion_tokens == MAX_TOKENS * len(PROMPTS)


def test_served_engine_is_not_vanilla(client, offline):
    """Eviction changes the greedy output of the long prompt: the server must follow TOVA."""
    tova_tokens = offline["tova"]["completions"][LONG][0]
    vanilla_tokens = offline["vanilla"]["completions"][LONG][0]
    assert tova_tokens != vanilla_tokens, "budget too large to tell TOVA from vanilla"
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[LONG], **GREEDY,
                                     extra_body=EXTRA)
    assert resp.choices[0].token_ids == tova_tokens


def test_chat_completion_equals_offline_chat(client, server, offline):
    prompt_ids, tokens, text = offline["tova"]["chat"]
    assert len(prompt_ids) > CACHE_SIZE
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CONVERSATION, **GREEDY,
                                          extra_body=EXTRA)
    (choice,) = resp.choices
    assert resp.prompt_token_ids == prompt_ids  # the same chat template on both sides
    assert choice.token_ids == tokens, _with_log(server, "chat")
    assert choice.message.content == text
    assert choice.finish_reason == "length"
    assert tokens != offline["vanilla"]["chat"][1]  # eviction mattered here too


def test_streamed_text_equals_non_streamed(client, offline):
    prompt = PROMPTS[LONG]
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY,
                                      extra_body=EXTRA)
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY,
                                       extra_body=EXTRA, stream=True)
    texts, tokens, finish = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.text)
            tokens.extend(getattr(choice, "token_ids", None) or [])
            finish = choice.finish_reason or finish
    assert len(texts) > 1, "the response was not streamed"
    assert "".join(texts) == whole.choices[0].text
    assert tokens == whole.choices[0].token_ids == offline["tova"]["completions"][LONG][0]
    assert finish == "length"


def test_per_request_budget_over_http(client, offline):
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[LONG], **GREEDY,
        extra_body={**EXTRA, "vllm_xargs": {"tova_cache_size": SMALL_BUDGET}})
    assert resp.choices[0].token_ids == offline["tova"]["small_budget"]
    assert resp.choices[0].token_ids != offline["tova"]["completions"][LONG][0]


def test_per_request_policy_over_http(client, offline):
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[LONG], **GREEDY,
        extra_body={**EXTRA, "vllm_xargs": {"tova_policy": "h2o"}})
    assert resp.choices[0].token_ids == offline["tova"]["h2o"]
    assert resp.choices[0].token_ids != offline["tova"]["completions"][LONG][0]


@pytest.mark.parametrize("bad", [
    dict(prompt=PROMPTS[0], max_tokens=4, extra_body={"vllm_xargs": {"tova_policy": "lru"}}),
    dict(prompt=PROMPTS[0], max_tokens=4, extra_body={"vllm_xargs": {"tova_cache_size": 0}}),
    dict(prompt=PROMPTS[0], max_tokens=4,
         extra_body={"vllm_xargs": {"tova_cache_size": CACHE_SIZE + 1}}),
    dict(prompt=PROMPTS[0], max_tokens=4, extra_body={"vllm_xargs": {"tova_cache_size": 2.5}}),
    dict(prompt=PROMPTS[0], max_tokens=-1),
    dict(prompt=[5] * (MAX_MODEL_LEN + 8), max_tokens=4),  # longer than max_model_len
])
def test_bad_request_is_4xx_and_server_keeps_serving(client, server, offline, bad):
    import openai

    with pytest.raises(openai.APIStatusError) as excinfo:
        client.completions.create(model=MODEL_NAME, temperature=0, **bad)
    assert 400 <= excinfo.value.status_code < 500, excinfo.value
    if "vllm_xargs" in bad.get("extra_body", {}):
        assert excinfo.value.status_code == 400
        (argument,) = bad["extra_body"]["vllm_xargs"]
        assert argument in str(excinfo.value)
    assert server.health_status() == 200
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[LONG], **GREEDY,
                                     extra_body=EXTRA)
    assert resp.choices[0].token_ids == offline["tova"]["completions"][LONG][0]



def post(server, path: str, body: dict, timeout: float = 120.0) -> tuple[int, bytes]:
    """The HTTP status and the raw body (a streamed body is read to its end)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


BAD_XARGS = [  # (vllm_xargs, the parameter named, words the message must contain)
    ({"tova_cache_size": True}, "tova_cache_size", "got true (a boolean)"),
    ({"tova_cache_size": False}, "tova_cache_size", "got false (a boolean)"),
    ({"tova_cache_sizee": 8}, "tova_cache_sizee", "'tova_cache_size', 'tova_policy'"),
    ({"tova_sinks": 2}, "tova_sinks", "'tova_cache_size', 'tova_policy'"),
    ({"tova_recent": 4}, "tova_recent", "'tova_cache_size', 'tova_policy'"),
    ({"tova_policy": "lru"}, "tova_policy", "got 'lru'"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("xargs, parameter, words", BAD_XARGS,
                         ids=["true", "false", "misspelt", "sinks", "recent", "policy"])
def test_bad_request_arg_is_400_before_any_stream(server, endpoint, stream, xargs, parameter,
                                                  words):
    """Streamed or not, completions or chat: 400 in vLLM's error body naming the argument,
    before any response starts; nothing reaches the engine."""
    body = dict(model=MODEL_NAME, max_tokens=4, stream=stream, vllm_xargs=xargs)
    if endpoint == "chat":
        body["messages"] = CONVERSATION[:2]
    else:
        body["prompt"] = PROMPTS[0]
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    status, raw = post(server, path, body)
    assert status == 400, raw[:500]
    error = json.loads(raw)["error"]
    assert error["param"] == parameter
    assert parameter in error["message"] and words in error["message"], error


def test_bad_request_args_logged_no_server_error(server):
    """Runs after the refusals above: none of them left an ERROR or a traceback."""
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, server.tail(80)


def test_server_log_shows_tova_settings(server):
    log = server.log()
    assert "'additional_config': {'tova': {'cache_size': 32}}" in log
    assert "Traceback" not in log, server.tail(80)


def test_server_log_announces_tova(server):
    # One line, from the process the user started, naming everything TOVA changed.
    lines = [line for line in server.log().splitlines() if "tova-vllm: TOVA enabled" in line]
    assert len(lines) == 1, lines
    (line,) = lines
    for part in ("cache_size=32 tokens", "policy=tova", "prompt_mode=prompt",
                 "prefix caching on (copy-on-write"):
        assert part in line, line


def _tova_metrics(server) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("tova_") and "{" in line:
            name = line.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def _settled(server, key, previous=None, timeout=20.0):
    import time

    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = _tova_metrics(server).get(key)
        if value is not None and value != previous:
            time.sleep(1.0)  # let the last step's stats arrive
            return _tova_metrics(server)[key]
        time.sleep(0.2)
    return value


def _vllm_counter(server, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_prefix_cache_hits_with_tova(client, server, hf_models):
    """Prefix caching stays on (copy-on-write): the second of two equal 150-token prompts
    reads the blocks before its first eviction (at 150: 128 tokens), vLLM's counters say
    so, and both give the reference's tokens."""
    import time

    from tova_vllm.reference import generate

    prompt = [random.Random(7).randrange(3, 97) for _ in range(150)]
    queries = "vllm:prefix_cache_queries_total"
    hits = "vllm:prefix_cache_hits_total"
    before = (_vllm_counter(server, queries), _vllm_counter(server, hits))
    outputs = [client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY,
                                         extra_body=EXTRA).choices[0].token_ids
               for _ in range(2)]
    expected = generate(hf_models[ARCH], prompt, cache_size=CACHE_SIZE,
                        max_new_tokens=MAX_TOKENS).token_ids
    assert outputs[0] == outputs[1] == expected
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the engine's stats reach the API server each step
        after = (_vllm_counter(server, queries), _vllm_counter(server, hits))
        if after[0] - before[0] >= 2 * len(prompt):
            break
        time.sleep(0.2)
    assert after[0] - before[0] == 2 * len(prompt)
    assert after[1] - before[1] == 128


def test_metrics_count_evictions_and_saved_blocks(client, server):
    """A 120-token prompt with 24 generated tokens under C = 32: the prompt end drops
    120 - 32 tokens, then each of the 23 fed-back generated tokens drops one, so exactly
    120 + 23 - 32 = 111 tokens are evicted (per layer)."""
    before = _tova_metrics(server).get("tova_evicted_tokens_total", 0.0)
    client.completions.create(model=MODEL_NAME, prompt=PROMPTS[LONG], **GREEDY, extra_body=EXTRA)
    after = _settled(server, "tova_evicted_tokens_total", before)
    assert after - before == len(PROMPTS[LONG]) + MAX_TOKENS - 1 - CACHE_SIZE

    # Mid-stream, a long request holds ceil(33 / 32) = 2 blocks instead of ceil(n / 32).
    # Read the gauges in a scrape that shows the request still running: the engine may run
    # ahead of the client (the prompt is a prefix-cache hit by now).
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[LONG], max_tokens=800,
                                       temperature=0, extra_body=EXTRA, stream=True)
    seen = []
    for i, _chunk in enumerate(stream):
        if i >= 150:
            gauges = _tova_metrics(server)
            if _vllm_counter(server, "vllm:num_requests_running") == 1:
                seen.append(gauges)
                break
    stream.close()
    assert seen, "the request finished before a scrape saw it running"
    during = seen[0]
    assert during["tova_kv_blocks_held"] == 2
    assert during["tova_kv_blocks_saved"] >= -(-(len(PROMPTS[LONG]) + 150) // BLOCK_SIZE) - 2
    assert _settled_value(server, "tova_kv_blocks_held", 0) == 0  # all freed once idle


def _settled_value(server, key, want, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = _tova_metrics(server).get(key)
        if value == want:
            return value
        time.sleep(0.2)
    return value


def _post_json(server, route: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.base_url}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": CONVERSATION[:2], "max_tokens": 4}),
])
@pytest.mark.parametrize("xargs,param", [
    ({"tova_cache_size": CACHE_SIZE + 1}, "tova_cache_size"),
    ({"tova_policy": "lru"}, "tova_policy"),
])
def test_tova_400_body_is_vllms_error_schema(server, route, body, xargs, param):
    """A bad per-request TOVA argument gets the same JSON body vLLM gives its own 400s
    (here: a negative max_tokens), with the argument in ``param`` and its bound in the
    message."""
    body = {"model": MODEL_NAME, **body}
    vllm_status, vllm_error = _post_json(server, route, {**body, "max_tokens": -1})
    status, error = _post_json(server, route, {**body, "vllm_xargs": xargs})
    assert vllm_status == status == 400
    assert set(error) == set(vllm_error) == {"error"}
    assert set(error["error"]) == set(vllm_error["error"]), (error, vllm_error)
    assert error["error"]["type"] == vllm_error["error"]["type"] == "BadRequestError"
    assert error["error"]["code"] == vllm_error["error"]["code"] == 400
    assert error["error"]["param"] == param
    assert param in error["error"]["message"]


def test_vllm_bench_serve(server, tiny_models, tmp_path):
    """vLLM's own serving benchmark runs against the TOVA server and reports; the server's
    eviction counter shows the requests were bounded."""
    import subprocess

    before = _tova_metrics(server).get("tova_evicted_tokens_total", 0.0)
    num_prompts, input_len, output_len = 4, 48, 16
    out = subprocess.run(
        ["vllm", "bench", "serve", "--base-url", server.base_url, "--model", MODEL_NAME,
         "--tokenizer", str(tiny_models[ARCH]), "--dataset-name", "random",
         "--random-input-len", str(input_len), "--random-output-len", str(output_len),
         "--num-prompts", str(num_prompts), "--ignore-eos", "--seed", "0",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Serving Benchmark Result" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == num_prompts and result["total_output_tokens"] == (
        num_prompts * output_len)
    # Every prompt is longer than the budget: each request drops every token it fed past
    # C (the prompt's surplus at its end, then one per fed-back generated token).
    evicted = _settled(server, "tova_evicted_tokens_total", before) - before
    assert evicted == result["total_input_tokens"] + num_prompts * (output_len - 1 - CACHE_SIZE)
