"""What a TOVA budget buys, before a server starts: ``python -m tova_vllm budget ...``.

The block counts come from the same functions the scheduler uses (``peak_table_blocks``
and ``EvictionSchedule`` in ``tova_vllm.policies``, which ``TovaSpec`` and ``TovaManager``
call), so the figures here are the ones the engine will apply.  The
model is read from its ``config.json`` only: no vLLM import, no weights.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import PROMPT_MODES, TovaSettings
from .policies import EvictionSchedule, cdiv, peak_table_blocks

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}


@dataclass(frozen=True)
class KVShape:
    """The KV-cache shape of a decoder-only model, per token and layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    dtype: str  # the checkpoint's dtype, what vLLM's kv_cache_dtype="auto" follows

    @classmethod
    def from_config_dir(cls, path: Path) -> "KVShape":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise SystemExit(f"tova-vllm budget: no config.json in {path} (pass a local "
                             "model directory to --model)")
        raw = json.loads(config_file.read_text())
        text = raw.get("text_config", raw)  # multimodal wrappers nest the language model
        heads = text["num_attention_heads"]
        return cls(
            num_layers=text["num_hidden_layers"],
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            max_model_len=text.get("max_position_embeddings", 0),
            dtype=_dtype_name(str(text.get("torch_dtype") or text.get("dtype") or "float32")),
        )

    def block_bytes(self, block_size: int, dtype: str) -> int:
        """One block over all layers: K and V, like vLLM's FullAttentionSpec page x layers."""
        return 2 * block_size * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype] * (
            self.num_layers
        )


@dataclass(frozen=True)
class RequestNeed:
    """Blocks one request holds: at its peak (the prompt) and while decoding."""

    peak_blocks: int
    decode_blocks: int


def cached_tokens(prompt_len: int, max_tokens: int) -> int:
    """Tokens a request has computed when it finishes (the last sampled one never enters
    the cache)."""
    return prompt_len + max(max_tokens - 1, 0)


def vanilla_need(prompt_len: int, max_tokens: int, block_size: int) -> RequestNeed:
    # Without eviction the end of the request is its peak.
    blocks = cdiv(cached_tokens(prompt_len, max_tokens), block_size)
    return RequestNeed(blocks, blocks)


def tova_need(settings: TovaSettings, prompt_len: int, max_tokens: int,
              block_size: int, copy_on_write: bool = True) -> RequestNeed:
    """The scheduler's own arithmetic (TovaManager), step by step: the prompt scheduled as
    one chunk, then one token per step; before each step the manager frees what
    ``held_table`` allows for the tokens processed so far and allocates ``table_blocks``
    entries.  While decoding a request holds at most ceil((C + 1) / block_size) blocks;
    with copy-on-write (prefix caching on) its peak is at the first eviction."""
    schedule = EvictionSchedule(settings.cache_size, prompt_len, settings.eviction_chunk)
    steps = [(0, prompt_len)] + [(prompt_len + j, 1) for j in range(max_tokens - 1)]
    held: set[int] = set()
    entries = peak = 0
    for start, num_new in steps:
        low, high = schedule.held_table(start, block_size, copy_on_write)
        held = {e for e in held if e >= low and (high is None or e < high)}
        wanted = schedule.table_blocks(start, num_new, block_size, copy_on_write)
        held.update(range(entries, wanted))
        entries = max(entries, wanted)
        peak = max(peak, len(held))
    return RequestNeed(peak, len(held))


def startup_concurrency(num_blocks: int, blocks_per_request: int) -> float:
    """vLLM's start-up "Maximum concurrency for N tokens per request" figure."""
    return num_blocks / blocks_per_request


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000)")
    value, unit = float(match[1]), (match[2] or "B").upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
    return int(value * scale)


def _dtype_name(name: str) -> str:
    name = name.replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise SystemExit(f"tova-vllm budget: KV dtype {name!r} is not one TOVA runs with "
                         f"(choose --kv-dtype from {sorted(DTYPE_BYTES)}; TOVA refuses "
                         "quantized KV caches)")
    return name


def _human(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    raise AssertionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tova_vllm budget",
        description="Blocks, bytes and concurrency of one request with and without TOVA, "
        "computed the way vLLM's scheduler and TOVA's KV manager compute them.")
    parser.add_argument("--model", required=True, type=Path, help="local model directory "
                        "(its config.json is read)")
    parser.add_argument("--kv-dtype", default="auto",
                        help="auto (the checkpoint's dtype, vLLM's default), float32, "
                        "bfloat16 or float16; pass what you give vLLM as --dtype")
    parser.add_argument("--block-size", type=int, default=16, help="vLLM --block-size")
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--num-blocks", type=int,
                      help="KV pool size in blocks (vLLM --num-gpu-blocks-override)")
    pool.add_argument("--kv-memory", type=parse_bytes,
                      help="KV pool memory, e.g. 4GiB (vLLM --kv-cache-memory-bytes; on CPU "
                      "VLLM_CPU_KVCACHE_SPACE in GiB)")
    parser.add_argument("--max-model-len", type=int,
                        help="vLLM --max-model-len (default: the model's "
                        "max_position_embeddings)")
    parser.add_argument("--cache-size", type=int, required=True, help='TOVA C '
                        '(additional_config["tova"]["cache_size"])')
    parser.add_argument("--prompt-mode", default="prompt", choices=PROMPT_MODES)
    parser.add_argument("--prompt-chunk", type=int, default=512)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="as vLLM's flag (on by default): TOVA then "
                        "evicts copy-on-write, whose first eviction briefly holds more")
    parser.add_argument("--prompt-len", type=int, required=True, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, required=True, help="generated tokens")
    return parser


