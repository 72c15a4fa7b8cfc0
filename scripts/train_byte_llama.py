#!/usr/bin/env python3
"""Train a small byte-level Llama on the Python standard library's sources (CPU).

The corpus is on every machine: all ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``,
sorted by path, without ``test``/``tests``/``idlelib``/``site-packages`` directories.  About
2% of the files (chosen by a hash of their relative path) are held out for validation.

Tokens are bytes: id 0 <pad>, 1 <s>, 2 </s>, and id = byte + 3 for the 256 bytes (see
``scripts/byte_tokenizer.py``).  The training stream is every train file followed by </s>;
each training sequence is <s> followed by ``seq_len`` contiguous stream tokens (a quarter of
them start at a file's first byte, the rest at a uniformly random offset).

Training is bounded by wall-clock time (``--minutes``): the step time of the first steps sets
the cosine schedule's total step count, which is re-estimated as training goes and recorded.
Pass ``--steps`` for a fixed schedule (fully deterministic given ``--seed``).

The output directory is a Hugging Face checkpoint (config.json, generation_config.json,
model.safetensors, tokenizer files) that transformers and vLLM load, plus
``training_summary.json``.

    python3 scripts/train_byte_llama.py --out build/byte-llama --minutes 30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byte_tokenizer import (  # noqa: E402
    BOS_ID,
    BYTE_OFFSET,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    save_byte_tokenizer,
)

EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages"}
VAL_MODULUS = 50  # 1 file in 50 (~2%) goes to validation
LN2 = math.log(2.0)
MAX_CHECKPOINT_BYTES = 20_000_000


# ----------------------------------------------------------------------------- data


def corpus_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or not p.is_file():
            continue
        files.append(p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def is_val(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % VAL_MODULUS == 0


def build_stream(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate files as token ids (byte + 3), each followed by </s>.
    Returns (int64 stream, int64 start offsets of the files)."""
    parts, starts, pos = [], [], 0
    eos = np.array([EOS_ID], dtype=np.int16)
    for p in paths:
        ids = np.frombuffer(p.read_bytes(), dtype=np.uint8).astype(np.int16) + BYTE_OFFSET
        starts.append(pos)
        parts += [ids, eos]
        pos += len(ids) + 1
    stream = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return stream, torch.tensor(starts, dtype=torch.int64)


class Sampler:
    """Deterministic random training batches of shape (B, seq_len + 1): <s> + window."""

    def __init__(self, stream, starts, seq_len, batch_size, seed, doc_start_frac=0.25):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.max_off = len(stream) - seq_len
        self.starts = starts[starts <= self.max_off]
        self.doc_start_frac = doc_start_frac
        self.g = torch.Generator().manual_seed(seed + 1)
        self.ar = torch.arange(seq_len)

    def next(self) -> torch.Tensor:
        b = self.batch_size
        offs = torch.randint(0, self.max_off + 1, (b,), generator=self.g)
        at_start = torch.rand(b, generator=self.g) < self.doc_start_frac
        doc = self.starts[torch.randint(0, len(self.starts), (b,), generator=self.g)]
        offs = torch.where(at_start, doc, offs)
        windows = self.stream[offs[:, None] + self.ar]
        bos = torch.full((b, 1), BOS_ID, dtype=torch.int64)
        return torch.cat([bos, windows], dim=1)


def val_batches(stream, seq_len, max_tokens):
    """Non-overlapping windows of the validation stream, each prefixed by <s>."""
    n = min(len(stream) // seq_len, max(1, max_tokens // seq_len))
    w = stream[: n * seq_len].view(n, seq_len)
    return torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.int64), w], dim=1)


# ---------------------------------------------------------------------------- model


def make_config(args):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    config._attn_implementation = "sdpa"
    return config


