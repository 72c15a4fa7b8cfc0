#!/usr/bin/env python3
"""Quality study: what a bounded KV cache costs a model, per eviction policy and budget.

Runs on any Hugging Face Llama-family checkpoint with full attention (Llama, Mistral,
Qwen2, Qwen3), through the plain-PyTorch reference (``tova_vllm.reference``) or, for the
perplexity part, inside vLLM itself (``--backend vllm``/``both``).

1. **Perplexity vs budget** (the paper's language-modelling setting).  A long text is
   tokenized (no special tokens, except the tokenizer's BOS in front of every window when
   it has one) and cut into ``--num-windows`` non-overlapping windows of ``--length`` N
   tokens.  The text (``--text``): by default a book, Newton's *Opticks* (4th edition,
   1730; the Project Gutenberg text), which ``apache-tvm-ffi`` ships as libbacktrace's test
   input and vLLM installs through ``xgrammar``: long continuous English prose that ships
   offline, of the kind the TOVA paper measured on (PG-19, Project Gutenberg books); the
   windows are spread evenly over the book.  ``--text stdlib``: the held-out validation
   files of ``scripts/train_byte_llama.py`` (Python standard-library sources, joined by
   the EOS token, windows back to back); the fallback, with a warning, when the book is
   not installed.  ``--text-file``: any text.  Every window streams through the model;
   after every token (``--ppl-chunk`` K: every K tokens) every layer evicts down to C
   tokens with the policy (``teacher_forced_logprobs(..., prompt_chunk=K)``).  Reported:
   perplexity = exp(mean NLL over every scored token of every window), its spread over the
   windows (per-window min, max, std), the cost against the full cache paired by window
   (windows differ in difficulty far more than policies do), and bits per byte for
   byte-level tokenizers.  C = N (full) evicts nothing, so it is computed once for all
   policies and checked against a plain Hugging Face forward pass on the first window.

2. **Retrieval probe** (``--probe-format``).  ``passkey`` (default): a 5-digit pass key
   hidden in repeated filler sentences (the passkey test of Landmark Attention), then
   ``What is the pass key? The pass key is``; ``kv``: Python assignments ``k_qzw = 48213``
   ending in ``assert k_qzw ==``, a harder lookup for bigger models.  The model must
   greedily produce the answer's tokens (exact match).  Prompts are about
   ``--probe-length`` tokens and stream in ``chunked`` mode (eviction every
   ``--probe-chunk`` tokens), so eviction happens while they are read.  The queried item's
   depth is spread uniformly over the prompt.  The full-cache pass rate is reported with
   the table; if the model cannot retrieve at full cache, the probe measures nothing and
   the output says so.

``--cell-cache DIR`` keeps every cell (a window's NLLs under one policy and budget, one
probe's answer) and reuses it, so a long study can resume, or be split over processes
(by ``--policies``, ``--skip-ppl``/``--skip-probe``) and assembled by one last run.

Output (``--out``, default ``build/quality``): ``results.json`` (every number, the
settings, the model path, wall time), ``results.md`` (markdown tables and the command line)
and ``quality.png`` (needs matplotlib; skipped with a warning without it).  Progress bars
need tqdm (plain prints otherwise).  Both come with the ``eval`` extra:
``pip install -e ".[eval]"``.

Examples::

    python3 scripts/eval_quality.py --model PATH                      # full study
    python3 scripts/eval_quality.py --model PATH --quick              # smoke test
    python3 scripts/eval_quality.py --model PATH --backend both \\
        --policies tova,window --budgets 1/8,1/4,full                  # engine == reference
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import shlex
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "scripts"))  # the byte model's corpus split

from tova_vllm.policies import POLICY_NAMES as POLICIES  # noqa: E402
from train_byte_llama import corpus_files, is_val  # noqa: E402

DEFAULT_BUDGETS = "1/16,1/8,1/4,1/2,full"
TEXTS = ("book", "stdlib")
QUICK = dict(num_windows=1, length=128, num_probes=4, probe_length=128)
DEFAULTS = dict(num_windows=4, length=1024, num_probes=20, probe_length=512)


# --------------------------------------------------------------------------- arguments

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Budgets: comma-separated; 'full', a fraction ('1/16', '0.25') of the "
        "length, or an absolute token count ('64').",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory or id")
    p.add_argument("--backend", choices=("reference", "vllm", "both"), default="reference",
                   help="where perplexity is computed (the probe always uses the reference)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated subset of {','.join(POLICIES)}")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS,
                   help=f"cache sizes for perplexity, relative to --length (default "
                   f"{DEFAULT_BUDGETS})")
    p.add_argument("--probe-budgets", default=None,
                   help="cache sizes for the probe, relative to --probe-length "
                   "(default: same as --budgets)")
    p.add_argument("--sinks", type=int, default=4, help="sink_window: first tokens kept")
    p.add_argument("--recent", type=int, default=None,
                   help="h2o: most recent tokens kept (default: half the budget)")
    p.add_argument("--text", choices=TEXTS, default="book",
                   help="text for perplexity: 'book' (default), Newton's Opticks, the Project "
                   "Gutenberg book that vLLM's dependency apache-tvm-ffi ships (falls back to "
                   "'stdlib' with a warning when it is not installed); 'stdlib': held-out "
                   "Python standard-library sources")
    p.add_argument("--text-file", type=Path, default=None,
                   help="text for perplexity from a file (overrides --text)")
    p.add_argument("--num-windows", type=int, default=None, help="default 4 (quick: 1)")
    p.add_argument("--length", type=int, default=None, help="N tokens/window, default 1024 "
                   "(quick: 128)")
    p.add_argument("--window-stride", type=int, default=None,
                   help="tokens from one window's start to the next (default: the whole "
                   "text / --num-windows for the book and --text-file, --length for stdlib)")
    p.add_argument("--num-probes", type=int, default=None, help="default 20 (quick: 4)")
    p.add_argument("--probe-length", type=int, default=None,
                   help="probe prompt tokens, about; default 512 (quick: 128)")
    p.add_argument("--probe-format", choices=("passkey", "kv"), default="passkey",
                   help="retrieval probe: 'passkey' (default; a 5-digit key in repeated "
                   "filler, which a 135M model retrieves at full cache) or 'kv' (a lookup "
                   "among Python assignments k_xyz = 48213: for bigger models)")
    p.add_argument("--probe-chunk", type=int, default=16,
                   help="eviction period while the probe prompt streams in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 window of 128 tokens, 4 probes of 128 tokens")
    p.add_argument("--skip-ppl", action="store_true", help="no perplexity study")
    p.add_argument("--skip-probe", action="store_true", help="no retrieval probe")
    p.add_argument("--save-token-nll", action="store_true",
                   help="also store every token's NLL in results.json")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="--backend vllm: KV cache pool in GiB (default on CPU: 1; on GPU: "
                   "vLLM's memory-utilization default)")
    p.add_argument("--sanity-tol", type=float, default=None,
                   help="max |logprob| difference, full budget vs plain HF forward "
                   "(default 2e-3 in float32, 0.1 otherwise)")
    p.add_argument("--ppl-chunk", type=int, default=1,
                   help="perplexity: evict every K tokens (default 1: after every token, the "
                   "paper's setting; K > 1 is the plugin's chunked prompt mode, K times "
                   "fewer forward passes, and a layer holds up to C + K - 1 tokens between "
                   "evictions)")
    p.add_argument("--cell-cache", type=Path, default=None,
                   help="keep every (window, policy, budget) cell's per-token NLL (reference "
                   "backend) and every probe's answer here, and reuse them on later runs "
                   "(resume a long study, or split it over processes by --policies or "
                   "--skip-ppl/--skip-probe and assemble it in one last run)")
    p.add_argument("--out", type=Path, default=REPO / "build" / "quality")
    args = p.parse_args(argv)

    if Path(args.model).exists():  # a local checkpoint: never ask the hub
        args.model = str(Path(args.model).resolve())
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in args.policies if x not in POLICIES]
    if bad or not args.policies:
        p.error(f"--policies: unknown {bad}; choose from {list(POLICIES)}")
    if args.probe_budgets is None:
        args.probe_budgets = args.budgets
    if args.ppl_chunk < 1:
        p.error("--ppl-chunk must be >= 1")
    if args.length < 2 or args.num_windows < 1:
        p.error("--length must be >= 2 and --num-windows >= 1")
    if args.probe_length < 16 or args.num_probes < 1:
        p.error("--probe-length must be >= 16 and --num-probes >= 1")
    try:
        parse_budgets(args.budgets, args.length)
        parse_budgets(args.probe_budgets, args.probe_length)
    except ValueError as exc:
        p.error(str(exc))
    return args


@dataclass(frozen=True)
class Budget:
    label: str       # as the user wrote it ("1/16", "64", "full")
    cache_size: int  # C (for "full": the length)
    full: bool

    def fraction(self, length: int) -> float:
        return self.cache_size / length


def parse_budgets(spec: str, length: int) -> list[Budget]:
    """``"1/16,0.25,64,full"`` -> budgets sorted by size; duplicates merged; ``full`` (or
    any size >= ``length``) evicts nothing and is always included."""
    out: dict[int, Budget] = {}
    for raw in (x.strip() for x in spec.split(",")):
        if not raw:
            continue
        if raw == "full":
            size = length
        elif "/" in raw or "." in raw:
            try:
                if "/" in raw:
                    num, den = raw.split("/")
                    frac = float(num) / float(den)
                else:
                    frac = float(raw)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"bad budget {raw!r}") from None
            if not 0 < frac <= 1:
                raise ValueError(f"budget fraction must be in (0, 1], got {raw!r}")
            size = max(1, round(frac * length))
        else:
            try:
                size = int(raw)
            except ValueError:
                raise ValueError(f"bad budget {raw!r}") from None
            if size < 1:
                raise ValueError(f"budget must be >= 1, got {raw!r}")
        size = min(size, length)
        full = size >= length
        out.setdefault(size, Budget("full" if full else raw, size, full))
    out.setdefault(length, Budget("full", length, True))
    return [out[k] for k in sorted(out)]


# --------------------------------------------------------------------------- progress

class Progress:
    """tqdm when installed, otherwise a line every ~5% of the work."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._next_print = 0.0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
            print(f"[{desc}] 0/{total}", flush=True)
        else:
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def note(self, text: str) -> None:
        """Progress inside one item (callers throttle it)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def update(self, text: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.done >= self._next_print or self.done == self.total:
            print(f"[{self.desc}] {self.done}/{self.total} {text}", flush=True)
            self._next_print = self.done + max(1, self.total // 20)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- text

def default_text_files() -> tuple[Path, list[Path], str]:
    """The byte model's held-out validation files (``scripts/train_byte_llama.py``'s split of
    the standard library's ``.py`` files): text that ships with every Python, and that the
    byte model never trained on.  For other models it is ordinary source with docstrings."""
    root, files = corpus_files()
    val = [f for f in files if is_val(f.relative_to(root).as_posix())]
    return root, val, "held-out validation files of scripts/train_byte_llama.py"


# Where apache-tvm-ffi (required by xgrammar, which vLLM requires) keeps libbacktrace's test
# input: the Project Gutenberg text of Newton's *Opticks* (4th edition, 1730; public domain).
BOOK_IN_PACKAGE = ("tvm_ffi", "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt")
BOOK_START = "OPTICKS:"  # the title page: what precedes it is the transcribers' credits


def book_path() -> Optional[Path]:
    """Newton's *Opticks* as installed with vLLM, or ``None``.  Located without importing
    the package (its import loads a native library)."""
    import importlib.util

    package, relative = BOOK_IN_PACKAGE
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def book_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.find(BOOK_START)
    return text[start:] if start >= 0 else text


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def load_token_stream(tokenizer, args, needed: int) -> tuple[list[int], dict]:
    """Token ids (no special tokens but file separators) of the evaluation text, at least
    ``needed`` long."""
    if args.text_file is not None:
        text = args.text_file.read_text(encoding="utf-8", errors="replace")
        ids = _encode(tokenizer, text)
        info = {"source": str(args.text_file), "chars": len(text), "spread": True}
        if len(ids) < needed:
            raise SystemExit(f"--text-file has {len(ids)} tokens; {needed} are needed "
                             "(lower --num-windows or --length)")
        return ids, info
    if args.text == "book":
        path = book_path()
        if path is not None:
            text = book_text(path)
            ids = _encode(tokenizer, text)
            info = {"source": "book: Isaac Newton, Opticks (4th ed. 1730), Project Gutenberg "
                    "text shipped by apache-tvm-ffi", "path": str(path), "chars": len(text),
                    "spread": True}
            if len(ids) < needed:
                raise SystemExit(f"the book has {len(ids)} tokens; {needed} are needed "
                                 "(lower --num-windows or --length)")
            return ids, info
        print(f"warning: {BOOK_IN_PACKAGE[0]} (installed with vLLM) does not ship "
              f"{BOOK_IN_PACKAGE[1]} here; measuring on the standard-library sources instead "
              "(--text stdlib)", file=sys.stderr)
    root, files, how = default_text_files()
    # Files are tokenized one by one and joined by the EOS token when the tokenizer has
    # one (the byte-level trainer's stream format), else by a blank line.
    eos = tokenizer.eos_token_id
    separator = [eos] if eos is not None else _encode(tokenizer, "\n\n")
    ids: list[int] = []
    used: list[str] = []
    for path in files:
        try:
            body = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not body.strip():
            continue
        ids += _encode(tokenizer, body) + separator
        used.append(path.relative_to(root).as_posix() if path.is_relative_to(root)
                    else str(path))
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise SystemExit(f"the default text has only {len(ids)} tokens; {needed} needed")
    info = {"source": how, "stdlib": str(root), "python": sys.version.split()[0],
            "files": used, "separator": separator, "spread": False}
    return ids, info


def make_windows(ids: list[int], num: int, length: int, bos: Optional[int],
                 spread: bool = False, stride: Optional[int] = None) -> list[list[int]]:
    """``num`` non-overlapping windows of ``length`` tokens (BOS first when given): back to
    back from the start, or with ``spread`` evenly over all of ``ids`` (windows from all
    over a book vary more than neighbours do, so their spread says more), or starting
    every ``stride`` tokens (so a run with fewer windows reuses the first ones)."""
    body = length - (bos is not None)
    if stride is None:
        stride = len(ids) // num if spread else body
    if stride < body or len(ids) < (num - 1) * stride + body:
        raise ValueError(f"{len(ids)} tokens cannot hold {num} windows of {body} tokens "
                         f"every {stride}")
    windows = []
    for w in range(num):
        chunk = ids[w * stride:w * stride + body]
        windows.append(([bos] if bos is not None else []) + chunk)
    return windows


def is_byte_level(tokenizer) -> bool:
    """At most 256 non-special tokens: one token per byte."""
    return len(tokenizer) - len(set(tokenizer.all_special_ids)) <= 256


# --------------------------------------------------------------------------- perplexity

def _policy(name: str, args):
    from tova_vllm.policies import EvictionPolicy

    return EvictionPolicy(name, sinks=args.sinks, recent=args.recent)


def _budget_error(name: str, budget: Budget, args) -> Optional[str]:
    if budget.full:
        return None
    try:
        _policy(name, args).check_budget(budget.cache_size)
    except ValueError as exc:
        return str(exc)
    return None


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


def _cell_file(cache_dir: Path, model, ids, name: str, cache_size: int, args) -> Path:
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
                if name != "*" and _budget_error(name, budget, args):
                    continue
                policy_name = "tova" if name == "*" else name
                label = f"{name if name != '*' else 'full'} C={budget.cache_size} w{w}"
                saved = None
                if cache_dir is not None:
                    saved = _cell_file(cache_dir, model, ids, policy_name, budget.cache_size,
                                       args)
                if saved is not None and saved.is_file():
                    nll = torch.load(saved)
                else:
                    step = max(1, length // 16)

                    def progress(n, label=label, step=step):
                        if n % step == 0 or n == length:
                            cell_done.note(f"{label} tok {n}/{length}")

                    lp = teacher_forced_logprobs(model, ids, cache_size=budget.cache_size,
                                                 policy=_policy(policy_name, args),
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
                if name != "*" and _budget_error(name, budget, args):
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
            key = ("*", budget.cache_size) if budget.full else (name, budget.cache_size)
            cell: dict[str, Any] = {"cache_size": budget.cache_size, "label": budget.label,
                                    "fraction": budget.fraction(length),
                                    "shared_full": budget.full}
            if key not in nll:
                cell.update(perplexity=None, error=_budget_error(name, budget, args))
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


# --------------------------------------------------------------------------- probe

def _split_prompt_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and ``answer`` as they appear in ``prompt + answer``."""
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if full[:len(head)] == head and len(full) > len(head):
        return head, full[len(head):]
    # The tokenizer merged across the boundary: cut before the first token that reaches
    # into the answer (offsets need a fast tokenizer).
    enc = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
    cut = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(prompt))
    return full[:cut], full[cut:]


