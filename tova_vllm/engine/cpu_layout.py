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
from typing import Optional

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

    key_order: torch.Tensor
    """Flat offsets inside a K half page of token t, dim d, in (t, d) order: one gather
    with it puts a copied block's K in row order, whatever the layout."""
    key_tiles: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None
    """For an ``"other"`` layout that is tiles of tokens x dims (AMX packs K so): a K half
    page viewed with shape ``[0]`` and permuted by ``[1]`` is ``[bs // T, T, D // P, P]``
    in (token, dim) order, so reshaping it gives rows without an element-wise gather."""
    #: V stored ``[bs, D]`` in row order after K's half (the ``vec`` ISAs): decode
    #: attention can then read it in place (``native.decode_attention``).
    value_rows: bool = False


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


def _key_tiles(flat: torch.Tensor) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``flat[t, d]``: offset of K token t, dim d.  Looks for token tiles T and dim groups P
    such that the offset is affine in (t // T, t % T, d // P, d % P) with the four axes
    stored one inside another (a permutation of a row-major array)."""
    block_size, head_size = flat.shape
    t, d = torch.arange(block_size).view(-1, 1), torch.arange(head_size).view(1, -1)
    for tile in (16, 32, 8, block_size):
        for group in (2, 4, 1):
            if block_size % tile or head_size % group:
                continue
            sizes = (block_size // tile, tile, head_size // group, group)
            origin = int(flat[0, 0])
            strides = (int(flat[tile % block_size, 0]) - origin if tile < block_size else 0,
                       int(flat[1 % block_size, 0]) - origin if tile > 1 else 0,
                       int(flat[0, group % head_size]) - origin if group < head_size else 0,
                       int(flat[0, 1 % head_size]) - origin if group > 1 else 0)
            if origin != 0 or min(strides) < 0:
                continue
            axes = sorted(range(4), key=lambda a: -strides[a])
            inner, ok = 1, True
            for a in reversed(axes):  # innermost first: each stride = product of inner sizes
                if sizes[a] > 1 and strides[a] != inner:
                    ok = False
                inner *= sizes[a]
            want = ((t // tile) * strides[0] + (t % tile) * strides[1]
                    + (d // group) * strides[2] + (d % group) * strides[3])
            if ok and torch.equal(flat, want):
                storage = tuple(sizes[a] for a in axes)
                return storage, tuple(axes.index(a) for a in range(4))
    return None


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
    flat = key.rows * head_size + key.cols
    kind = _key_kind(key)
    value_flat = (value.rows - block_size) * head_size + value.cols
    return PageLayout(key=key, value=value, key_kind=kind, key_order=flat.flatten(),
                      key_tiles=_key_tiles(flat) if kind == "other" else None,
                      value_rows=bool(torch.equal(value_flat.flatten(),
                                                  torch.arange(block_size * head_size))))
