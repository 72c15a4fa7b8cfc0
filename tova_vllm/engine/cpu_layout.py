"""Where vLLM's CPU cache-write op puts each K/V element inside a block.

vLLM 0.32's CPU attention stores a (block, kv-head) page as ``[2 * block_size, head_size]``
rows, K in the first half and V in the second, but the order *inside* each half depends on
the instruction set the kernel picked (``vec`` keeps K transposed, AMX pre-packs tiles,
...), and vLLM has no op to read a cache back.  Rather than hard-coding one ISA's layout,
we ask the write op itself: write coded values into a one-block scratch cache and see where
each (token, dim) lands.  Any layout that is a permutation of the elements (all of them
are) is then read and moved with plain tensor indexing, and a layout that is not a
permutation fails loudly here instead of silently corrupting the cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Every float dtype the cache can use stores small integers exactly; base-16 digits
# (stored as digit + 1 so that 0 means "not written") stay exact even in bf16.
_BASE = 16


@dataclass(frozen=True)
class HalfPageLayout:
    """Where token t, dim d of K (or V) sits in a page viewed as ``[2 * bs, D]``: tensors
    ``rows`` and ``cols`` of shape ``[bs, D]``."""

    rows: torch.Tensor
    cols: torch.Tensor


@dataclass(frozen=True)
class PageLayout:
    key: HalfPageLayout
    value: HalfPageLayout
    key_kind: str
    """``"transposed"`` (K stored ``[D, bs]`` per block, the ``vec`` ISA), ``"rows"``
    (``[bs, D]``), or ``"other"`` (e.g. AMX tiles): picks the scoring fast path."""


def _key_kind(key: HalfPageLayout) -> str:
    block_size, head_size = key.rows.shape
    flat = key.rows * head_size + key.cols
    tokens = torch.arange(block_size).view(-1, 1)
    dims = torch.arange(head_size).view(1, -1)
    if torch.equal(flat, dims * block_size + tokens):
        return "transposed"
    if torch.equal(flat, tokens * head_size + dims):
        return "rows"
    return "other"


def _digits_needed(n: int) -> int:
    digits = 1
    while _BASE**digits < n:
        digits += 1
    return digits


def _decode_half(passes: list[torch.Tensor], block_size: int, head_size: int, what: str,
                 isa: str, first_row: int) -> HalfPageLayout:
    """``passes[i]``: the half page (flat) after writing digit i of the element's code."""
    size = block_size * head_size
    code = torch.zeros(size, dtype=torch.long)
    for i, written in enumerate(passes):
        digit = written.float().round().long() - 1
        if (digit < 0).any() or (digit >= _BASE).any():
            raise RuntimeError(
                f"tova-vllm: the CPU KV layout for isa={isa!r} is not a plain permutation "
                f"of {what} elements (probe digit out of range); this layout is unsupported"
            )
        code += digit * _BASE**i
    # code[o] = t * head_size + d for the element stored at flat offset o.
    if not torch.equal(torch.sort(code).values, torch.arange(size)):
        raise RuntimeError(
            f"tova-vllm: the CPU KV layout for isa={isa!r} does not store each {what} "
            "element exactly once inside its block; this layout is unsupported"
        )
    offset_of = torch.empty(size, dtype=torch.long)
    offset_of[code] = torch.arange(size)
    offset_of = offset_of.view(block_size, head_size)
    return HalfPageLayout(rows=first_row + offset_of // head_size, cols=offset_of % head_size)


@functools.lru_cache(maxsize=None)
def probe_page_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> PageLayout:
    from vllm import _custom_ops as ops

    element_code = torch.arange(block_size * head_size).view(block_size, 1, head_size)
    passes: dict[str, list[torch.Tensor]] = {"key": [], "value": []}
    for i in range(_digits_needed(block_size * head_size)):
        digit = (element_code // _BASE**i) % _BASE + 1
        page = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
        key_half, value_half = page.chunk(2, dim=2)
        # K and V get different digits so a K element landing in the V half is caught.
        ops.cpu_attn_reshape_and_cache(
            digit.to(dtype), (_BASE - 1 - (digit - 1) + 1).to(dtype), key_half, value_half,
            torch.arange(block_size), isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )
        passes["key"].append(key_half.reshape(-1).clone())
        passes["value"].append((_BASE + 1 - value_half.reshape(-1).float()).clone())
    key = _decode_half(passes["key"], block_size, head_size, "K", isa, 0)
    value = _decode_half(passes["value"], block_size, head_size, "V", isa, block_size)
    return PageLayout(key=key, value=value, key_kind=_key_kind(key))


def gather(pages: torch.Tensor, half: HalfPageLayout, block_ids: torch.Tensor,
           block_offsets: torch.Tensor) -> torch.Tensor:
    """K (or V) of the cache positions given as ``[E, S]`` blocks and in-block offsets.

    ``pages`` is the layer cache viewed ``[num_blocks, kv_heads, 2 * bs, D]``; returns
    ``[E, kv_heads, S, D]``.
    """
    heads = torch.arange(pages.shape[1]).view(1, -1, 1, 1)
    rows = half.rows[block_offsets].unsqueeze(1)  # [E, 1, S, D]
    cols = half.cols[block_offsets].unsqueeze(1)
    return pages[block_ids[:, None, :, None], heads, rows, cols]


def copy_positions(pages: torch.Tensor, layout: PageLayout, src_block: torch.Tensor,
                   src_offset: torch.Tensor, dst_block: torch.Tensor,
                   dst_offset: torch.Tensor) -> None:
    """Copy K and V, all heads, of each source position onto its destination (1-D args).

    Sources and destinations must be disjoint sets (or equal pairs): all reads happen
    before any write.
    """
    heads = torch.arange(pages.shape[1]).view(1, -1, 1)
    src_block, dst_block = src_block.view(-1, 1, 1), dst_block.view(-1, 1, 1)
    for half in (layout.key, layout.value):
        dst = (dst_block, heads, half.rows[dst_offset].unsqueeze(1), half.cols[dst_offset].unsqueeze(1))
        src = (src_block, heads, half.rows[src_offset].unsqueeze(1), half.cols[src_offset].unsqueeze(1))
        pages[dst] = pages[src]


def last_query_logits(pages: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor,
                      block_offsets: torch.Tensor, query: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """fp32 ``q.k * scale`` for each row's cache positions: ``[E, kv_heads, group, S]``.

    ``block_ids``/``block_offsets``: ``[E, S]`` per cache position, positions laid out
    block after block (as ``EvictionBatch`` gives them).  For the plain layouts whole
    blocks are copied once and multiplied in place (a matmul against K or K^T); only an
    unusual layout pays for an element-wise gather.
    """
    from ..policies import gqa_logits

    kind = layout.key_kind
    if kind == "other":
        return gqa_logits(query, gather(pages, layout.key, block_ids, block_offsets), scale)
    rows, width = block_ids.shape
    num_blocks, kv_heads, double_bs, head_size = pages.shape
    block_size = double_bs // 2
    per_row = -(-width // block_size)
    first = block_ids[:, ::block_size][:, :per_row].reshape(-1)
    # Copy the K halves of the rows' blocks into a reused buffer: allocating a fresh
    # K-sized tensor per layer costs more (first-touch page faults) than the copy itself.
    raw = _scratch("blocks", (first.numel(), kv_heads, block_size, head_size), pages.dtype)
    torch.index_select(pages[:, :, :block_size, :], 0, first, out=raw)
    if raw.dtype != torch.float32:
        raw = _scratch("blocks_fp32", raw.shape, torch.float32).copy_(raw)
    q = query.float().view(rows, 1, kv_heads, -1, head_size)  # [E, 1, H, g, D]
    if kind == "transposed":
        k_t = raw.view(rows, per_row, kv_heads, head_size, block_size)
    else:
        k_t = raw.view(rows, per_row, kv_heads, block_size, head_size).transpose(-1, -2)
    logits = torch.matmul(q, k_t) * scale  # [E, n, H, g, bs]
    logits = logits.permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, -1, per_row * block_size)
    return logits[..., :width]


_SCRATCH: dict[str, torch.Tensor] = {}


def _scratch(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A buffer reused by every layer and step of this process (layers run one at a time);
    it grows to the largest eviction batch seen and is never shrunk."""
    numel = 1
    for n in shape:
        numel *= n
    buffer = _SCRATCH.get(name)
    # A buffer made under inference mode (the engine) cannot be written outside it.
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or stale or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        _SCRATCH[name] = buffer
    return buffer[:numel].view(shape)


def many_query_logits(pages: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor,
                      block_offsets: torch.Tensor, queries: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """fp32 logits of several queries per row: ``queries`` ``[E, L, q_heads, D]`` ->
    ``[E, kv_heads, group, L, S]``.

    The L queries ride along as extra query heads of their KV group, so the block copy and
    the matmul are the single-query ones.
    """
    rows, num_queries, q_heads, head_size = queries.shape
    kv_heads = pages.shape[1]
    group = q_heads // kv_heads
    folded = (queries.view(rows, num_queries, kv_heads, group, head_size)
              .permute(0, 2, 3, 1, 4).reshape(rows, kv_heads * group * num_queries, head_size))
    logits = last_query_logits(pages, layout, block_ids, block_offsets, folded, scale)
    return logits.view(rows, kv_heads, group, num_queries, -1)