# The passkey test of Mohtashami & Jaggi (2023, "Landmark Attention"): a pass key hidden in
# repeated filler, asked for at the end.  Copying a number that follows a unique phrase is
# an induction-head task that even a 135M model does at full cache; what eviction changes is
# whether the key's tokens are still in the cache when the question comes.
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def build_probes(tokenizer, args) -> list[dict]:
    """``--num-probes`` prompts of about ``--probe-length`` tokens in ``--probe-format``,
    the queried item's depth spread uniformly over the prompt."""
    if args.probe_format == "passkey":
        return build_passkey_probes(tokenizer, args)
    return build_kv_probes(tokenizer, args)


def build_passkey_probes(tokenizer, args) -> list[dict]:
    """Filler sentences with the needle after ``index`` of them; the answer is the 5-digit
    key (a space and five digit tokens for most tokenizers)."""
    bos = tokenizer.bos_token_id
    per_filler = len(_encode(tokenizer, PASSKEY_FILLER * 8)) / 8
    fixed = len(_encode(tokenizer, PASSKEY_NEEDLE.format(key="12345") + PASSKEY_QUESTION))
    fillers = max(1, int((args.probe_length - fixed - (bos is not None)) / per_filler))
    probes = []
    for i in range(args.num_probes):
        prng = random.Random(f"{args.seed}-passkey-{i}")
        key = str(prng.randrange(10000, 100000))
        index = min(fillers, int((i + 0.5) / args.num_probes * (fillers + 1)))
        text = (PASSKEY_FILLER * index + PASSKEY_NEEDLE.format(key=key)
                + PASSKEY_FILLER * (fillers - index) + PASSKEY_QUESTION)
        prompt_ids, answer_ids = _split_prompt_answer(tokenizer, text, " " + key)
        if bos is not None:
            prompt_ids = [bos] + prompt_ids
        probes.append({
            "key": "pass key", "value": key, "items": fillers, "index": index,
            "depth": index / fillers, "prompt_ids": prompt_ids, "answer_ids": answer_ids,
        })
    return probes


