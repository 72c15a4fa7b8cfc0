"""The in-place K reader for CPU scoring (``csrc/key_logits.c``), built on first use.

The torch scorer copies K blocks before multiplying them; at real layer shapes that copy
is most of an eviction's cost.  This small C file reads K where vLLM's pages hold it.  It
has no torch or Python headers, so ``gcc`` builds it in about a second, for this machine's
CPU (``-march=native``), into ``$XDG_CACHE_HOME/tova-vllm/native`` under a name that hashes
the source, the compiler and the CPU flags (a home directory shared between machines gets
one library per CPU).  Without a compiler, or with ``TOVA_VLLM_NATIVE=0``, the torch path
runs instead (one warning line says so); both give the same logits up to float rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .cpu_layout import PageLayout

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "key_logits.c"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tova-vllm" / "native"


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built library, or None (disabled, or no working compiler: warned once)."""
    if os.environ.get("TOVA_VLLM_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("tova-vllm: no C compiler found; CPU scoring copies K (slower). "
                       "Install gcc to read K in place.")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        source = SOURCE.read_bytes()
        key = hashlib.sha256(source + version.encode() + _cpu_flags().encode()
                             + platform.machine().encode()).hexdigest()[:16]
        target = _cache_dir() / f"key_logits-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside the target and renamed: concurrent workers never load a half file.
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                command = [compiler, "-O3", "-march=native", "-shared", "-fPIC", str(SOURCE),
                           "-o", str(built)]
                try:
                    subprocess.run(command + ["-fopenmp"], check=True, capture_output=True,
                                   text=True, timeout=300)
                except subprocess.CalledProcessError:
                    # A compiler without OpenMP (clang without libomp): one thread.
                    subprocess.run(command, check=True, capture_output=True, text=True,
                                   timeout=300)
                os.replace(built, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("tova-vllm: building %s failed (%s); CPU scoring copies K (slower)",
                       SOURCE.name, str(detail).strip()[:500])
        return None
    fn = lib.tova_key_logits
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn = lib.tova_copy_slots
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    fn = lib.tova_scatter_i32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64]
    fn = lib.tova_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64]
    lib.tova_vector_floats.restype = ctypes.c_int
    lib.tova_vector_floats.argtypes = []
    fn = lib.tova_decode_drop
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    fn = lib.tova_position_drop
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p]
    return lib


def key_tiling(layout: PageLayout, block_size: int, head_size: int
               ) -> Optional[tuple[int, int]]:
    """(T, P) when the K half page is ``[bs / T][D / P][T][P]``, else None."""
    if layout.key_kind == "transposed":
        return block_size, 1
    if layout.key_kind == "rows":
        return 1, head_size
    if layout.key_tiles is not None and layout.key_tiles[1] == (0, 2, 1, 3):
        _, _, tile, group = layout.key_tiles[0]
        return tile, group
    return None


#: ``_checked``'s answers by the ids of a list's tensors, each with weak references that
#: prove the ids still name those tensors (no strong reference: an old engine's KV cache
#: must be freed with it).  A step's layer batch hands the same layers' tensors every
#: step: checking them and building the pointer array once saves tens of microseconds
#: per call, which a small model's step notices.  (Tensors whose storage is swapped in
#: place, ``set_``, would keep a stale pointer; vLLM's caches and the side state never are.)
_CHECKED: dict[tuple[int, ...], tuple[tuple, bool, Any]] = {}


def _checked(tensors: list[torch.Tensor]) -> tuple[bool, Any]:
    """Whether every tensor is a contiguous CPU tensor of the first one's dtype and shape,
    and the ``void *`` array of their data pointers."""
    key = tuple(map(id, tensors))
    known = _CHECKED.get(key)
    if known is None or not all(ref() is t for ref, t in zip(known[0], tensors)):
        first = tensors[0]
        readable = all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == first.dtype
                       and t.shape == first.shape for t in tensors)
        pointers = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
        if len(_CHECKED) >= 64:
            _CHECKED.clear()
        known = _CHECKED[key] = (tuple(map(weakref.ref, tensors)), readable, pointers)
    return known[1], known[2]


