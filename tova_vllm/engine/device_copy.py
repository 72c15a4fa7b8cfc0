"""Host-to-device copies of TOVA's per-step plan tensors (no vLLM import).

The step plan is made on the host; its tensors go to the device once per step and are
shared by every layer.  Copies must not make the host wait for the device, or the CPU stops
running ahead of the GPU (vLLM keeps its own host buffers pinned for the same reason).
"""

from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host plan tensor on ``device`` without making the host wait for the device: a
    copy from pageable memory can synchronise with the stream, one from pinned memory does
    not (PyTorch's pinned allocator keeps the staging block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
