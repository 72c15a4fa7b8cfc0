"""The plain-PyTorch TOVA reference: exact without eviction, and evicting as specified.

The oracles here are independent of ``tova_vllm.reference``: Hugging Face's own greedy
generation and eager attention weights, brute-force score recomputation, a naive
token-by-token implementation of the decode rule, and hand-derived cache sizes.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from tiny_models import ARCHS, EOS_ID, VOCAB_SIZE
from tova_vllm.reference import LayerTrace, generate

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ALL_ARCHS = ARCHS + ("qwen3",)


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


class Recorder:
    """Collects the reference's per-layer traces."""

    def __init__(self):
        self.records: list[LayerTrace] = []

    def __call__(self, record: LayerTrace) -> None:
        self.records.append(record)

    def layer(self, index: int) -> list[LayerTrace]:
        return [r for r in self.records if r.layer == index]

    def evictions(self) -> list[LayerTrace]:
        return [r for r in self.records if r.evicted]


MODES = [("prompt", 512), ("chunked", 1), ("chunked", 3), ("chunked", 8)]


# ------------------------------------------------------------- no eviction: exactly HF


@pytest.mark.parametrize("prompt_len", [1, 7, 40])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_matches_hf_greedy_when_cache_never_fills(hf_models, arch, prompt_len):
    model = hf_models[arch]
    prompt, new = _prompt(prompt_len, seed=prompt_len), 24
    want = _hf_greedy(model, prompt, new)
    # The last generated token is never fed back: P + N - 1 tokens are ever cached.
    tight = prompt_len + new - 1
    for mode, chunk in [("prompt", 512), ("chunked", 4)]:
        for cache_size in (tight, 4096):
            out = generate(
                model, prompt, cache_size=cache_size, max_new_tokens=new,
                prompt_mode=mode, prompt_chunk=chunk, eos_token_id=EOS_ID,
            )
            assert out.token_ids == want, (mode, cache_size)
            assert not any(seg.evicted for seg in out.segments)
            assert len(out.logprobs) == len(out.token_ids)
            assert all(lp <= 0.0 for lp in out.logprobs)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_token_less_cache_starts_evicting(hf_models, arch):
    """The counterpart of the tight cache above: C = P + N - 2 must evict exactly once,
    at the last processed token."""
    prompt, new = _prompt(20, seed=5), 12
    out = generate(hf_models[arch], prompt, cache_size=20 + new - 2, max_new_tokens=new)
    assert [seg.end for seg in out.segments if seg.evicted] == [20 + new - 1]


# ------------------------------------------------------------- cache sizes