@dataclass(frozen=True)
class BudgetReport:
    block_bytes: int
    num_blocks: int
    max_model_len: int
    vanilla: RequestNeed
    tova: RequestNeed
    vanilla_startup_blocks: int
    tova_startup_blocks: int

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1  # vLLM's block pool keeps one null block

    def fit(self, need: RequestNeed) -> int:
        """Requests decoding at once from the pool (each past its prompt)."""
        return self.usable_blocks // need.decode_blocks


def plan(args: argparse.Namespace) -> BudgetReport:
    shape = KVShape.from_config_dir(args.model)
    dtype = shape.dtype if args.kv_dtype == "auto" else _dtype_name(args.kv_dtype)
    max_model_len = args.max_model_len or shape.max_model_len
    if not max_model_len:
        raise SystemExit("tova-vllm budget: the config has no max_position_embeddings; "
                         "pass --max-model-len")
    if args.prompt_len + args.max_tokens > max_model_len:
        raise SystemExit(f"tova-vllm budget: --prompt-len + --max-tokens "
                         f"({args.prompt_len + args.max_tokens}) exceeds --max-model-len "
                         f"({max_model_len})")
    # The server-side validation, with the same messages vLLM start-up would print.
    settings = TovaSettings.parse({"cache_size": args.cache_size,
                                   "prompt_mode": args.prompt_mode,
                                   "prompt_chunk": args.prompt_chunk})
    block_bytes = shape.block_bytes(args.block_size, dtype)
    num_blocks = args.num_blocks if args.num_blocks is not None else args.kv_memory // block_bytes
    return BudgetReport(
        block_bytes=block_bytes, num_blocks=num_blocks, max_model_len=max_model_len,
        vanilla=vanilla_need(args.prompt_len, args.max_tokens, args.block_size),
        tova=tova_need(settings, args.prompt_len, args.max_tokens, args.block_size,
                       args.enable_prefix_caching),
        vanilla_startup_blocks=cdiv(max_model_len, args.block_size),
        tova_startup_blocks=peak_table_blocks(settings.cache_size, settings.eviction_chunk,
                                              max_model_len, args.block_size,
                                              args.enable_prefix_caching),
    )


def render(args: argparse.Namespace, report: BudgetReport) -> str:
    mode = args.prompt_mode + (f" (prompt_chunk={args.prompt_chunk})"
                               if args.prompt_mode == "chunked" else "")
    rows = [
        ("blocks per request, peak", report.vanilla.peak_blocks,
         report.tova.peak_blocks),
        ("blocks per request, decoding", report.vanilla.decode_blocks,
         report.tova.decode_blocks),
        ("bytes per request, peak", _human(report.vanilla.peak_blocks * report.block_bytes),
         _human(report.tova.peak_blocks * report.block_bytes)),
        ("bytes per request, decoding", _human(report.vanilla.decode_blocks * report.block_bytes),
         _human(report.tova.decode_blocks * report.block_bytes)),
        ("requests decoding at once", report.fit(report.vanilla), report.fit(report.tova)),
        (f"vLLM start-up 'Maximum concurrency' ({report.max_model_len} tokens)",
         f"{startup_concurrency(report.num_blocks, report.vanilla_startup_blocks):.2f}x",
         f"{startup_concurrency(report.num_blocks, report.tova_startup_blocks):.2f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"model {args.model}: KV block of {args.block_size} tokens = "
        f"{_human(report.block_bytes)} over all layers",
        f"pool: {report.num_blocks} blocks ({report.usable_blocks} usable; "
        f"{_human(report.num_blocks * report.block_bytes)})",
        f"request: {args.prompt_len} prompt + {args.max_tokens} generated tokens; "
        f"TOVA cache_size={args.cache_size}, prompt_mode={mode}, prefix caching "
        + ("on (copy-on-write)" if args.enable_prefix_caching else "off"),
        f"{'':{width}}  {'vanilla':>12}  {'TOVA':>12}",
    ]
    lines += [f"{name:{width}}  {str(v):>12}  {str(t):>12}" for name, v, t in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    print(render(args, plan(args)))