def build_kv_probes(tokenizer, args) -> list[dict]:
    """Python assignments ``k_qzw = 48213`` (random keys and 5-digit values), then
    ``assert k_qzw ==``: a lookup among many similar lines, too hard for a 135M model
    (0/10 at full cache for SmolLM2-135M-Instruct) but a finer test for bigger ones."""
    bos = tokenizer.bos_token_id
    rng = random.Random(args.seed)

    def line(key: str, value: str) -> str:
        return f"{key} = {value}\n"

    def new_key(taken: set) -> str:
        while True:
            key = "k_" + "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
            if key not in taken:
                taken.add(key)
                return key

    sample_keys: set = set()
    sample = "".join(line(new_key(sample_keys), str(rng.randrange(10000, 100000)))
                     for _ in range(32))
    per_line = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 32
    query_tokens = len(tokenizer("assert k_abc == 12345", add_special_tokens=False)
                       ["input_ids"]) + (bos is not None)
    num_pairs = max(2, int((args.probe_length - query_tokens) / per_line))

    probes = []
    for i in range(args.num_probes):
        prng = random.Random(f"{args.seed}-probe-{i}")
        taken: set = set()
        keys = []
        while len(keys) < num_pairs:
            key = "k_" + "".join(prng.choice(string.ascii_lowercase) for _ in range(3))
            if key not in taken:
                taken.add(key)
                keys.append(key)
        values = [str(prng.randrange(10000, 100000)) for _ in keys]
        index = min(num_pairs - 1, int((i + 0.5) / args.num_probes * num_pairs))
        text = "".join(line(k, v) for k, v in zip(keys, values))
        prompt_text = text + f"assert {keys[index]} =="
        prompt_ids, answer_ids = _split_prompt_answer(tokenizer, prompt_text,
                                                      " " + values[index])
        if bos is not None:
            prompt_ids = [bos] + prompt_ids
        probes.append({
            "key": keys[index], "value": values[index], "items": num_pairs,
            "index": index, "depth": index / max(1, num_pairs - 1),
            "prompt_ids": prompt_ids, "answer_ids": answer_ids,
        })
    return probes