@pytest.mark.parametrize("cache_size", [1, 5, 13])
@pytest.mark.parametrize("mode,chunk", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_each_layer_holds_min_n_c(hf_models, arch, mode, chunk, cache_size):
    prompt_len, new = 23, 15
    rec = Recorder()
    out = generate(
        hf_models[arch], _prompt(prompt_len, seed=1), cache_size=cache_size, max_new_tokens=new,
        prompt_mode=mode, prompt_chunk=chunk, trace=rec,
    )
    num_layers = len(hf_models[arch].model.layers)
    segs = out.segments
    # Segments tile [0, P + N - 1): the prompt, then each fed-back token.
    assert segs[0].start == 0 and segs[-1].end == prompt_len + new - 1
    assert all(a.end == b.start for a, b in zip(segs, segs[1:]))
    decode_starts = [s.start for s in segs if s.start >= prompt_len]
    assert decode_starts == list(range(prompt_len, prompt_len + new - 1))
    for seg in segs:
        assert seg.held == (min(seg.end, cache_size),) * num_layers, seg
        boundary = seg.end >= prompt_len or (mode == "chunked" and seg.end % chunk == 0)
        assert seg.evicted == (boundary and seg.end > cache_size), seg

    # Peak memory: the whole prompt in prompt mode, at most C + K in chunked mode.
    peak = max(r.positions.numel() for r in rec.records if r.end <= prompt_len)
    if mode == "prompt":
        assert peak == prompt_len
    else:
        assert peak <= cache_size + chunk
    decode_peak = max(r.positions.numel() for r in rec.records if r.start >= prompt_len)
    assert decode_peak == min(cache_size + 1, prompt_len + new - 1)


@pytest.mark.parametrize("mode,chunk", MODES)
@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2"])
def test_cache_bookkeeping_carries_keys_with_positions(hf_models, arch, mode, chunk):
    """What a layer holds after a segment is exactly what it attends to in the next one,
    and each key stays with its position through compaction."""
    cache_size, prompt_len = 7, 19
    rec = Recorder()
    out = generate(
        hf_models[arch], _prompt(prompt_len, seed=2), cache_size=cache_size, max_new_tokens=12,
        prompt_mode=mode, prompt_chunk=chunk, trace=rec,
    )
    for index in range(len(hf_models[arch].model.layers)):
        records = rec.layer(index)
        for prev, cur in zip(records, records[1:]):
            assert cur.start == prev.end
            new = torch.arange(cur.start, cur.end)
            assert torch.equal(cur.positions, torch.cat((prev.kept_positions, new)))
            held = prev.kept_positions.numel()
            slot_of = {int(p): j for j, p in enumerate(prev.positions)}
            source = torch.tensor([slot_of[int(p)] for p in prev.kept_positions])
            assert torch.equal(cur.keys[:, :held], prev.keys[:, source])
            if prev.evicted:
                survivors = prev.positions[prev.kept_slots].sort().values
                assert torch.equal(prev.kept_positions.sort().values, survivors)
        assert torch.equal(out.positions[index], records[-1].kept_positions)
        assert len(set(out.positions[index].tolist())) == out.positions[index].numel()


# ------------------------------------------------------------- which tokens survive


def _brute_force_scores(model, layer: int, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over query heads of the last query's softmax weights, one head at a time, in fp64."""
    config = model.config
    head_dim = config.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    total = torch.zeros(keys.shape[1], dtype=torch.float64)
    for h in range(config.num_attention_heads):
        k = keys[h // group].double()
        logits = (k @ query[h].double()) * head_dim**-0.5
        total += torch.softmax(logits, dim=0)
    return total / config.num_attention_heads


@pytest.mark.parametrize("cache_size", [6, 20])
@pytest.mark.parametrize("mode,chunk", [("prompt", 512), ("chunked", 5)])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_kept_set_is_top_c_by_brute_force_score(hf_models, arch, mode, chunk, cache_size):
    model = hf_models[arch]
    rec = Recorder()
    generate(
        model, _prompt(40, seed=3), cache_size=cache_size, max_new_tokens=20,
        prompt_mode=mode, prompt_chunk=chunk, trace=rec,
    )
    evictions = rec.evictions()
    assert len(evictions) >= len(model.model.layers) * 20
    dropped_new_token = 0
    for r in evictions:
        want = _brute_force_scores(model, r.layer, r.query, r.keys)
        torch.testing.assert_close(r.scores.double(), want, atol=1e-6, rtol=1e-4)
        assert abs(want.sum().item() - 1.0) < 1e-9

        kept = set(r.kept_positions.tolist())
        assert len(kept) == cache_size == r.kept_positions.numel()
        assert kept <= set(r.positions.tolist())
        is_kept = torch.tensor([int(p) in kept for p in r.positions])
        # Tie-robust top-C: nothing dropped scores above anything kept.
        assert want[is_kept].min() >= want[~is_kept].max() - 1e-7, (r.layer, r.end)
        dropped_new_token += int(r.end - 1 not in kept)
    # TOVA protects nothing: the newest token itself is sometimes the one dropped
    # (2-21 times per case with these seeds).
    assert dropped_new_token >= 1


@pytest.mark.parametrize("cache_size", [8, 25])
@pytest.mark.parametrize("prompt_len", [40, 100])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_first_eviction_uses_hf_attention_of_last_prompt(hf_models, arch, prompt_len, cache_size):
    """At the end of the prompt the whole prompt is cached, so HF's own eager attention
    weights of the last prompt token are exactly TOVA's scores."""
    model = hf_models[arch]
    prompt = _prompt(prompt_len, seed=4)
    rec = Recorder()
    generate(model, prompt, cache_size=cache_size, max_new_tokens=1, trace=rec)
    with torch.no_grad():
        hf = model(torch.tensor([prompt]), output_attentions=True)
    for index, attn in enumerate(hf.attentions):
        (r,) = rec.layer(index)
        assert r.evicted and r.end == prompt_len
        assert torch.equal(r.positions, torch.arange(prompt_len))
        hf_scores = attn[0, :, -1].float().mean(dim=0)
        torch.testing.assert_close(r.scores, hf_scores, atol=1e-6, rtol=1e-4)
        is_kept = torch.zeros(prompt_len, dtype=torch.bool)
        is_kept[r.kept_positions] = True
        assert int(is_kept.sum()) == cache_size
        assert hf_scores[is_kept].min() >= hf_scores[~is_kept].max() - 1e-7


# ------------------------------------------------------------- chunked mode


def _naive_token_by_token(model, prompt: list[int], cache_size: int, max_new_tokens: int):
    """TOVA as a multi-state RNN, one token at a time, written from the paper's rule.

    Every token (prompt or generated) is appended, attends over the layer's cache, and if
    the layer then holds C + 1 tokens the lowest-scoring one (ties: the highest slot) is
    dropped, its slot refilled with the token in the last slot.  Uses transformers' own
    RoPE and repeat_kv; shares no code with ``tova_vllm``.

    Returns the generated ids and, per fed token, each layer's positions in slot order.
    """
    inner = model.model
    caches = [{"k": [], "v": [], "pos": []} for _ in inner.layers]
    history: list[list[list[int]]] = []

    def feed(token: int, position: int) -> torch.Tensor:
        hidden = inner.embed_tokens(torch.tensor([[token]]))
        cos, sin = inner.rotary_emb(hidden, torch.tensor([[position]]))
        for layer, cache in zip(inner.layers, caches):
            attn = layer.self_attn
            d = attn.head_dim
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, 1, -1, d)
            k = attn.k_proj(x).view(1, 1, -1, d)
            v = attn.v_proj(x).view(1, 1, -1, d)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            cache["k"].append(k[0, :, 0])
            cache["v"].append(v[0, 0])
            cache["pos"].append(position)
            groups = q.shape[1] // k.shape[1]
            keys = repeat_kv(torch.stack(cache["k"], dim=1)[None], groups)
            values = repeat_kv(torch.stack(cache["v"], dim=1)[None], groups)
            logits = q @ keys.transpose(2, 3) * attn.scaling
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
            out = (weights @ values).transpose(1, 2).reshape(1, 1, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if len(cache["pos"]) > cache_size:
                scores = weights[0, :, 0].mean(dim=0).tolist()
                low = min(scores)
                drop = max(j for j, s in enumerate(scores) if s == low)
                for key in ("k", "v", "pos"):
                    cache[key][drop] = cache[key][-1]
                    cache[key].pop()
        history.append([list(c["pos"]) for c in caches])
        return model.lm_head(inner.norm(hidden))[0, -1]

    with torch.no_grad():
        for position, token in enumerate(prompt):
            logits = feed(token, position)
        generated = []
        while True:
            generated.append(int(logits.argmax()))
            if len(generated) == max_new_tokens:
                break
            logits = feed(generated[-1], len(prompt) + len(generated) - 1)
    return generated, history


@pytest.mark.parametrize(
    "mode,prompt_len,cache_size",
    [
        ("chunked", 30, 6),  # K = 1: every prompt token evicts like a decode step
        ("chunked", 30, 17),
        ("chunked", 5, 1),
        ("prompt", 9, 9),  # prompt fits: prompt mode is the token-by-token rule too
        ("prompt", 4, 7),
    ],
)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_chunk_of_one_is_the_token_by_token_rule(hf_models, arch, mode, prompt_len, cache_size):
    model = hf_models[arch]
    prompt, new = _prompt(prompt_len, seed=6), 16
    want_ids, want_history = _naive_token_by_token(model, prompt, cache_size, new)
    rec = Recorder()
    out = generate(
        model, prompt, cache_size=cache_size, max_new_tokens=new,
        prompt_mode=mode, prompt_chunk=1, trace=rec,
    )
    assert out.token_ids == want_ids
    num_layers = len(model.model.layers)
    # Once the cache is full every fed token evicts, so each is a segment of its own.
    assert all(s.end - s.start == 1 for s in out.segments if s.start >= cache_size)
    # Compare what each layer holds, in slot order, at the end of every segment.
    got_history = [
        [r.kept_positions.tolist() for r in rec.records[i * num_layers : (i + 1) * num_layers]]
        for i in range(len(out.segments))
    ]
    assert got_history == [want_history[s.end - 1] for s in out.segments]


@pytest.mark.parametrize("prompt_len", [12, 33])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunk_at_least_prompt_is_prompt_mode(hf_models, arch, prompt_len):
    model = hf_models[arch]
    prompt, cache_size = _prompt(prompt_len, seed=7), 5

    def run(mode, chunk):
        rec = Recorder()
        out = generate(
            model, prompt, cache_size=cache_size, max_new_tokens=10,
            prompt_mode=mode, prompt_chunk=chunk, trace=rec,
        )
        return out, rec

    base, base_rec = run("prompt", 512)
    for chunk in (prompt_len, prompt_len + 3, 10 * prompt_len):
        out, rec = run("chunked", chunk)
        assert out.token_ids == base.token_ids
        assert out.segments == base.segments
        for a, b in zip(rec.records, base_rec.records, strict=True):
            assert torch.equal(a.kept_positions, b.kept_positions)
            assert (a.scores is None) == (b.scores is None)
            assert a.scores is None or torch.equal(a.scores, b.scores)
    # A shorter chunk does evict inside the prompt, so the comparison above has teeth.
    out, _ = run("chunked", prompt_len // 2)
    assert [s.end for s in out.segments if s.evicted][0] == prompt_len // 2


# ------------------------------------------------------------- API


def test_eos_stops_generation_and_is_included(hf_models):
    model = hf_models["llama_mha"]
    prompt = _prompt(15, seed=8)
    free = generate(model, prompt, cache_size=6, max_new_tokens=20)
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    out = generate(model, prompt, cache_size=6, max_new_tokens=20, eos_token_id=stop)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.logprobs == free.logprobs[: first + 1]


def test_input_forms_agree(hf_models):
    model = hf_models["llama_gqa"]
    prompt = _prompt(11, seed=9)
    kwargs = dict(cache_size=4, max_new_tokens=6)
    a = generate(model, prompt, **kwargs).token_ids
    b = generate(model, torch.tensor(prompt), **kwargs).token_ids
    c = generate(model, torch.tensor([prompt]), **kwargs).token_ids
    assert a == b == c and len(a) == 6
    assert generate(model, prompt, cache_size=4, max_new_tokens=0).token_ids == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cache_size=0), "cache_size"),
        (dict(cache_size=-3), "cache_size"),
        (dict(cache_size=2.5), "cache_size"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt_mode="window"), "prompt_mode"),
        (dict(prompt_mode="chunked", prompt_chunk=0), "prompt_chunk"),
        (dict(prompt_chunk=-1), "prompt_chunk"),
        (dict(input_ids=[]), "at least one"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.long)), "1-D"),
        (dict(input_ids=[[1, 2]]), "flat sequence"),
    ],
)
def test_bad_arguments_raise(hf_models, kwargs, match):
    args = dict(input_ids=[5, 6, 7], cache_size=4, max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(hf_models["llama_mha"], **args)


def test_sliding_window_model_rejected(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["mistral"], sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, [5, 6, 7], cache_size=4, max_new_tokens=2)


# ------------------------------------------------------------- baseline policies


@pytest.mark.parametrize("policy", ["window", "sink_window", "h2o"])
@pytest.mark.parametrize("arch", ["llama_gqa", "qwen3"])
def test_baselines_at_the_prompt_end_follow_hf_attention(hf_models, arch, policy):
    """At the prompt's eviction: window keeps the last C positions, sink_window the first
    four plus the last C - 4, H2O the last C/2 plus the heaviest by attention summed over
    every prompt query and averaged over heads (from HF's eager attention weights)."""
    model = hf_models[arch]
    prompt_len, cache_size = 60, 16
    prompt = _prompt(prompt_len, seed=9)
    rec = Recorder()
    generate(model, prompt, cache_size=cache_size, max_new_tokens=1, trace=rec, policy=policy)
    with torch.no_grad():
        hf = model(torch.tensor([prompt]), output_attentions=True)
    for index, attn in enumerate(hf.attentions):
        (r,) = rec.layer(index)
        kept = set(r.kept_positions.tolist())
        assert len(kept) == cache_size
        if policy == "window":
            assert kept == set(range(prompt_len - cache_size, prompt_len))
        elif policy == "sink_window":
            assert kept == set(range(4)) | set(range(prompt_len - cache_size + 4, prompt_len))
        else:
            heavy = attn[0].float().mean(dim=0).sum(dim=0)  # [P]: summed over queries
            recent = set(range(prompt_len - cache_size // 2, prompt_len))
            assert recent <= kept
            rest = torch.tensor([p not in recent for p in range(prompt_len)])
            is_kept = torch.tensor([p in kept for p in range(prompt_len)])
            assert heavy[is_kept & rest].min() >= heavy[~is_kept].max() - 1e-6
            by_slot = r.scores[torch.argsort(r.positions)]  # slot order == position order here
            torch.testing.assert_close(by_slot[rest].float(), heavy[rest], atol=1e-5, rtol=1e-4)


def test_policies_differ_and_full_cache_is_hf(hf_models):
    model = hf_models["llama_gqa"]
    prompt = _prompt(50, seed=10)
    outs = {p: generate(model, prompt, cache_size=12, max_new_tokens=30, policy=p,
                        prompt_mode="chunked", prompt_chunk=4).token_ids
            for p in ("tova", "window", "sink_window", "h2o")}
    assert len({tuple(v) for v in outs.values()}) == 4
    full = _hf_greedy(model, prompt, 30)
    for p in ("tova", "window", "sink_window", "h2o"):
        assert generate(model, prompt, cache_size=80, max_new_tokens=30, policy=p).token_ids == full


def test_teacher_forced_logprobs_full_cache_equals_hf(hf_models):
    from tova_vllm.reference import teacher_forced_logprobs

    model = hf_models["llama_mha"]
    ids = _prompt(70, seed=11)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
    for policy in ("tova", "h2o"):
        got = teacher_forced_logprobs(model, ids, cache_size=70, policy=policy)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # With eviction the first C + 1 tokens are still exact, later ones are not.
    small = teacher_forced_logprobs(model, ids, cache_size=20)
    torch.testing.assert_close(small[:20], want[:20], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(small[21:], want[21:], atol=1e-3)