def key_logits(pages, layout: PageLayout, block_table: torch.Tensor, query: torch.Tensor,
               scale: float, live: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """fp32 ``q.k * scale`` of one query per row over the row's blocks, read in place:
    ``[E, kv_heads, group, per_row * bs]``; positions at or past ``live[e]`` are -inf
    (without ``live``, whatever the blocks hold there).  None when this path cannot run
    (no library, a layout it does not know, a dtype it does not read): the caller uses
    the torch path.

    ``pages`` ``[num_blocks, kv_heads, 2 * bs, D]``, or a list of L such (layers with the
    same block table: then ``query`` is ``[L, E, q_heads, D]`` and the result gains a
    leading L); ``block_table`` ``[E, per_row]`` of block ids (the C code checks
    them below ``num_blocks`` before reading: IndexError); ``query`` ``[E, q_heads, D]``; ``out`` an
    optional buffer.
    """
    layers = list(pages) if isinstance(pages, (list, tuple)) else [pages]
    lib = library()
    first = layers[0]
    block_size, head_size = first.shape[2] // 2, first.shape[3]
    tiling = None if lib is None else key_tiling(layout, block_size, head_size)
    if tiling is None or first.dtype not in _DTYPES:
        return None
    readable, pointers = _checked(layers)
    if not readable:
        return None
    rows, per_row = block_table.shape
    kv_heads = first.shape[1]
    group = query.shape[-2] // kv_heads
    table = block_table.to(torch.int32).contiguous()
    q = query.to(torch.float32).contiguous()
    lengths = None if live is None else live.to(torch.int32).contiguous()
    shape = (rows, kv_heads, group, per_row * block_size)
    if isinstance(pages, (list, tuple)):
        shape = (len(layers),) + shape
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    if rows == 0:
        return out
    status = lib.tova_key_logits(
        pointers, len(layers), _DTYPES[first.dtype], first[0].numel(), kv_heads,
        block_size, head_size, tiling[0], tiling[1], table.data_ptr(), rows, per_row,
        q.data_ptr(), group, float(scale), None if lengths is None else lengths.data_ptr(),
        out.data_ptr(), torch.get_num_threads(), first.shape[0])
    if status == -2:
        raise IndexError(f"tova-vllm: block table holds ids outside 0..{first.shape[0] - 1}")
    if status != 0:
        raise RuntimeError(f"tova-vllm: {SOURCE.name} rejected tiling {tiling} for "
                           f"{first.dtype} pages")
    return out


def attends(layout: PageLayout, pages: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` runs on these pages: the library is there and the
    layout is the vec ISAs' (K transposed, V in rows), with block and head sizes that are
    multiples of 16."""
    _, _, two_bs, head_size = pages.shape
    return (library() is not None and layout.key_kind == "transposed" and layout.value_rows
            and two_bs % 32 == 0 and head_size % 16 == 0 and pages.dtype in _DTYPES
            and pages.device.type == "cpu" and pages.is_contiguous())


def _exact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


@dataclass
class RowEvictions:
    """The decode eviction :func:`decode_attention` does right after a layer's attention,
    while its pages are in cache: each row with ``evicts[e]`` (int32 ``[E]``, nonzero: at
    its budget, one drop) sums its kv heads' scores in head order, divides by
    ``total_q_heads`` (TOVA's mean over every query head of the layer), drops the lowest
    (``policies.position_to_drop``'s rule) and moves its last live position into it.
    ``src``/``dst``: int64 ``[E]`` filled with the slots moved (both -1 for other rows;
    equal when the newest token is dropped).

    Rows under a position rule (``PolicyUnit.position_rule``) give ``positions``, the
    layer's side-state positions (int32, an entry for every slot of the pages), with
    ``protect`` (int64 ``[E]``, each row's rule) and the step's new tokens
    (``new_slots``/``new_positions``, int64, written first): they drop by
    :func:`position_drops`' key instead of the scores, and the side state's position
    moves with the K and V."""

    evicts: torch.Tensor
    total_q_heads: int
    src: torch.Tensor
    dst: torch.Tensor
    positions: Optional[torch.Tensor] = None
    protect: Optional[torch.Tensor] = None
    new_slots: Optional[torch.Tensor] = None
    new_positions: Optional[torch.Tensor] = None


def decode_attention(pages: torch.Tensor, layout: PageLayout, block_table: torch.Tensor,
                     query: torch.Tensor, scale: float, live: torch.Tensor,
                     out: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor,
                     evictions: Optional[RowEvictions] = None) -> bool:
    """Decode attention of one query per row (``query`` ``[E, q_heads, D]``) over its
    first ``live[e]`` cache positions (``block_table`` ``[E, per_row]``) into ``out``
    (``[E, q_heads, D]`` or ``[E, q_heads * D]``, any float dtype), and the softmax weights
    it used, summed over each kv head's query heads, into ``scores`` (fp32 ``[E, kv_heads,
    per_row * bs]``, 0 past ``live``), reading K and V once; then ``evictions``, if any.
    ``logits``: fp32 scratch of at least ``E * q_heads * per_row * bs`` elements.  Callers
    ask :func:`attends` first (once per cache): this runs once per layer and step, so it
    checks shapes only."""
    num_blocks, kv_heads, two_bs, head_size = pages.shape
    block_size = two_bs // 2
    rows, per_row = block_table.shape
    q_heads = query.shape[1]
    width = per_row * block_size
    if (scores.shape != (rows, kv_heads, width) or scores.dtype != torch.float32
            or not scores.is_contiguous() or live.shape != (rows,)
            or logits.dtype != torch.float32 or logits.numel() < rows * q_heads * width
            or out.shape[0] != rows or out.numel() != rows * q_heads * head_size
            or query.shape != (rows, q_heads, head_size)):
        raise ValueError("tova-vllm: decode_attention got mismatched shapes")
    ev = evictions
    if ev is not None and not (
            ev.evicts.shape == (rows,) and ev.evicts.dtype == torch.int32
            and ev.evicts.is_contiguous() and ev.total_q_heads >= q_heads
            and all(t.shape == (rows,) and t.dtype == torch.int64 and t.is_contiguous()
                    for t in (ev.src, ev.dst))):
        raise ValueError("tova-vllm: decode_attention got mismatched evictions")
    by_position = ev is not None and ev.positions is not None
    if by_position and not (
            ev.positions.dtype == torch.int32 and ev.positions.is_contiguous()
            and ev.protect.shape == (rows,) and ev.protect.dtype == torch.int64
            and ev.protect.is_contiguous()
            and all(t.dim() == 1 and t.dtype == torch.int64 and t.is_contiguous()
                    and t.numel() == ev.new_slots.numel()
                    for t in (ev.new_slots, ev.new_positions))):
        raise ValueError("tova-vllm: decode_attention got mismatched position evictions")
    if rows == 0:
        return True
    direct = out.dtype == torch.float32 and out.is_contiguous()
    result = out if direct else torch.empty(out.shape, dtype=torch.float32)
    table = _exact(block_table, torch.int32)
    q = _exact(query, torch.float32)
    lengths = _exact(live, torch.int32)
    status = library().tova_decode_attention(
        pages.data_ptr(), _DTYPES[pages.dtype], kv_heads * two_bs * head_size, kv_heads,
        block_size, head_size, table.data_ptr(), rows, per_row, q.data_ptr(),
        q_heads // kv_heads, float(scale), lengths.data_ptr(), logits.data_ptr(),
        result.data_ptr(), scores.data_ptr(), torch.get_num_threads(), num_blocks,
        None if ev is None else ev.evicts.data_ptr(), 0 if ev is None else ev.total_q_heads,
        None if ev is None else ev.src.data_ptr(), None if ev is None else ev.dst.data_ptr(),
        ev.positions.data_ptr() if by_position else None,
        ev.positions.numel() if by_position else 0,
        ev.protect.data_ptr() if by_position else None,
        ev.new_slots.data_ptr() if by_position else None,
        ev.new_positions.data_ptr() if by_position else None,
        ev.new_slots.numel() if by_position else 0)
    if status == -2:
        raise IndexError(f"tova-vllm: block ids outside 0..{num_blocks - 1}, live lengths "
                         f"outside 1..{width}, or a side state short of the pages' slots "
                         "or the new ones")
    if status != 0:
        raise RuntimeError(f"tova-vllm: {SOURCE.name} cannot attend over these pages")
    if not direct:
        out.copy_(result.view(out.shape))
    return True


def copy_slots(pages, elements: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> bool:
    """``cpu_evictor.copy_slots`` without index tensors: False when the library is not
    there (the caller indexes instead).  ``pages`` one layer's pages with 1-D ``src`` and
    ``dst``, or a list of L layers with ``dst`` ``[L, n]`` and ``src`` ``[n]`` (shared)
    or ``[L, n]``.  Slots are checked (in C, before any write) to lie in the pages."""
    layers = list(pages) if isinstance(pages, (list, tuple)) else [pages]
    if library() is None:
        return False
    readable, pointers = _checked(layers)
    if not readable:
        return False
    src = src.to(torch.int64).contiguous()
    dst = dst.to(torch.int64).contiguous()
    n = dst.shape[-1]
    if n == 0:
        return True
    block_size = elements.shape[0]
    limit = layers[0].shape[0] * block_size
    elements = elements.to(torch.int64).contiguous()
    status = library().tova_copy_slots(
        pointers, len(layers), layers[0].element_size(), layers[0][0].numel(),
        block_size, elements.data_ptr(), elements.shape[1], src.data_ptr(),
        n if src.dim() == 2 else 0, dst.data_ptr(), n if dst.dim() == 2 else 0, n, limit)
    if status == -2:
        raise IndexError(f"tova-vllm: slots outside 0..{limit - 1}")
    if status != 0:
        raise RuntimeError(f"tova-vllm: cannot copy {layers[0].dtype} slots natively")
    return True


def decode_drops(scores: torch.Tensor, live: torch.Tensor, slots: torch.Tensor
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The decode rule of ``scores`` ``[L, E, S]`` (rows sharing ``live`` ``[E]`` and
    ``slots`` ``[E, S]`` across the L layers) as slots: ``(src [E], dst [L, E])``, each row's
    last live slot and its dropped one (``policies.position_to_drop``'s choice, tie-break
    and NaN included); None without the library."""
    lib = library()
    if lib is None or scores.dtype not in (torch.float32, torch.float64):
        return None
    layers, rows, width = scores.shape
    if tuple(slots.shape) != (rows, width) or tuple(live.shape) != (rows,):
        raise ValueError(f"tova-vllm: scores {tuple(scores.shape)}, live {tuple(live.shape)} "
                         f"and slots {tuple(slots.shape)} disagree")
    scores = scores.contiguous()
    live = live.to(torch.int32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    src = torch.empty(rows, dtype=torch.int64)
    dst = torch.empty(layers, rows, dtype=torch.int64)
    status = lib.tova_decode_drop(scores.data_ptr(), scores.dtype == torch.float64, layers,
                                  rows, width, live.data_ptr(), slots.data_ptr(),
                                  src.data_ptr(), dst.data_ptr())
    if status != 0:
        raise IndexError(f"tova-vllm: live lengths outside 1..{width}")
    return src, dst


def _int32_arrays(arrays: list[torch.Tensor]) -> tuple[Optional[ctypes.CDLL], Any]:
    """The library and the arrays' pointers, for calls over every layer's int32 side-state
    positions; ``(None, None)`` when the library is not there or cannot read them."""
    lib = library()
    if lib is None or arrays[0].dtype != torch.int32:
        return None, None
    readable, pointers = _checked(arrays)
    return (lib, pointers) if readable else (None, None)


def scatter_positions(arrays: list[torch.Tensor], slots: torch.Tensor,
                      positions: torch.Tensor) -> bool:
    """``array[slots] = positions`` for every int32 array (each layer's side-state
    positions) in one call; False when the library is not there (the caller indexes)."""
    lib, pointers = _int32_arrays(arrays)
    if lib is None:
        return False
    slots = slots.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    if lib.tova_scatter_i32(pointers, len(arrays), slots.data_ptr(), positions.data_ptr(),
                            slots.numel(), arrays[0].numel()) != 0:
        raise IndexError(f"tova-vllm: slots outside 0..{arrays[0].numel() - 1}")
    return True


def position_drops(arrays: list[torch.Tensor], live: torch.Tensor, slots: torch.Tensor,
                   protect: torch.Tensor, new_slots: torch.Tensor, new_positions: torch.Tensor
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Steady decode's choice and side-state moves for rows under position rules
    (``PolicyUnit.position_rule``), every layer at once, without scores: writes the new
    slots' positions into every int32 array (each layer's side-state positions), picks
    each row's drop in each layer as ``decode_drops`` would from the rule's keep scores
    (``positions + PROTECTED * (positions < protect[e])``) and moves the side state's
    positions.  Returns ``(src [E], dst [L, E])`` as ``decode_drops`` does, for the caller
    to move K and V; None without the library (nothing written)."""
    lib, pointers = _int32_arrays(arrays)
    if lib is None:
        return None
    rows, width = slots.shape
    if tuple(live.shape) != (rows,) or tuple(protect.shape) != (rows,):
        raise ValueError(f"tova-vllm: live {tuple(live.shape)}, protect "
                         f"{tuple(protect.shape)} and slots {tuple(slots.shape)} disagree")
    live = live.to(torch.int32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    protect = protect.to(torch.int64).contiguous()
    new_slots = new_slots.to(torch.int64).contiguous()
    new_positions = new_positions.to(torch.int64).contiguous()
    src = torch.empty(rows, dtype=torch.int64)
    dst = torch.empty(len(arrays), rows, dtype=torch.int64)
    size = arrays[0].numel()
    if lib.tova_position_drop(pointers, len(arrays), size, rows, width, live.data_ptr(),
                              slots.data_ptr(), protect.data_ptr(), new_slots.data_ptr(),
                              new_positions.data_ptr(), new_slots.numel(), src.data_ptr(),
                              dst.data_ptr()) != 0:
        raise IndexError(f"tova-vllm: live lengths outside 1..{width} or slots outside "
                         f"0..{size - 1}")
    return src, dst
