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

The parts live beside this file: ``quality_text.py`` (text and windows),
``quality_ppl.py`` (perplexity), ``quality_probes.py`` (retrieval probe),
``quality_report.py`` (tables, plot) and ``quality_common.py`` (budgets, progress).

Examples::

    python3 scripts/eval_quality.py --model PATH                      # full study
    python3 scripts/eval_quality.py --model PATH --quick              # smoke test
    python3 scripts/eval_quality.py --model PATH --backend both \\
        --policies tova,window --budgets 1/8,1/4,full                  # engine == reference
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # the study's modules, the byte model's corpus split

from tova_vllm.policies import POLICY_NAMES as POLICIES  # noqa: E402

# The study's parts; book_path, book_text and the PASSKEY_ texts are re-exported as the
# study's API (tests read them here).
from quality_common import parse_budgets, Progress, budget_error  # noqa: E402
from quality_text import (  # noqa: E402,F401
    book_path, book_text, is_byte_level, load_token_stream, make_windows)
from quality_ppl import hf_logprobs, ppl_reference, ppl_vllm, summarize_ppl  # noqa: E402
from quality_probes import (  # noqa: E402,F401
    PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION, build_probes, run_probes,
    summarize_probes)
from quality_report import markdown_tables, plot  # noqa: E402

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
                if n == "*" or not budget_error(n, b, args)
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
                    if n == "*" or not budget_error(n, b, args)) * len(probes)
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