def lm_loss(model, tokens, autocast: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of tokens[:, 1:] given tokens[:, :-1]."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, batches, batch_size, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        x = batches[i : i + batch_size]
        n = x[:, 1:].numel()
        total += lm_loss(model, x, autocast).item() * n
        count += n
    model.train()
    return total / max(count, 1) / LN2


def lr_at(step, total, peak, warmup, min_ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/byte-llama", type=Path)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=None,
                    help="fixed number of steps (schedule and stop); overrides --minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--val-max-tokens", type=int, default=500_000)
    ap.add_argument("--bf16-autocast", action="store_true",
                    help="bf16 autocast (measured ~4x slower than fp32 on CPUs without "
                         "AVX512-BF16/AMX, so off by default)")
    ap.add_argument("--timing-steps", type=int, default=5,
                    help="steps (after the first) whose mean time sets the initial schedule")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    from transformers import GenerationConfig, LlamaForCausalLM

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    # Data.
    root, files = corpus_files()
    rels = [p.relative_to(root).as_posix() for p in files]
    val_files = [p for p, r in zip(files, rels) if is_val(r)]
    train_files = [p for p, r in zip(files, rels) if not is_val(r)]
    train_stream, train_starts = build_stream(train_files)
    val_stream, _ = build_stream(val_files)
    val_data = val_batches(val_stream, args.seq_len, args.val_max_tokens)
    print(f"corpus {root}: {len(files)} files; train {len(train_files)} files "
          f"{len(train_stream):,} tokens, val {len(val_files)} files {len(val_stream):,} "
          f"tokens ({val_data[:, 1:].numel():,} evaluated)", flush=True)
    sampler = Sampler(train_stream, train_starts, args.seq_len, args.batch_size, args.seed)

    # Model.
    config = make_config(args)
    model = LlamaForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB fp32)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    # Schedule: a fixed --steps, or an estimate from the budget that is refined as we go.
    budget_s = args.minutes * 60.0
    fixed = args.steps is not None
    total_steps = args.steps if fixed else 10**9  # set after the timing steps
    tokens_per_step = args.batch_size * args.seq_len

    bar = tqdm(total=total_steps if fixed else None, mininterval=5, dynamic_ncols=True,
               file=sys.stdout) if tqdm else None
    losses, history, step_times = [], [], []
    ema = None
    step = 0
    t_train = time.time()
    last_print = t_train
    while step < total_steps:
        elapsed = time.time() - t_train
        if not fixed and elapsed >= budget_s:
            break
        t0 = time.time()
        lr = lr_at(step, total_steps if step > args.timing_steps or fixed else 10**9,
                   args.lr, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.next()
        loss = lm_loss(model, x, args.bf16_autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        dt = time.time() - t0
        step_times.append(dt)
        bpb = loss.item() / LN2
        losses.append(bpb)
        ema = bpb if ema is None else 0.95 * ema + 0.05 * bpb
        if step % 10 == 0 or step == 1:
            history.append([step, round(bpb, 4), round(lr, 6)])

        if not fixed:
            elapsed = time.time() - t_train
            if step == 1 + args.timing_steps:
                mean = sum(step_times[1:]) / len(step_times[1:])
                total_steps = max(step + 1, int(step + (budget_s - elapsed) / mean))
                print(f"step time {mean:.2f}s -> schedule over {total_steps} steps", flush=True)
            elif step > args.timing_steps and step % 25 == 0 and step < 0.95 * total_steps:
                recent = step_times[-100:]
                mean = sum(recent) / len(recent)
                total_steps = max(step + 1, int(step + (budget_s - elapsed) / mean))
            if bar is not None and step > args.timing_steps:
                bar.total = total_steps
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bpb=f"{ema:.3f}", lr=f"{lr:.2e}", gn=f"{gnorm:.2f}",
                            tok_s=f"{tokens_per_step / dt:.0f}", refresh=False)
        elif time.time() - last_print > 30 or step == 1:
            last_print = time.time()
            print(f"step {step}/{total_steps} bpb {ema:.3f} lr {lr:.2e} "
                  f"{tokens_per_step / dt:.0f} tok/s", flush=True)
    if bar is not None:
        bar.close()
    train_wall = time.time() - t_train
    tail = losses[-50:]
    final_train_bpb = sum(tail) / max(len(tail), 1)
    print(f"trained {step} steps ({step * tokens_per_step:,} tokens) in {train_wall:.0f}s; "
          f"train bpb (last {len(tail)} steps) {final_train_bpb:.4f}", flush=True)

    # Validation.
    t0 = time.time()
    val_bpb = evaluate(model, val_data, args.batch_size, args.bf16_autocast)
    print(f"val bits/byte {val_bpb:.4f} ({time.time() - t0:.0f}s)", flush=True)

    # Save.
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tok = save_byte_tokenizer(out, model_max_length=config.max_position_embeddings)
    saved_dtype = "float32"
    if dir_size(out) > MAX_CHECKPOINT_BYTES:
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        model.float()
        saved_dtype = "bfloat16"

    # A greedy sample, for eyeballing.
    prompt = "import os\n\n\ndef read_file(path):\n"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=200, do_sample=False)
    sample = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    print("sample:\n" + prompt + sample, flush=True)

    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_config": json.loads(config.to_json_string()),
        "n_params": n_params,
        "saved_dtype": saved_dtype,
        "checkpoint_bytes": dir_size(out),
        "steps": step,
        "schedule_total_steps": total_steps,
        "step_count_from_wall_clock": not fixed,
        "tokens_seen": step * tokens_per_step,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "mean_step_s": round(sum(step_times) / max(len(step_times), 1), 3),
        "final_train_bpb": round(final_train_bpb, 4),
        "val_bpb": round(val_bpb, 4),
        "val_tokens_evaluated": int(val_data[:, 1:].numel()),
        "corpus": {
            "root": str(root),
            "files": len(files),
            "train_files": len(train_files),
            "train_tokens": len(train_stream),
            "val_files": [p.relative_to(root).as_posix() for p in val_files],
            "val_tokens": len(val_stream),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "val_rule": f"sha256(relative path) % {VAL_MODULUS} == 0",
        },
        "tokenizer": "byte-level; id 0 <pad>, 1 <s>, 2 </s>, id = byte + 3",
        "sample_prompt": prompt,
        "sample_greedy": sample,
        "train_bpb_history": history,
        "threads": threads,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} ({summary['checkpoint_bytes'] / 1e6:.2f} MB, {saved_dtype})", flush=True)


if __name__ == "__main__":
    main()