def run_probes(model, tokenizer, probes, policies, budgets, args, bar: Progress) -> dict:
    from tova_vllm.reference import generate

    results = {}
    for budget in budgets:
        names = ["*"] if budget.full else policies
        for name in names:
            if name != "*" and _budget_error(name, budget, args):
                continue
            policy = _policy("tova" if name == "*" else name, args)
            correct, outputs = [], []
            for i, probe in enumerate(probes):
                prompt, answer = probe["prompt_ids"], probe["answer_ids"]
                # Full: large enough that nothing is ever evicted.
                size = len(prompt) + len(answer) if budget.full else budget.cache_size
                saved = None
                if args.cell_cache is not None:
                    args.cell_cache.mkdir(parents=True, exist_ok=True)
                    saved = _cell_file(args.cell_cache, model, prompt + answer,
                                       f"probe-{policy.name}-chunk{args.probe_chunk}", size,
                                       args).with_suffix(".json")
                if saved is not None and saved.is_file():
                    token_ids = json.loads(saved.read_text())
                else:
                    token_ids = generate(model, prompt, cache_size=size,
                                         max_new_tokens=len(answer), prompt_mode="chunked",
                                         prompt_chunk=args.probe_chunk,
                                         policy=policy).token_ids
                    if saved is not None:
                        saved.with_suffix(".tmp").write_text(json.dumps(token_ids))
                        saved.with_suffix(".tmp").replace(saved)
                correct.append(token_ids == answer)
                outputs.append(tokenizer.decode(token_ids))
                bar.update(f"{'full' if name == '*' else name} C={budget.cache_size} p{i}")
            results[(name, budget.cache_size)] = {"correct": correct, "outputs": outputs}
    return results


