"""The quality study's text: the book (or the byte model's held-out files, or any
file), tokenized and cut into windows (``scripts/eval_quality.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from train_byte_llama import corpus_files, is_val


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


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def load_token_stream(tokenizer, args, needed: int) -> tuple[list[int], dict]:
    """Token ids (no special tokens but file separators) of the evaluation text, at least
    ``needed`` long."""
    if args.text_file is not None:
        text = args.text_file.read_text(encoding="utf-8", errors="replace")
        ids = encode(tokenizer, text)
        info = {"source": str(args.text_file), "chars": len(text), "spread": True}
        if len(ids) < needed:
            raise SystemExit(f"--text-file has {len(ids)} tokens; {needed} are needed "
                             "(lower --num-windows or --length)")
        return ids, info
    if args.text == "book":
        path = book_path()
        if path is not None:
            text = book_text(path)
            ids = encode(tokenizer, text)
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
    separator = [eos] if eos is not None else encode(tokenizer, "\n\n")
    ids: list[int] = []
    used: list[str] = []
    for path in files:
        try:
            body = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not body.strip():
            continue
        ids += encode(tokenizer, body) + separator
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
