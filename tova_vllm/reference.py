"""Plain-PyTorch TOVA on Hugging Face models: the test oracle and a research API.

TOVA (Token Omission Via Attention) keeps at most ``cache_size`` (C) tokens per layer.
Each layer chooses its own tokens; all KV heads of a layer keep the same ones.  Keys are
cached after RoPE at their true logical positions and are never re-indexed.

The token stream is cut into segments by :class:`~tova_vllm.policies.EvictionSchedule`
(the prompt, or prompt chunks of ``prompt_chunk`` in ``chunked`` mode, then one segment
per generated token).  For a segment of L new tokens, in every layer:

1. the new keys/values are appended after the m cached ones (slots ``[m, m + L)``);
2. query i of the segment attends to slots ``[0, m + i]`` (softmax in fp32);
3. if the segment ends at an eviction point, every slot is scored by the segment's
   *last* query: its softmax weights averaged over all query heads.  The C best slots
   survive (:func:`~tova_vllm.policies.positions_to_keep`), and survivors at slots >= C move
   into the holes below C (:func:`~tova_vllm.policies.compaction_moves`).

The cache is kept in that compacted *slot order* on purpose, not in position order:
equal scores are broken by slot (see ``tova_vllm/policies/selection.py``), and the vLLM
engine holds its paged cache in the same order, so both make the same choice and sum
attention in the same order.

The forward pass is written out over the model's own modules (norms, projections, MLP,
rotary embedding) so that no Hugging Face cache class or attention mask is involved; with
a cache large enough never to evict, it reproduces ``model.generate(do_sample=False)``.
Supported: Llama-family decoder-only models (Llama, Mistral, Qwen2, and Qwen3-style
per-head q/k norms) with full attention, batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .policies import (
    EvictionPolicy,
    EvictionSchedule,
    accumulated_from_logits,
    compaction_moves,
    head_summed_probs,
    positions_to_keep,
    head_mean,
)

__all__ = [
    "LayerTrace", "ReferenceOutput", "SegmentRecord", "generate", "teacher_forced_logprobs",
]

PROMPT_MODES = ("prompt", "chunked")


@dataclass(frozen=True)
class LayerTrace:
    """One layer's view of one segment, passed to ``generate``'s ``trace`` callback.

    Tensors are on the model's device and are never modified after the call.
    """

    layer: int
    #: The segment covers logical positions ``[start, end)``; ``end`` tokens are processed.
    start: int
    end: int
    #: Whether this segment ended with an eviction in this layer.
    evicted: bool
    #: Logical position of every slot before eviction, in slot order: ``[m + L]`` int64.
    positions: torch.Tensor
    #: The segment's last query, after RoPE (and q-norm): ``[q_heads, head_dim]``.
    query: torch.Tensor
    #: Keys before eviction, after RoPE, in slot order: ``[kv_heads, m + L, head_dim]``.
    keys: torch.Tensor
    #: The policy's keep score of every slot in ``positions`` (for TOVA: the mean over
    #: query heads of the last query's softmax weights), ``[m + L]``; ``None`` when
    #: nothing was evicted.
    scores: Optional[torch.Tensor]
    #: Slot indices (into ``positions``) that survived, ascending; ``None`` when nothing
    #: was evicted.
    kept_slots: Optional[torch.Tensor]
    #: Logical positions held after this segment, in the new slot order.  Equals
    #: ``positions`` when nothing was evicted.
    kept_positions: torch.Tensor


@dataclass(frozen=True)
class SegmentRecord:
    """Bookkeeping for one processed segment, all layers together."""

    start: int
    end: int
    evicted: bool
    #: Tokens held per layer once the segment (and its eviction) is done.
    held: tuple[int, ...]


@dataclass
class ReferenceOutput:
    #: Generated token ids (the eos token included when generation stopped on it).
    token_ids: list[int]
    #: Log-probability (fp32 log-softmax of the logits) of each generated token.
    logprobs: list[float]
    prompt_len: int
    #: Every segment in processing order: the prompt's segments, then one per
    #: generated token that was fed back (the last generated token is never processed).
    segments: list[SegmentRecord] = field(default_factory=list)
    #: Per layer, the logical positions held at the end, in slot order.
    positions: list[torch.Tensor] = field(default_factory=list)


class _LayerCache:
    """Keys, values, logical positions and (H2O) accumulated attention of one layer, in
    cache-position order."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.keys = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.positions = torch.empty(0, dtype=torch.long, device=device)
        self.accumulated = torch.empty(0, dtype=torch.float32, device=device)

    def compact(self, keys, values, positions, accumulated, kept: torch.Tensor,
                cache_size: int) -> None:
        """Hold the ``kept`` cache positions of the given (pre-eviction) tensors, packed
        in compaction order.  Fresh tensors, so the ones handed to ``trace`` stay intact."""
        src, dst = compaction_moves(kept, cache_size)
        self.keys = keys[:, :cache_size].clone()
        self.values = values[:, :cache_size].clone()
        self.positions = positions[:cache_size].clone()
        self.accumulated = accumulated[:cache_size].clone()
        self.keys[:, dst] = keys[:, src]
        self.values[:, dst] = values[:, src]
        self.positions[dst] = positions[src]
        self.accumulated[dst] = accumulated[src]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[heads, L, head_dim]``; ``cos``/``sin``: ``[L, head_dim]``."""
    return x * cos + _rotate_half(x) * sin


def _attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_old: int, scale: float
) -> torch.Tensor:
    """Attention of the segment's L queries over all slots, causal among the new ones.

    ``query``: ``[q_heads, L, d]``; ``keys``/``values``: ``[kv_heads, num_old + L, d]``.
    Mirrors Hugging Face's eager attention (matmul in the model dtype, fp32 softmax) so
    that an eviction-free run matches ``model.generate`` token for token.
    """
    q_heads, num_new, _ = query.shape
    group = q_heads // keys.shape[0]
    # Query head h reads KV head h // group, as in transformers' repeat_kv.
    keys = keys.repeat_interleave(group, dim=0)
    values = values.repeat_interleave(group, dim=0)
    logits = torch.matmul(query, keys.transpose(1, 2)) * scale
    slot = torch.arange(keys.shape[1], device=query.device)
    last_visible = num_old + torch.arange(num_new, device=query.device)
    future = slot.view(1, -1) > last_visible.view(-1, 1)
    logits = logits.masked_fill(future, float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values)


def _check_supported(model) -> None:
    layers = model.model.layers
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", getattr(model.config, "sliding_window", None))
        if window is not None:
            raise ValueError(
                f"layer {index} uses sliding-window attention (window {window}); TOVA's "
                "reference supports full-attention models only"
            )


class _Runner:
    """The model's forward pass, one segment at a time, over per-layer TOVA caches."""

    def __init__(self, model, cache_size: int, policy: EvictionPolicy,
                 trace: Optional[Callable[[LayerTrace], None]]):
        _check_supported(model)
        self.model = model
        self.cache_size = cache_size
        self.policy = policy
        self.trace = trace
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.caches = []
        for layer in model.model.layers:
            attn = layer.self_attn
            head_dim = attn.head_dim
            kv_heads = attn.k_proj.out_features // head_dim
            self.caches.append(_LayerCache(kv_heads, head_dim, self.dtype, self.device))

    def segment(
        self, token_ids: torch.Tensor, start: int, evicts: bool, all_logits: bool = False
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Process the tokens at positions ``[start, start + len(token_ids))``.

        Returns the fp32 logits of the segment's last token (of every token: ``[L, vocab]``,
        with ``all_logits``) and the per-layer held counts.
        """
        inner = self.model.model
        end = start + token_ids.numel()
        new_positions = torch.arange(start, end, device=self.device)
        hidden = inner.embed_tokens(token_ids).unsqueeze(0)  # [1, L, hidden]
        # cos/sin at the true logical positions: positions are never re-indexed after
        # eviction, so the rotary phase of a cached key stays the one it was written with.
        cos, sin = inner.rotary_emb(hidden, new_positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]

        for index, layer in enumerate(inner.layers):
            x = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(index, layer, x, (cos, sin), start, evicts)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        if all_logits:
            logits = self.model.lm_head(inner.norm(hidden))[0].float()
        else:
            logits = self.model.lm_head(inner.norm(hidden[:, -1:]))[0, -1].float()
        return logits, tuple(cache.positions.numel() for cache in self.caches)

    def _attention(self, index: int, layer, x: torch.Tensor, rope, start: int, evicts: bool):
        """One layer's attention over its cache plus the segment, then its eviction."""
        attn = layer.self_attn
        cache = self.caches[index]
        num_new = x.shape[1]
        end = start + num_new
        scale = getattr(attn, "scaling", attn.head_dim**-0.5)
        q, k, v = _project(attn, x, rope)

        num_old = cache.positions.numel()
        keys = torch.cat((cache.keys, k), dim=1)
        values = torch.cat((cache.values, v), dim=1)
        positions = torch.cat((cache.positions, torch.arange(start, end, device=self.device)))
        out = _attend(q, keys, values, num_old, scale)  # [q_heads, L, d]
        out = attn.o_proj(out.transpose(0, 1).reshape(1, num_new, -1))

        # Newly written slots start from zero accumulated attention.
        accumulated = torch.cat((cache.accumulated, cache.accumulated.new_zeros(num_new)))
        if self.policy.needs_accumulated:
            accumulated = accumulated + _accumulated_increment(q, keys, num_old, scale)
        scores = kept = None
        if evicts:
            scores = self._keep_scores(q, keys, scale, positions, accumulated, end)
            kept = positions_to_keep(scores, self.cache_size)
            cache.compact(keys, values, positions, accumulated, kept, self.cache_size)
        else:
            cache.keys, cache.values, cache.positions = keys, values, positions
            cache.accumulated = accumulated

        if self.trace is not None:
            self.trace(LayerTrace(
                layer=index, start=start, end=end, evicted=evicts, positions=positions,
                query=q[:, -1], keys=keys, scores=scores, kept_slots=kept,
                kept_positions=cache.positions,
            ))
        return out

    def _keep_scores(self, q, keys, scale, positions, accumulated, end) -> torch.Tensor:
        """The policy's keep score of every cache position; the last query is at ``end - 1``."""
        last_probs = None
        if self.policy.needs_last_query_probs:
            head_sum = head_summed_probs(q[:, -1].unsqueeze(0), keys.unsqueeze(0), scale)
            last_probs = head_mean(head_sum, total_q_heads=q.shape[0])
        return self.policy.keep_scores(
            cache_size=torch.tensor([self.cache_size]),
            query_position=torch.tensor([end - 1]),
            positions=positions.unsqueeze(0),
            last_query_probs=last_probs,
            accumulated=accumulated.unsqueeze(0),
        )[0]


