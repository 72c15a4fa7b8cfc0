"""The CUDA backend's eviction mechanism (``engine/paged_eviction.py``) on CPU tensors, with
the torch kernels, against a dense model of the same step (``paged_cases.py``).  The
Triton kernels run the same cases in ``test_kernels.py``."""

from __future__ import annotations

import pytest
import torch

from paged_cases import run_case

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prompt"])
@pytest.mark.parametrize("use_lse", [False, True], ids=["softmax", "lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_tova_rows(decode, use_lse, dtype, seed):
    run_case(backend="torch", decode=decode, policies=None, dtype=dtype, use_lse=use_lse,
             seed=seed)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prompt"])
@pytest.mark.parametrize("seed", range(3))
def test_mixed_policies_move_side_state(decode, seed):
    run_case(backend="torch", decode=decode,
             policies=["tova", "window", "sink_window", "h2o", "h2o", "window"], seed=seed)


@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", [(1, 1, 32, 16), (4, 2, 128, 32)])
def test_shapes(kv_heads, group, head_dim, block_size):
    for decode in (True, False):
        run_case(backend="torch", decode=decode, policies=None, kv_heads=kv_heads, group=group,
                 head_dim=head_dim, block_size=block_size, seed=7)