def summarize_probes(raw: dict, probes, policies, budgets, args) -> dict:
    table: dict[str, dict[str, Any]] = {}
    for name in policies:
        row = {}
        for budget in budgets:
            key = ("*", budget.cache_size) if budget.full else (name, budget.cache_size)
            cell: dict[str, Any] = {"cache_size": budget.cache_size, "label": budget.label,
                                    "fraction": budget.fraction(args.probe_length),
                                    "shared_full": budget.full}
            if key not in raw:
                cell.update(accuracy=None, error=_budget_error(name, budget, args))
            else:
                correct = raw[key]["correct"]
                cell.update(accuracy=sum(correct) / len(correct), correct=correct,
                            outputs=raw[key]["outputs"])
            row[str(budget.cache_size)] = cell
        table[name] = row
    return table


# --------------------------------------------------------------------------- reporting

def _header(budgets: list[Budget]) -> str:
    cols = []
    for b in budgets:
        if b.full:
            cols.append(f"full (C={b.cache_size})")
        elif b.label.isdigit():
            cols.append(f"C={b.cache_size}")
        else:
            cols.append(f"C={b.cache_size} ({b.label})")
    return "| policy | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"


def _eviction_note(chunk: int) -> str:
    if chunk == 1:
        return "Every layer evicts down to C after every token."
    return (f"Every layer evicts down to C every {chunk} tokens (chunked prompt mode), so "
            f"it holds between C and C + {chunk - 1} tokens.")


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def markdown_tables(results: dict) -> str:
    parts = []
    ppl = results.get("perplexity")
    if ppl:
        length = results["settings"]["length"]
        budgets = [Budget(**b) for b in ppl["budgets"]]
        for backend, table in ppl["tables"].items():
            parts.append(f"### Perplexity ({backend}; {ppl['windows']} x {length} tokens, "
                         f"{ppl['scored_tokens']} scored)\n\nText: {ppl['text']['source']}. "
                         f"{_eviction_note(results['settings'].get('ppl_chunk', 1))}\n\n")
            parts.append(_header(budgets))
            for name, row in table.items():
                cells = [("n/a" if c["perplexity"] is None else f"{c['perplexity']:.4g}")
                         for c in row.values()]
                parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            parts.append(f"\nPer-window perplexity, min - max (std) over the "
                         f"{ppl['windows']} windows ({backend}):\n\n")
            parts.append(_header(budgets))
            for name, row in table.items():
                cells = [("n/a" if c["perplexity"] is None else
                          f"{c['window_ppl_min']:.4g} - {c['window_ppl_max']:.4g} "
                          f"({c['window_ppl_std']:.2g})") for c in row.values()]
                parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            parts.append(f"\nCost against the full cache: perplexity change, overall "
                         f"(min .. max over the windows, each against itself at full "
                         f"cache) ({backend}):\n\n")
            parts.append(_header(budgets))
            for name, row in table.items():
                cells = [("n/a" if c.get("ratio_to_full") is None else
                          f"{_pct(c['ratio_to_full'])} ({_pct(c['window_ratio_min'])} .. "
                          f"{_pct(c['window_ratio_max'])})") for c in row.values()]
                parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            if ppl["byte_level"]:
                parts.append(f"\nBits per byte ({backend}):\n\n")
                parts.append(_header(budgets))
                for name, row in table.items():
                    cells = [("n/a" if c["perplexity"] is None else f"{c['bits_per_byte']:.4f}")
                             for c in row.values()]
                    parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
            parts.append("\n")
        if "engine_vs_reference" in ppl:
            diff = ppl["engine_vs_reference"]
            parts.append(f"vLLM vs reference: max |per-token NLL difference| = "
                         f"{diff['max_abs_token_nll_diff']:.3g}, max relative perplexity "
                         f"difference = {diff['max_rel_ppl_diff']:.3g}\n\n")
        s = ppl["sanity"]
        parts.append(f"Sanity: full budget vs plain Hugging Face forward on window 0: max "
                     f"|logprob difference| = {s['max_abs_diff']:.3g} (tolerance "
                     f"{s['tolerance']:.3g}).\n\n")
    probe = results.get("retrieval")
    if probe:
        budgets = [Budget(**b) for b in probe["budgets"]]
        what = (f"pass key after 0..{probe['items']} of {probe['items']} filler sentences"
                if probe["format"] == "passkey" else f"{probe['items']} key-value pairs")
        parts.append(f"### Retrieval accuracy ({probe['format']}: {probe['num_probes']} probes "
                     f"of ~{probe['mean_prompt_tokens']:.0f} tokens, {what}, prompt chunk "
                     f"{probe['chunk']}; full cache: {probe['full_accuracy']:.0%})\n\n")
        parts.append(_header(budgets))
        for name, row in probe["table"].items():
            cells = []
            for c in row.values():
                if c["accuracy"] is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{c['accuracy']:.2f} ({sum(c['correct'])}/{len(c['correct'])})")
            parts.append(f"| {name} | " + " | ".join(cells) + " |\n")
        parts.append("\n")
        if probe["full_accuracy"] == 0:
            parts.append("**Warning: the model retrieves nothing even with a full cache; "
                         "the probe measures nothing for this model.**\n\n")
        elif probe["full_accuracy"] < 0.5:
            parts.append(f"**Warning: full-cache accuracy is only "
                         f"{probe['full_accuracy']:.2f}; the probe says little for this "
                         "model.**\n\n")
    return "".join(parts)