def _project(attn, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[q_heads, L, d]``, k and v ``[kv_heads, L, d]`` of the segment, RoPE applied."""
    cos, sin = rope
    num_new, head_dim = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(num_new, -1, head_dim)
    k = attn.k_proj(x).view(num_new, -1, head_dim)
    v = attn.v_proj(x).view(num_new, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    return (_apply_rope(q.transpose(0, 1), cos, sin), _apply_rope(k.transpose(0, 1), cos, sin),
            v.transpose(0, 1))


def _accumulated_increment(query: torch.Tensor, keys: torch.Tensor, num_old: int,
                           scale: float) -> torch.Tensor:
    """H2O: the segment's queries' softmax weights (causal), mean over query heads, summed
    over the queries: fp32 ``[num_old + L]``."""
    q_heads, num_new, head_dim = query.shape
    kv_heads, num_slots, _ = keys.shape
    q = query.float().reshape(1, kv_heads, q_heads // kv_heads, num_new, head_dim)
    logits = torch.einsum("rkgld,rksd->rkgls", q, keys.float().unsqueeze(0)) * scale
    slot = torch.arange(num_slots, device=query.device)
    visible = slot.view(1, -1) <= (num_old + torch.arange(num_new, device=query.device)).view(-1, 1)
    return head_mean(accumulated_from_logits(logits, visible.unsqueeze(0))[0], q_heads)


def _check_args(cache_size, prompt_mode, prompt_chunk, policy) -> EvictionPolicy:
    if not isinstance(cache_size, int) or cache_size < 1:
        raise ValueError(f"cache_size must be an int >= 1, got {cache_size!r}")
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    if not isinstance(prompt_chunk, int) or prompt_chunk < 1:
        raise ValueError(f"prompt_chunk must be an int >= 1, got {prompt_chunk!r}")
    if isinstance(policy, str):
        policy = EvictionPolicy(policy)
    if not isinstance(policy, EvictionPolicy):
        raise ValueError(f"policy must be a name or an EvictionPolicy, got {policy!r}")
    policy.check_budget(cache_size)
    return policy


def _as_token_list(input_ids: Union[Sequence[int], torch.Tensor]) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            shape = tuple(input_ids.shape)
            raise ValueError(f"input_ids must be 1-D (batch size 1), got shape {shape}")
        return [int(t) for t in input_ids.tolist()]
    ids = list(input_ids)
    if any(not isinstance(t, int) for t in ids):
        raise ValueError("input_ids must be a flat sequence of int token ids (batch size 1)")
    return ids


@torch.no_grad()
def generate(
    model,
    input_ids: Union[Sequence[int], torch.Tensor],
    *,
    cache_size: int,
    max_new_tokens: int,
    prompt_mode: str = "prompt",
    prompt_chunk: int = 512,
    eos_token_id: Optional[int] = None,
    trace: Optional[Callable[[LayerTrace], None]] = None,
    policy: Union[str, EvictionPolicy] = "tova",
) -> ReferenceOutput:
    """Greedy generation with a cache of ``cache_size`` tokens per layer.

    Args:
        model: a Hugging Face Llama-family causal LM (``LlamaForCausalLM``,
            ``MistralForCausalLM``, ``Qwen2ForCausalLM``, Qwen3-style models) with full
            attention.  Runs in the model's dtype and on its device.
        input_ids: the prompt, a 1-D list or tensor of token ids (batch size 1).
        cache_size: C, the most tokens any layer holds after a step.
        max_new_tokens: how many tokens to generate at most.
        prompt_mode: ``"prompt"`` (the paper: full attention over the whole prompt, one
            selection from its last token) or ``"chunked"`` (also evict after every
            ``prompt_chunk`` prompt tokens; a chunk of 1 is the token-by-token rule).
        prompt_chunk: K, the eviction period within the prompt in ``chunked`` mode.
        eos_token_id: stop after generating this token (it is included in the output).
        trace: called with a :class:`LayerTrace` for every layer of every segment, right
            after that layer's attention and eviction.
        policy: which tokens survive: a name in ``policies.POLICY_NAMES`` (default
            ``"tova"``), or an :class:`~tova_vllm.policies.EvictionPolicy` (to set sinks /
            H2O's recent window).

    Returns:
        A :class:`ReferenceOutput`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    policy = _check_args(cache_size, prompt_mode, prompt_chunk, policy)
    prompt = _as_token_list(input_ids)
    if not prompt:
        raise ValueError("input_ids must hold at least one token")

    runner = _Runner(model, cache_size, policy, trace)
    schedule = EvictionSchedule(
        cache_size,
        prompt_len=len(prompt),
        prompt_chunk=prompt_chunk if prompt_mode == "chunked" else None,
    )
    tokens = torch.tensor(prompt, dtype=torch.long, device=runner.device)
    out = ReferenceOutput(token_ids=[], logprobs=[], prompt_len=len(prompt))

    def run(start: int, num_new: int, ids: torch.Tensor) -> torch.Tensor:
        logits = None
        for seg_start, seg_end, evicts in schedule.segments(start, num_new):
            chunk = ids[seg_start - start : seg_end - start]
            logits, held = runner.segment(chunk, seg_start, evicts)
            out.segments.append(SegmentRecord(seg_start, seg_end, evicts, held))
        return logits

    logits = run(0, len(prompt), tokens)
    position = len(prompt)
    while len(out.token_ids) < max_new_tokens:
        next_id = int(torch.argmax(logits))
        out.token_ids.append(next_id)
        out.logprobs.append(float(torch.log_softmax(logits, dim=-1)[next_id]))
        if next_id == eos_token_id or len(out.token_ids) == max_new_tokens:
            break
        logits = run(position, 1, torch.tensor([next_id], device=runner.device))
        position += 1

    out.positions = [cache.positions for cache in runner.caches]
    return out


@torch.no_grad()
def teacher_forced_logprobs(
    model,
    input_ids: Union[Sequence[int], torch.Tensor],
    *,
    cache_size: int,
    policy: Union[str, EvictionPolicy] = "tova",
    prompt_chunk: int = 1,
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Log-probability of every token given the ones before it, under a bounded cache.

    The text streams through the model as a ``chunked``-mode prompt: every
    ``prompt_chunk`` tokens (1, the default, is the decode rule applied to every token:
    the paper's language-modelling setting) each layer evicts down to ``cache_size``.
    Returns fp32 ``[len(input_ids) - 1]``: entry i is ``log p(token i+1 | tokens <= i)``.
    ``progress`` is called with the number of tokens processed after every segment.
    """
    policy = _check_args(cache_size, "chunked", prompt_chunk, policy)
    ids = _as_token_list(input_ids)
    if len(ids) < 2:
        raise ValueError("input_ids must hold at least two tokens")
    runner = _Runner(model, cache_size, policy, None)
    schedule = EvictionSchedule(cache_size, prompt_len=len(ids), prompt_chunk=prompt_chunk)
    tokens = torch.tensor(ids, dtype=torch.long, device=runner.device)
    logprobs = []
    for seg_start, seg_end, evicts in _coalesced(schedule.segments(0, len(ids))):
        logits, _ = runner.segment(tokens[seg_start:seg_end], seg_start, evicts, all_logits=True)
        logprobs.append(torch.log_softmax(logits, dim=-1))
        if progress is not None:
            progress(seg_end)
    logprobs = torch.cat(logprobs)[:-1]
    return logprobs.gather(1, tokens[1:].unsqueeze(1))[:, 0].cpu()


def _coalesced(segments):
    """Merge runs of segments that end without eviction into the next one: attention is
    causal, so processing them together gives the same result, in fewer forward passes."""
    pending = None
    for seg_start, seg_end, evicts in segments:
        start = seg_start if pending is None else pending
        if evicts:
            yield start, seg_end, True
            pending = None
        else:
            pending = start
            last_end = seg_end
    if pending is not None:
        yield pending, last_end, False
