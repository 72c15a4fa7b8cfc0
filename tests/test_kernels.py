"""Triton kernels (``tova_vllm.kernels.triton_scoring``) against the torch oracle.

Without CUDA the kernels run through Triton's interpreter on CPU tensors.  Triton decides
interpreted-or-compiled when a ``@triton.jit`` function is *decorated* (it reads
``TRITON_INTERPRET`` then): our kernels when ``triton_scoring`` is imported, and Triton's
own jitted library (``tl.zeros``, ...) when ``triton`` itself is first imported.  So this
module sets ``TRITON_INTERPRET=1`` before importing either.  The variable is restored
right after and set again only while this module's tests run (the interpreter reads it at
run time too), so that it does not leak into modules collected later or into the engines
other tests spawn.  If triton was already imported without the interpreter (in a full
suite run, ``import vllm`` in an earlier test module does that), the kernel tests skip
here and ``test_kernels_in_subprocess`` re-runs this file in a fresh interpreter with
the variable set, and fails if that run fails.

Caches are random, with shuffled block tables whose unused entries hold stale ids of
other rows' blocks, and ragged live lengths (1, a block multiple, not a block multiple).
The grid covers dtype x GQA ratio fully and pairs (head_dim, block_size) with it so that
every pair of values of the four parameters occurs (the interpreter is slow); the scoring
tile (16/32/64: inside one block, one block, several blocks) and the log-sum-exp pass's
split count vary along it.  Tests that
need a real GPU (CUDA-graph capture, timing) skip cleanly without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tova_vllm.kernels import KernelBackend, select_backend
from tova_vllm.kernels import torch_ref as ref
from tova_vllm.policies import compaction_moves, head_summed_probs, position_to_drop, positions_to_keep

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
_CHILD_ENV = "TOVA_KERNEL_TESTS_CHILD"
_FORCE_SUBPROCESS_ENV = "TOVA_KERNEL_TESTS_FORCE_SUBPROCESS"  # to exercise that path


def _load_kernels():
    """The ``triton_scoring`` module, interpreted when there is no CUDA; None when this
    process cannot interpret it any more (see the module docstring)."""
    if CUDA:
        import tova_vllm.kernels.triton_scoring as mod

        return mod
    if os.environ.get(_FORCE_SUBPROCESS_ENV) == "1" and os.environ.get(_CHILD_ENV) != "1":
        return None
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl

        import tova_vllm.kernels.triton_scoring as mod
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    # triton's own jitted library (tl.zeros, tl.maximum, ...) is decorated when triton is
    # first imported; if that happened without the interpreter, the interpreter cannot
    # call it, whatever we do with our own kernels.
    stdlib_ok = type(tl.standard.zeros).__name__ == "InterpretedFunction"
    return mod if stdlib_ok and mod.is_interpreted() else None


T = _load_kernels()


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    """Keep ``TRITON_INTERPRET=1`` while this module's tests run: the interpreter also
    reads it at run time (e.g. when it first imports triton's gluon module)."""
    if CUDA or T is None:
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous
needs_kernels = pytest.mark.skipif(T is None, reason="Triton interpreter unavailable in-process; "
                                   "test_kernels_in_subprocess runs these tests")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Relative tolerance of scores by cache dtype.  Both sides compute in fp32 from the same
# stored values, so errors are far below these; bf16/fp16 leave room for GPU dot order.
RTOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
ATOL = 1e-7

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = [1, 4, 8]
HD_BS = [(64, 16), (128, 32), (64, 32), (128, 16)]
# dtype x GQA fully; each dtype and each GQA ratio sees both head dims and both block
# sizes, and all four (head_dim, block_size) pairs occur.  The tile size alternates
# between smaller than, equal to and spanning several blocks.
GRID = [
    pytest.param(dt, g, *HD_BS[(i + j) % 4], (16, 32, 64)[(i + 2 * j) % 3], 1 + (i + 2 * j) % 3,
                 id=f"{str(dt).split('.')[-1]}-gqa{g}-d{HD_BS[(i + j) % 4][0]}-bs{HD_BS[(i + j) % 4][1]}")
    for i, dt in enumerate(DTYPES)
    for j, g in enumerate(GQA)
]


# --------------------------------------------------------------------------- fixtures


def make_paged(
    live: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    extra_blocks: int = 3,
    max_blocks: int | None = None,
    combined: bool = False,
    seed: int = 0,
):
    """A random paged cache holding ``live[r]`` positions for each row.

    Returns ``(key_cache, value_cache, block_table)``.  Blocks are handed out in a random
    order; block-table entries past a row's blocks hold stale ids of other rows' blocks.
    ``combined``: K and V are views of one ``[num_blocks, 2, block_size, H, D]`` tensor
    (non-contiguous views, as some vLLM backends hand out).
    """
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in live]
    width = max_blocks or max(max(need), 1)
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.empty((len(live), width), dtype=torch.int32)
    used = 0
    for r, k in enumerate(need):
        table[r, :k] = perm[used:used + k].int()
        used += k
        table[r, k:] = perm[torch.randint(0, num_blocks, (width - k,), generator=g)].int()
    shape = (num_blocks, 2, block_size, kv_heads, head_dim) if combined else (2, num_blocks, block_size, kv_heads, head_dim)
    kv = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    if combined:
        k_cache, v_cache = kv[:, 0], kv[:, 1]
    else:
        k_cache, v_cache = kv[0], kv[1]
    return k_cache, v_cache, table.to(DEVICE)


