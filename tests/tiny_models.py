"""Tiny offline checkpoints of the Llama family, for tests that may not touch the hub.

``build_tiny_model(arch, out_dir)`` writes a complete Hugging Face checkpoint directory
(config, generation config, fp32 safetensors, byte-level tokenizer with a chat template)
that both ``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM's ``LLM(model=...)``
load.

The weights are random but *shaped* so that tests mean something:

* Query and key projections are scaled up so that attention is peaked.  With the usual
  small init every attention row is nearly uniform, TOVA's scores are near-ties, and
  whether the engine and the reference keep the same tokens would hinge on rounding.
* ``lm_head`` is scaled up so that the greedy token wins by a clear logit margin and two
  fp32 implementations (HF, the reference, vLLM's CPU kernels) agree token for token.

Both scales stay moderate on purpose: attention logits spread over a few units, not
hundreds, so no softmax weight underflows to an exact 0 (which would create real ties).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# The byte-level tokenizer (ids = byte + 3) is the one the offline training script uses.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from byte_tokenizer import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    save_byte_tokenizer,
)

# Architectures every test grid runs over.  ``EXTRA_ARCHS`` are buildable too but only
# used where a feature needs them (Qwen3's per-head q/k RMSNorm in the reference).
ARCHS = ("llama_mha", "llama_gqa", "qwen2", "mistral")
EXTRA_ARCHS = ("qwen3",)

# Target standard deviation of the pre-softmax attention logits q.k*scale, and of the
# output logits.  Measured effect on these models: the last query's largest attention
# weight sits far above uniform (see tests/test_tiny_models.py), and the greedy margin is
# usually more than one logit.
_ATTN_LOGIT_STD = 3.0
_OUTPUT_LOGIT_STD = 10.0


@dataclass(frozen=True)
class TinySpec:
    model_type: str
    architecture: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 32  # vLLM's CPU attention supports head sizes 32, 64, 80, ...
    num_layers: int = 2
    intermediate_size: int = 256


SPECS: dict[str, TinySpec] = {
    "llama_mha": TinySpec("llama", "LlamaForCausalLM", 128, 4, 4),
    "llama_gqa": TinySpec("llama", "LlamaForCausalLM", 256, 8, 2),
    "qwen2": TinySpec("qwen2", "Qwen2ForCausalLM", 128, 4, 2),
    "mistral": TinySpec("mistral", "MistralForCausalLM", 128, 4, 2),
    "qwen3": TinySpec("qwen3", "Qwen3ForCausalLM", 128, 4, 2),
}


def _config(spec: TinySpec):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    if spec.model_type in ("mistral", "qwen2", "qwen3"):
        # Sliding-window attention is out of TOVA's scope; keep every layer full.
        kwargs.update(sliding_window=None)
    if spec.model_type in ("qwen2", "qwen3"):
        kwargs.update(use_sliding_window=False)
    config = AutoConfig.for_model(spec.model_type, **kwargs)
    config.architectures = [spec.architecture]
    return config


@torch.no_grad()
def _init_weights(model, spec: TinySpec, generator: torch.Generator) -> None:
    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

    # q and k each get std sqrt(s / hidden): a unit-RMS input then gives q.k*scale with
    # std about s (the head_dim factors cancel against the 1/sqrt(head_dim) scale).
    qk_std = (_ATTN_LOGIT_STD / spec.hidden_size) ** 0.5
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)
        if "q_norm" in name or "k_norm" in name:
            # Qwen3 normalizes q and k per head, which undoes the projection scale: the
            # norm weights set the logit spread instead (std about w_q * w_k).
            w = _ATTN_LOGIT_STD**0.5 * (0.5 + torch.rand(param.shape, generator=generator))
            param.copy_(w)
        elif name.endswith("norm.weight"):
            # Not all ones, so that a forward that skipped a norm's weight would show.
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        elif leaf[-1] == "bias":
            normal_(param, 0.5)
        elif "q_proj" in name or "k_proj" in name:
            normal_(param, qk_std)
        elif "lm_head" in name:
            normal_(param, _OUTPUT_LOGIT_STD / spec.hidden_size**0.5)
        elif "embed_tokens" in name:
            normal_(param, 1.0)
        else:
            normal_(param, param.shape[-1] ** -0.5)


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``arch`` (one of ``ARCHS + EXTRA_ARCHS``) to
    ``out_dir`` and return it.  Deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in SPECS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(SPECS)}")
    spec = SPECS[arch]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = _config(spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    _init_weights(model, spec, generator)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    save_byte_tokenizer(out_dir, model_max_length=4096)

    # Which tiny arch a directory holds, for humans and for test ids.
    (out_dir / "tiny_model.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out_dir
