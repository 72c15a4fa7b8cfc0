"""The quality study's perplexity part: streaming NLL per window, policy and
budget, through the reference or vLLM, and its summary (``scripts/eval_quality.py``)."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any, Callable

from quality_common import budget_cell, policy_of, budget_error


def hf_logprobs(model, ids: list[int], attention_mask=None):
    """Plain Hugging Face forward: ``log p(token i+1 | tokens <= i)``, fp32 on CPU."""
    import torch

    device = model.get_input_embeddings().weight.device
    tokens = torch.tensor([ids], device=device)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    with torch.no_grad():
        logits = model(tokens, **kwargs).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[:-1]
    return logprobs.gather(1, tokens[0, 1:].unsqueeze(1))[:, 0].cpu()


def cell_file(cache_dir: Path, model, ids, name: str, cache_size: int, args) -> Path:
    """Where one (window, policy, budget) cell's NLLs are kept: named by a hash of all that
    decides them (model, dtype, tokens, policy settings, budget)."""
    import hashlib

    key = json.dumps([str(getattr(model, "name_or_path", "")), args.dtype, list(ids), name,
                      cache_size, args.sinks, args.recent, args.ppl_chunk])
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def ppl_reference(model, windows, policies, budgets, args, cell_done: Callable) -> dict:
    """Per-token NLL lists ``{(policy, C): [per-window fp32 tensor]}``.

    The full budget evicts nothing, so it is computed once (key ``("*", N)``).  Window by
    window (all budgets of a window before the next), so that a run cut short has whole
    windows in ``--cell-cache`` to resume from."""
    import torch
    from tova_vllm.reference import teacher_forced_logprobs

    out: dict = {}
    length = len(windows[0])
    cache_dir = args.cell_cache
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    for w, ids in enumerate(windows):
        for budget in budgets:
            names = ["*"] if budget.full else policies
            for name in names:
                if name != "*" and budget_error(name, budget, args):
                    continue
                policy_name = "tova" if name == "*" else name
                label = f"{name if name != '*' else 'full'} C={budget.cache_size} w{w}"
                saved = None
                if cache_dir is not None:
                    saved = cell_file(cache_dir, model, ids, policy_name, budget.cache_size,
                                       args)
                if saved is not None and saved.is_file():
                    nll = torch.load(saved)
                else:
                    step = max(1, length // 16)

                    def progress(n, label=label, step=step):
                        if n % step == 0 or n == length:
                            cell_done.note(f"{label} tok {n}/{length}")

                    lp = teacher_forced_logprobs(model, ids, cache_size=budget.cache_size,
                                                 policy=policy_of(policy_name, args),
                                                 prompt_chunk=args.ppl_chunk,
                                                 progress=progress)
                    nll = -lp.double()
                    if saved is not None:
                        torch.save(nll, saved.with_suffix(".tmp"))
                        saved.with_suffix(".tmp").replace(saved)  # whole files only
                out.setdefault((name, budget.cache_size), [None] * len(windows))[w] = nll
                cell_done.update(label)
    return out


def ppl_vllm(model_path: str, windows, policies, budgets, args) -> dict:
    """The same per-token NLL, from vLLM's prompt logprobs under the TOVA plugin: one
    request per (policy, budget, window), with ``max_tokens=1`` and ``prompt_logprobs=0``;
    the server's budget is N and each request lowers it (``tova_cache_size``) and names
    its policy (``tova_policy``).  Sinks / recent are server settings."""
    import torch
    from vllm import LLM, SamplingParams

    length = len(windows[0])
    tova = {"cache_size": length, "prompt_mode": "chunked", "prompt_chunk": args.ppl_chunk,
            "sinks": args.sinks}
    if args.recent is not None:
        tova["recent"] = args.recent
    kv_gib = args.kv_cache_gib
    if kv_gib is None and not torch.cuda.is_available():
        # vLLM's CPU default reserves 92% of the machine's memory up front (and refuses to
        # start when that much is not free); a fixed pool is plenty for N-token requests.
        kv_gib = 1.0
    extra = {} if kv_gib is None else {"kv_cache_memory_bytes": int(kv_gib * 2**30)}
    llm = LLM(model=model_path, dtype=args.dtype, max_model_len=length + 1,
              enforce_eager=True, enable_prefix_caching=False, seed=args.seed,
              additional_config={"tova": tova}, **extra)
    try:
        keys, prompts, params = [], [], []
        for budget in budgets:
            names = ["*"] if budget.full else policies
            for name in names:
                if name != "*" and budget_error(name, budget, args):
                    continue
                for w, ids in enumerate(windows):
                    request_args = {"tova_cache_size": budget.cache_size,
                                    "tova_policy": "tova" if name == "*" else name}
                    keys.append((name, budget.cache_size, w))
                    prompts.append({"prompt_token_ids": list(ids)})
                    params.append(SamplingParams(max_tokens=1, temperature=0.0,
                                                 prompt_logprobs=0,
                                                 extra_args=request_args))
        outputs = llm.generate(prompts, params, use_tqdm=True)
        out: dict = {}
        for (name, size, w), request, ids in zip(keys, outputs, (p["prompt_token_ids"]
                                                                 for p in prompts)):
            entries = request.prompt_logprobs
            assert entries[0] is None and len(entries) == len(ids)
            nll = [-entries[i][ids[i]].logprob for i in range(1, len(ids))]
            out.setdefault((name, size), [None] * len(windows))[w] = torch.tensor(
                nll, dtype=torch.float64)
        return out
    finally:
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()


def window_spread(values: list[float]) -> dict[str, Any]:
    """Per-window perplexities and their spread: min, max and the sample standard deviation
    (0 for a single window)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"window_perplexity": list(values), "window_ppl_min": min(values),
            "window_ppl_max": max(values), "window_ppl_std": math.sqrt(var)}


def summarize_ppl(nll: dict, windows, policies, budgets, args, byte_level: bool,
                  save_tokens: bool) -> dict:
    """Perplexity per (policy, budget); the full budget is shared by every policy."""
    length = len(windows[0])
    full_key = ("*", length)
    table: dict[str, dict[str, Any]] = {}
    for name in policies:
        row = {}
        for budget in budgets:
            key, cell = budget_cell(name, budget, length)
            if key not in nll:
                cell.update(perplexity=None, error=budget_error(name, budget, args))
            else:
                per_window = nll[key]
                total = sum(float(t.sum()) for t in per_window)
                count = sum(t.numel() for t in per_window)
                mean = total / count
                cell.update(perplexity=math.exp(mean), mean_nll=mean, tokens=count)
                cell.update(window_spread([math.exp(float(t.mean())) for t in per_window]))
                if full_key in nll:
                    # Paired with the same window at full cache: windows differ in how hard
                    # their text is far more than the policies differ, so the cost of a
                    # budget is read per window.
                    full_ppl = [math.exp(float(t.mean())) for t in nll[full_key]]
                    ratios = [p / f for p, f in zip(cell["window_perplexity"], full_ppl)]
                    cell.update(ratio_to_full=cell["perplexity"] / math.exp(
                                    sum(float(t.sum()) for t in nll[full_key]) / count),
                                window_ratio_min=min(ratios), window_ratio_max=max(ratios))
                if byte_level:
                    cell["bits_per_byte"] = mean / math.log(2)
                if save_tokens:
                    cell["token_nll"] = [[float(x) for x in t] for t in per_window]
            row[str(budget.cache_size)] = cell
        table[name] = row
    return table