def make_query(rows: int, q_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 1, spread: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn((rows, q_heads, head_dim), generator=g)).to(dtype).to(DEVICE)


def live_tensor(live: list[int]) -> torch.Tensor:
    return torch.tensor(live, dtype=torch.int32, device=DEVICE)


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, live: list[int], rtol: float):
    assert got.shape == want.shape and got.dtype == torch.float32
    for r, n in enumerate(live):
        assert torch.isinf(got[r, n:]).all() and (got[r, n:] > 0).all(), f"row {r}: padding not +inf"
        torch.testing.assert_close(got[r, :n], want[r, :n], rtol=rtol, atol=ATOL, msg=lambda m: f"row {r}: {m}")


def check_drop(got: torch.Tensor, scores_ref: torch.Tensor, live: list[int], rtol: float) -> int:
    """Kernel drop vs the oracle's; a difference is excused only on a detected near-tie.

    Near-tie: the oracle's two smallest live scores differ by less than the tolerance;
    then the kernel may pick either, provided its pick is itself within the tolerance of
    the oracle's minimum.  Returns how many rows were excused.
    """
    want = ref.decode_drop_slot(scores_ref, live_tensor(live))
    excused = 0
    for r, n in enumerate(live):
        g, w = int(got[r]), int(want[r])
        if g == w:
            continue
        row = scores_ref[r, :n].double()
        two = torch.topk(row, 2, largest=False).values
        lowest = float(two[0])
        tol = rtol * abs(lowest) + ATOL
        near_tie = float(two[1]) - lowest <= tol
        assert near_tie, f"row {r}: kernel drops {g}, oracle {w}, and the two lowest scores {two.tolist()} are no near-tie"
        assert 0 <= g < n and float(row[g]) - lowest <= tol, f"row {r}: kernel's pick {g} is not a near-minimum"
        excused += 1
    return excused


# --------------------------------------------------------------------------- oracle sanity (no Triton)