def _plot_policies(ax, table: dict, metric: str, xlabel: str, title: str,
                   ylabel: Optional[str] = None,
                   band: Optional[tuple[str, str]] = None) -> list[float]:
    """One line per policy of ``metric`` against the budget fraction (log2 x axis), with
    a shaded ``band`` (two cell keys: low, high) when given; returns the plotted values."""
    values = []
    for name, row in table.items():
        cells = [c for c in row.values() if c.get(metric) is not None]
        xs = [c["fraction"] for c in cells]
        ys = [c[metric] for c in cells]
        values += ys
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        if band is not None:
            low = [c[band[0]] for c in cells]
            high = [c[band[1]] for c in cells]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
            values += low + high
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return values


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("warning: matplotlib is not installed; no quality.png "
              "(pip install -e '.[eval]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    ppl = results.get("perplexity")
    if ppl:
        backend = "reference" if "reference" in ppl["tables"] else next(iter(ppl["tables"]))
        table = ppl["tables"][backend]
        n, length = ppl["windows"], results["settings"]["length"]
        values = _plot_policies(left, table, "perplexity", "cache budget C / N",
                                f"Perplexity ({backend}, {n} x {length} tokens;\n"
                                "band: per-window min..max)",
                                band=("window_ppl_min", "window_ppl_max"))
        if values and max(values) / min(values) > 20:
            left.set_yscale("log")
        ratios = _plot_policies(middle, table, "ratio_to_full", "cache budget C / N",
                                "Perplexity / full-cache perplexity, paired by window\n"
                                "(band: per-window min..max)",
                                ylabel="perplexity / full-cache perplexity",
                                band=("window_ratio_min", "window_ratio_max"))
        if ratios and max(ratios) > 3:  # a policy that breaks down would flatten the rest
            middle.set_yscale("log")
    else:
        left.set_axis_off()
        middle.set_axis_off()
    probe = results.get("retrieval")
    if probe:
        _plot_policies(right, probe["table"], "accuracy", "cache budget C / probe length",
                       f"Retrieval: {probe['format']} (~{probe['probe_length']} tokens)\n"
                       f"full cache: {probe['full_accuracy']:.0%}",
                       ylabel="exact-match accuracy")
        right.set_ylim(-0.05, 1.05)
    else:
        right.set_axis_off()
    fig.suptitle(Path(results["model"]).name or results["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main

def _load_model(path: str, args):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation="eager")
    return model.to(args.device).eval()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    started = time.time()
    args = parse_args(argv)
    command = "python3 scripts/eval_quality.py " + shlex.join(
        list(argv) if argv is not None else sys.argv[1:])

    import torch
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id
    byte_level = is_byte_level(tokenizer)
    model_path = args.model
    results: dict[str, Any] = {
        "model": model_path,
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokenizer": {"bos_token_id": bos, "vocab": len(tokenizer), "byte_level": byte_level},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    model = None
    if not args.skip_ppl:
        budgets = parse_budgets(args.budgets, args.length)
        body = args.length - (bos is not None)
        needed = (body * args.num_windows if args.window_stride is None
                  else (args.num_windows - 1) * args.window_stride + body)
        stream, text_info = load_token_stream(tokenizer, args, needed)
        windows = make_windows(stream, args.num_windows, args.length, bos,
                               spread=text_info["spread"], stride=args.window_stride)
        nlls: dict[str, dict] = {}
        if args.backend in ("vllm", "both"):
            print(f"vLLM: {len(windows)} windows x {len(budgets)} budgets", flush=True)
            nlls["vllm"] = ppl_vllm(model_path, windows, args.policies, budgets, args)
        model = _load_model(model_path, args)
        if args.backend in ("reference", "both"):
            cells = sum(
                1 for b in budgets for n in (["*"] if b.full else args.policies)
                if n == "*" or not _budget_error(n, b, args)
            ) * len(windows)
            bar = Progress(cells, "perplexity")
            nlls["reference"] = ppl_reference(model, windows, args.policies, budgets, args,
                                              bar)
            bar.close()

        # Sanity: the full budget evicts nothing and must equal a plain forward pass.
        tol = args.sanity_tol or (2e-3 if args.dtype == "float32" else 0.1)
        plain = hf_logprobs(model, windows[0]).double()
        sanity = {"tolerance": tol, "max_abs_diff": 0.0}
        for backend, table in nlls.items():
            full = table[("*", args.length)][0]
            diff = float((full + plain).abs().max())  # full holds NLL = -logprob
            sanity[f"max_abs_diff_{backend}"] = diff
            sanity["max_abs_diff"] = max(sanity["max_abs_diff"], diff)
        assert sanity["max_abs_diff"] <= tol, (
            f"full-budget logprobs differ from a plain Hugging Face forward by "
            f"{sanity['max_abs_diff']:.3g} > {tol:.3g}")

        ppl: dict[str, Any] = {
            "budgets": [vars(b) for b in budgets],
            "windows": len(windows),
            "scored_tokens": len(windows) * (args.length - 1),
            "byte_level": byte_level,
            "text": text_info,
            "window_token_ids": windows,
            "sanity": sanity,
            "tables": {backend: summarize_ppl(table, windows, args.policies, budgets, args,
                                              byte_level, args.save_token_nll)
                       for backend, table in nlls.items()},
        }
        if len(nlls) == 2:
            token_diff, rel = 0.0, 0.0
            for key, ref in nlls["reference"].items():
                eng = nlls["vllm"][key]
                token_diff = max(token_diff, max(float((a - b).abs().max())
                                                 for a, b in zip(ref, eng)))
                r = sum(float(t.sum()) for t in ref) / sum(t.numel() for t in ref)
                e = sum(float(t.sum()) for t in eng) / sum(t.numel() for t in eng)
                rel = max(rel, abs(math.exp(e - r) - 1))
            ppl["engine_vs_reference"] = {"max_abs_token_nll_diff": token_diff,
                                          "max_rel_ppl_diff": rel}
        results["perplexity"] = ppl

    if not args.skip_probe:
        if model is None:
            model = _load_model(model_path, args)
        budgets = parse_budgets(args.probe_budgets, args.probe_length)
        probes = build_probes(tokenizer, args)
        cells = sum(1 for b in budgets for n in (["*"] if b.full else args.policies)
                    if n == "*" or not _budget_error(n, b, args)) * len(probes)
        bar = Progress(cells, "retrieval")
        raw = run_probes(model, tokenizer, probes, args.policies, budgets, args, bar)
        bar.close()
        table = summarize_probes(raw, probes, args.policies, budgets, args)
        full_acc = next(iter(table.values()))[str(args.probe_length)]["accuracy"]
        results["retrieval"] = {
            "budgets": [vars(b) for b in budgets],
            "probe_length": args.probe_length,
            "num_probes": len(probes),
            "chunk": args.probe_chunk,
            "format": args.probe_format,
            "items": probes[0]["items"],
            "mean_prompt_tokens": sum(len(p["prompt_ids"]) for p in probes) / len(probes),
            "full_accuracy": full_acc,
            "probes": [{k: p[k] for k in ("key", "value", "index", "depth")}
                       | {"prompt_tokens": len(p["prompt_ids"]),
                          "answer_ids": p["answer_ids"]} for p in probes],
            "table": table,
        }

    results["wall_time_s"] = time.time() - started
    tables = markdown_tables(results)
    print()
    print(tables)
    if results.get("retrieval") and results["retrieval"]["full_accuracy"] == 0:
        print("NOTE: full-cache retrieval accuracy is 0: this model cannot do the probe, "
              "so the probe measures nothing here.")
    md = (f"# KV-cache eviction quality: `{model_path}`\n\n"
          f"Command:\n\n```\n{command}\n```\n\n{tables}"
          f"Wall time: {results['wall_time_s']:.1f} s.\n")
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    wrote = ["results.json", "results.md"]
    if plot(results, args.out / "quality.png"):
        wrote.append("quality.png")
    print(f"wrote {', '.join(str(args.out / w) for w in wrote)} "
          f"({results['wall_time_s']:.1f} s)")
    return results


if __name__ == "__main__":  # vLLM spawns processes
    main()
