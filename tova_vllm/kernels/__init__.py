"""TOVA's scoring, decode selection and compaction on vLLM's CUDA paged layout.

Two implementations with one API:

* :mod:`.torch_ref` -- plain torch: the oracle, and the path used off CUDA;
* :mod:`.triton_scoring` -- Triton kernels, used on CUDA.

:func:`select_backend` picks one for a device.  Importing this package does not import
Triton (only ``select_backend`` on CUDA, or an explicit ``backend="triton"``, does), so the
CPU path never needs it.

API of a :class:`KernelBackend`, what the engine calls (see :mod:`.torch_ref` for the full
contract; ``decode_drop_slot`` and ``keep_slots`` are module functions of both, for tests):

* ``paged_tova_scores(query_last, key_cache, block_table, live, scale, lse=None, *,
  max_live=None, total_q_heads=None, out=None) -> [rows, S] fp32`` (padding columns +inf);
* ``decode_drop_slot(scores, live) -> [rows] int64`` (lowest score, ties -> highest slot);
* ``keep_slots(scores, live, keep) -> [rows, keep] int64`` (top-C for prompt evictions;
  a torch sort in both backends);
* ``compact_paged(key_cache, value_cache, block_table, src_pos, dst_pos, row)`` (in place);
* ``decode_moves(drop, live, evict=None) -> (src_pos, dst_pos, row)`` for the decode move;
* ``decode_evict(scores, live, key_cache, value_cache, block_table, evict=None) -> [rows]
  int64``: argmin + the decode move (last live position into the dropped slot) in one
  call (one fused kernel on Triton); -1 for rows that do not evict.

A decode step on CUDA is then ``paged_tova_scores`` (with the attention kernel's ``lse``)
followed by ``decode_evict``: two launches, no host synchronisation, capturable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

__all__ = ["KernelBackend", "select_backend"]


@dataclass(frozen=True)
class KernelBackend:
    name: str  # "torch" or "triton"
    paged_tova_scores: Callable[..., torch.Tensor]
    compact_paged: Callable[..., None]
    decode_moves: Callable[..., tuple]
    decode_evict: Callable[..., torch.Tensor]


def _torch_backend() -> KernelBackend:
    from . import torch_ref as m

    return KernelBackend("torch", m.paged_tova_scores, m.compact_paged, m.decode_moves,
                         m.decode_evict)


def _triton_backend() -> KernelBackend:
    from . import triton_scoring as m

    return KernelBackend("triton", m.paged_tova_scores, m.compact_paged, m.decode_moves,
                         m.decode_evict)


def select_backend(
    device: Union[str, torch.device, None] = None, backend: Optional[str] = None
) -> KernelBackend:
    """The kernels for ``device``: Triton on CUDA, torch elsewhere.

    ``backend`` ("torch" or "triton") forces a choice, e.g. the oracle on CUDA, or the
    Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if backend is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        backend = "triton" if dev.type == "cuda" else "torch"
    if backend == "torch":
        return _torch_backend()
    if backend == "triton":
        return _triton_backend()
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'torch' or 'triton')")