def test_oracle_matches_policy_scoring_on_dense_keys():
    """The paged oracle equals policies.head_summed_probs / q_heads on the same keys."""
    live = [1, 20, 33]
    kc, _, bt = make_paged(live, 16, 2, 64, torch.float32)
    q = make_query(3, 8, 64, torch.float32)
    got = ref.paged_tova_scores(q, kc, bt, live_tensor(live), 0.125)
    for r, n in enumerate(live):
        keys = torch.stack([kc[bt[r, p // 16], p % 16] for p in range(n)], dim=1)  # [H, n, D]
        want = head_summed_probs(q[r:r + 1], keys.unsqueeze(0), 0.125)[0] / 8
        torch.testing.assert_close(got[r, :n], want)
        assert torch.isinf(got[r, n:]).all()
        torch.testing.assert_close(got[r, :n].sum(), torch.tensor(1.0, device=DEVICE))


def test_oracle_lse_mode_and_divisor():
    live = [5, 40]
    kc, _, bt = make_paged(live, 16, 2, 64, torch.float32)
    q = make_query(2, 4, 64, torch.float32)
    lv = live_tensor(live)
    plain = ref.paged_tova_scores(q, kc, bt, lv, 0.2)
    keys = ref.gather_keys(kc, bt, lv, plain.shape[1])
    logits = torch.einsum("rkgd,rksd->rkgs", q.view(2, 2, 2, 64), keys) * 0.2
    pad = torch.arange(plain.shape[1], device=DEVICE) >= lv.view(-1, 1, 1, 1)
    lse = torch.logsumexp(logits.masked_fill(pad, float("-inf")), dim=-1).reshape(2, 4)
    torch.testing.assert_close(ref.paged_tova_scores(q, kc, bt, lv, 0.2, lse)[:, :5], plain[:, :5])
    summed = ref.paged_tova_scores(q, kc, bt, lv, 0.2, total_q_heads=1)
    torch.testing.assert_close(summed[1, :40], plain[1, :40] * 4)


def test_oracle_selection_rules_match_policies():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (6, 12), generator=g).float()  # many exact ties
    live = torch.tensor([12, 7, 1, 12, 5, 9])
    assert torch.equal(ref.decode_drop_slot(scores, live), position_to_drop(scores, live))
    kept = ref.keep_slots(scores, live, 4)
    for r in range(6):
        if int(live[r]) >= 4:
            assert torch.equal(kept[r], positions_to_keep(scores[r, : int(live[r])], 4))


def test_select_backend():
    assert select_backend("cpu").name == "torch"
    assert select_backend(torch.device("cpu")).name == "torch"
    assert select_backend("cpu", backend="torch").paged_tova_scores is ref.paged_tova_scores
    if CUDA:
        assert select_backend("cuda").name == "triton"
    with pytest.raises(ValueError):
        select_backend("cpu", backend="nope")
    assert isinstance(select_backend(), KernelBackend)


# --------------------------------------------------------------------------- scoring kernels


@needs_kernels
@pytest.mark.parametrize("dtype,gqa,head_dim,block_size,tile,splits", GRID)
def test_scores_and_drop_match_oracle(dtype, gqa, head_dim, block_size, tile, splits):
    kv_heads = 2
    live = [1, 2 * block_size, block_size + 5, 3]  # 1, block multiple, ragged
    kc, _, bt = make_paged(live, block_size, kv_heads, head_dim, dtype, max_blocks=3, seed=gqa)
    q = make_query(len(live), kv_heads * gqa, head_dim, dtype, seed=head_dim)
    lv = live_tensor(live)
    scale = head_dim ** -0.5
    want = ref.paged_tova_scores(q, kc, bt, lv, scale)
    rtol = RTOL[dtype]

    # two-pass mode: the kernel computes the log-sum-exp itself
    lse = T.paged_lse(q, kc, bt, lv, scale, tile_n=16, splits=splits)
    keys = ref.gather_keys(kc, bt, lv, want.shape[1]).float()
    logits = torch.einsum("rkgd,rksd->rkgs", q.float().view(len(live), kv_heads, gqa, head_dim), keys) * scale
    pad = torch.arange(want.shape[1], device=DEVICE) >= lv.view(-1, 1, 1, 1)
    want_lse = torch.logsumexp(logits.masked_fill(pad, float("-inf")), dim=-1).reshape(len(live), -1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    two_pass = T.paged_tova_scores(q, kc, bt, lv, scale, tile_n=tile)
    assert_scores_close(two_pass, want, live, rtol)

    # one-pass mode: lse handed in (as from the attention kernel)
    one_pass = T.paged_tova_scores(q, kc, bt, lv, scale, want_lse, tile_n=tile)
    assert_scores_close(one_pass, want, live, rtol)

    # decode argmin: exact on the oracle's own scores, near-ties excused on the kernel's
    assert torch.equal(T.decode_drop_slot(want, lv), ref.decode_drop_slot(want, lv))
    check_drop(T.decode_drop_slot(one_pass, lv), want, live, rtol)


@needs_kernels
def test_scores_larger_case_strided_cache_and_out_buffer():
    """More rows, longer rows, K a non-contiguous view, a preallocated ``out`` and max_live."""
    live = [130, 1, 77, 96, 64, 17]
    dtype = torch.float16
    kc, _, bt = make_paged(live, 16, 2, 64, dtype, combined=True, max_blocks=10, seed=7)
    assert not kc.is_contiguous()
    q = make_query(len(live), 8, 64, dtype, seed=5)
    lv = live_tensor(live)
    want = ref.paged_tova_scores(q, kc, bt, lv, 0.125, max_live=131)
    assert want.shape == (6, 131)
    out = torch.full((6, 131), -7.0, device=DEVICE)
    got = T.paged_tova_scores(q, kc, bt, lv, 0.125, max_live=131, out=out, tile_n=64)
    assert got is out
    assert_scores_close(got, want, live, RTOL[dtype])
    check_drop(T.decode_drop_slot(got, lv), want, live, RTOL[dtype])
    # TP-style divisor: local head sum over a global head count
    # ... with the lse from a split pass (chunks of 64: the short rows leave chunks empty)
    lse = T.paged_lse(q, kc, bt, lv, 0.125, max_live=131, tile_n=32, splits=3)
    tp = T.paged_tova_scores(q, kc, bt, lv, 0.125, lse, max_live=131, total_q_heads=16, tile_n=128)
    torch.testing.assert_close(tp[0, :130], want[0, :130] / 2, rtol=RTOL[dtype], atol=ATOL)


@needs_kernels
def test_near_tie_is_detected_and_excused():
    """Duplicated minimum keys: the oracle's scores tie exactly; either pick is accepted."""
    live = [40, 23]
    dtype = torch.bfloat16
    kc, _, bt = make_paged(live, 16, 2, 64, dtype, seed=11)
    q = make_query(2, 8, 64, dtype, seed=12)
    for r, (a, b) in enumerate([(3, 35), (0, 22)]):
        low = -q[r].float().view(2, 4, 64).mean(1)  # low logits for every head of the group
        for p in (a, b):
            kc[bt[r, p // 16], p % 16] = low.to(dtype)
    lv = live_tensor(live)
    want = ref.paged_tova_scores(q, kc, bt, lv, 0.125)
    oracle_drop = ref.decode_drop_slot(want, lv).cpu()
    pairs = torch.tensor([[3, 35], [0, 22]])
    # the duplicated keys are the minimum; their scores agree to rounding (the oracle's
    # matmul may sum them in different orders, so it need not pick the higher slot)
    assert all(int(oracle_drop[r]) in pairs[r].tolist() for r in range(2))
    torch.testing.assert_close(want[:, pairs[:, 0]].diagonal(), want[:, pairs[:, 1]].diagonal(), rtol=1e-6, atol=0)
    got = T.paged_tova_scores(q, kc, bt, lv, 0.125)
    assert_scores_close(got, want, live, RTOL[dtype])
    check_drop(T.decode_drop_slot(got, lv), want, live, RTOL[dtype])
    # the other member of each pair is detected as a near-tie and excused
    other = torch.where(pairs[:, 0] == oracle_drop, pairs[:, 1], pairs[:, 0])
    assert check_drop(other, want, live, RTOL[dtype]) == 2
    # a pick far from the minimum is caught even on a row that has a near-tie
    with pytest.raises(AssertionError, match="not a near-minimum"):
        check_drop(torch.tensor([1, 1]), want, live, RTOL[dtype])


def test_near_tie_check_rejects_a_clear_difference():
    scores = torch.tensor([[0.1, 0.2, 0.3, float("inf")], [0.5, 0.5, 0.1, 0.1]], device=DEVICE)
    live = [3, 4]
    assert check_drop(torch.tensor([0, 3]), scores, live, 1e-3) == 0
    assert check_drop(torch.tensor([0, 2]), scores, live, 1e-3) == 1  # exact tie: excused
    with pytest.raises(AssertionError, match="no near-tie"):
        check_drop(torch.tensor([1, 3]), scores, live, 1e-3)


@needs_kernels
def test_argmin_kernel_exact_ties_and_padding():
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (5, 1500), generator=g).float()  # ties everywhere, > 1 tile
    scores[:, 1200:] = -1.0  # padding below every live score: must be ignored
    live = torch.tensor([1200, 1, 7, 1025, 1100], dtype=torch.int32)
    scores[3, 1024] = -0.5  # the unique minimum sits alone in the second tile
    got = T.decode_drop_slot(scores.to(DEVICE), live.to(DEVICE)).cpu()
    assert torch.equal(got, position_to_drop(scores, live))
    assert int(got[3]) == 1024
    empty = T.decode_drop_slot(scores[:1].to(DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE))
    assert int(empty[0]) == -1


def test_keep_slots_is_shared_and_masks_padding():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, float("inf")], [0.3, 0.3, 0.3, 0.0, 0.9]])
    live = torch.tensor([4, 5])
    assert ref.keep_slots(scores, live, 2).tolist() == [[1, 2], [0, 4]]
    if T is not None:
        assert T.keep_slots is ref.keep_slots


# --------------------------------------------------------------------------- compaction


def _kept_sets(live: list[int], keep: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(n, generator=g)[:keep]).values for n in live]


@needs_kernels
@pytest.mark.parametrize("dtype,block_size,head_dim,combined", [
    (torch.bfloat16, 16, 64, True),
    (torch.float16, 32, 128, False),
    (torch.float32, 16, 128, False),
])
def test_compaction_matches_oracle_exactly(dtype, block_size, head_dim, combined):
    keep = 20
    live = [45, 21, 64, 33]
    kc, vc, bt = make_paged(live, block_size, 4, head_dim, dtype, combined=combined, seed=block_size)
    src, dst, row = [], [], []
    kept_sets = _kept_sets(live, keep, seed=head_dim)
    for r, kept in enumerate(kept_sets):
        s, d = compaction_moves(kept, keep)
        src += s.tolist()
        dst += d.tolist()
        row += [r] * len(s)
    # idle entries, as a static-shape decode step passes them
    src += [40, 5]
    dst += [3, 5]
    row += [-1, 2]
    args = [torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in (src, dst, row)]
    k_ref, v_ref, k_got, v_got = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    before_k = ref.gather_keys(kc, bt, live_tensor(live), 64)
    ref.compact_paged(k_ref, v_ref, bt, *args)
    T.compact_paged(k_got, v_got, bt, *args)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    # and the oracle did what compaction means: kept tokens now fill positions [0, keep)
    after_k = ref.gather_keys(k_ref, bt, live_tensor([keep] * len(live)), keep)
    for r, kept in enumerate(kept_sets):
        s, d = compaction_moves(kept, keep)
        expect = before_k[r][:, :keep].clone()
        expect[:, d.to(DEVICE)] = before_k[r][:, s.to(DEVICE)]
        assert torch.equal(after_k[r], expect)


@needs_kernels
@pytest.mark.parametrize("fused", [False, True], ids=["three-calls", "decode_evict"])
def test_decode_step_end_to_end(fused):
    """score -> drop -> move the last position into the hole, Triton vs torch, same caches.

    ``fused``: the argmin and the move through ``decode_evict`` (one kernel on Triton).
    """
    cache_size, block_size = 24, 16
    live = [cache_size + 1, cache_size + 1, 9, cache_size + 1, 7]
    dtype = torch.float16
    kc, vc, bt = make_paged(live, block_size, 2, 64, dtype, max_blocks=2, seed=21)
    q = make_query(len(live), 8, 64, dtype, seed=22)
    lv = live_tensor(live)
    evict = lv > cache_size  # rows 2 and 4 do not evict this step
    scores = ref.paged_tova_scores(q, kc, bt, lv, 0.125, max_live=cache_size + 1)
    scores[1, 3] = scores[1, 24]  # an exact tie with the last position: dropping it is a no-op move
    scores[1, 3:24] = torch.maximum(scores[1, 3:24], scores[1, 24])
    results = []
    for be in (ref, T):  # the modules: decode_drop_slot is no engine entry point
        k, v = kc.clone(), vc.clone()
        if fused:
            drop = be.decode_evict(scores, lv, k, v, bt, evict)
        else:
            drop = be.decode_drop_slot(scores, lv)
            be.compact_paged(k, v, bt, *be.decode_moves(drop, lv, evict))
        results.append((drop, k, v))
    (d0, k0, v0), (d1, k1, v1) = results
    assert torch.equal(d0, d1)
    assert int(d0[1]) == 24  # tie -> the highest slot, which is the new token itself
    if fused:
        assert d0[2] == -1 and d0[4] == -1
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # and the caches changed exactly at the evicting rows' dropped slots
    changed = (k0 != kc).flatten(1).any(1).nonzero().flatten().tolist()
    expect = sorted(int(bt[r, int(d0[r]) // block_size]) for r in (0, 3) if int(d0[r]) != live[r] - 1)
    assert sorted({blk for blk in changed}) == sorted(set(expect))
    # the Triton kernels on their own scores: any difference from the oracle is a near-tie
    own = T.paged_tova_scores(q, kc, bt, lv, 0.125, max_live=cache_size + 1)
    check_drop(T.decode_evict(own, lv, kc.clone(), vc.clone(), bt), ref.paged_tova_scores(q, kc, bt, lv, 0.125, max_live=cache_size + 1), live, RTOL[dtype])


# --------------------------------------------------------------------------- GPU only


@needs_cuda
def test_decode_path_captures_in_a_cuda_graph():
    """No host synchronisation: lse + score + fused argmin/move replay inside a CUDA graph."""
    live = [257, 257, 200, 257, 1, 257, 130, 257]
    kc, vc, bt = make_paged(live, 16, 8, 128, torch.bfloat16, max_blocks=17, seed=31)
    q = make_query(8, 32, 128, torch.bfloat16, seed=32)
    lv = live_tensor(live)
    lse = torch.zeros(8, 32, device=DEVICE)
    scores = torch.empty(8, 272, device=DEVICE)  # max_blocks * block_size columns
    k, v = kc.clone(), vc.clone()

    def step():
        T.paged_lse(q, k, bt, lv, 0.09, out=lse, splits=2)  # split pass + torch.logsumexp
        T.paged_tova_scores(q, k, bt, lv, 0.09, lse, out=scores)
        return T.decode_evict(scores, lv, k, v, bt)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        drop = step()
    k.copy_(kc), v.copy_(vc)
    scores.fill_(-1.0)
    graph.replay()
    torch.cuda.synchronize()
    want = ref.paged_tova_scores(q, kc, bt, lv, 0.09, max_live=272)
    assert_scores_close(scores, want, live, RTOL[torch.bfloat16])
    check_drop(drop, want, live, RTOL[torch.bfloat16])
    k_ref, v_ref = kc.clone(), vc.clone()
    ref.compact_paged(k_ref, v_ref, bt, *ref.decode_moves(drop, lv))
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@needs_cuda
def test_scoring_kernel_timing_smoke():
    """The one-pass scoring kernel streams K at a sane fraction of copy bandwidth."""
    live = [2048] * 32
    kc, _, bt = make_paged(live, 16, 8, 128, torch.float16, seed=41)
    q = make_query(32, 32, 128, torch.float16)
    lv = live_tensor(live)
    lse = T.paged_lse(q, kc, bt, lv, 0.09)
    for _ in range(3):
        T.paged_tova_scores(q, kc, bt, lv, 0.09, lse)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        T.paged_tova_scores(q, kc, bt, lv, 0.09, lse)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 20
    gbps = 32 * 2048 * 8 * 128 * 2 / seconds / 1e9
    assert gbps > 100, f"scoring kernel reads K at only {gbps:.0f} GB/s"


# --------------------------------------------------------------------------- the CUDA mechanism


@needs_kernels
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prompt"])
@pytest.mark.parametrize("use_lse", [False, True], ids=["softmax", "lse"])
def test_paged_evictor_with_triton_kernels(decode, use_lse):
    """The CUDA backend's eviction step (engine/paged_eviction.py) with these kernels,
    against the dense model of test_paged_eviction.py; mixed policies included."""
    from paged_cases import run_case

    run_case(backend="triton", decode=decode, policies=None, use_lse=use_lse, seed=1,
             device=DEVICE)
    run_case(backend="triton", decode=decode, policies=["tova", "h2o", "window"], seed=2,
             device=DEVICE)
    if CUDA:  # the tensor-core path with a half-precision cache
        run_case(backend="triton", decode=decode, policies=None, use_lse=use_lse, seed=3,
                 dtype=torch.bfloat16, device=DEVICE)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda's sync debug mode)")
@pytest.mark.parametrize("policies", [None, ["tova", "h2o", "window", "sink_window"]],
                         ids=["tova", "mixed-policies"])
@pytest.mark.parametrize("use_lse", [False, True], ids=["softmax", "lse"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prompt"])
def test_eviction_never_makes_the_host_wait(decode, policies, use_lse):
    """An eviction step (scores, selection, compaction, side state, and the plan's
    host-to-device copies) runs with torch.cuda.set_sync_debug_mode("error")."""
    from paged_cases import run_case

    run_case(backend="triton", decode=decode, policies=policies, use_lse=use_lse, seed=5,
             device=DEVICE, forbid_sync=True)


# --------------------------------------------------------------------------- fallback


@pytest.mark.skipif(T is not None or CUDA, reason="kernel tests ran in this process")
def test_kernels_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_ENV: "1"})
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rs", "-p", "no:warnings",
         "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # not vacuous: the child did interpret the kernels (no "unavailable" skips)
    assert "Triton interpreter unavailable" not in out and " passed" in out, out[-6000:]
