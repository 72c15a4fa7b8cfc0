"""The tiny checkpoints are complete, offline, and shaped so that eviction tests mean something."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer
from safetensors.torch import load_file

from tiny_models import (
    ARCHS,
    BOS_ID,
    EOS_ID,
    EXTRA_ARCHS,
    PAD_ID,
    SPECS,
    VOCAB_SIZE,
    build_tiny_model,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ALL_ARCHS = ARCHS + EXTRA_ARCHS


def _random_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (1, n), generator=g)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_checkpoint_is_complete(tiny_models, arch):
    path = tiny_models[arch]
    files = ["config.json", "generation_config.json", "model.safetensors"]
    for name in files + ["tokenizer.json", "tokenizer_config.json"]:
        assert (path / name).is_file(), name

    spec = SPECS[arch]
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [spec.architecture]
    assert config.head_dim in (32, 64)  # vLLM's CPU attention kernel sizes
    assert config.head_dim == spec.head_dim and config.num_attention_heads == spec.num_heads
    assert config.num_key_value_heads == spec.num_kv_heads
    assert config.num_hidden_layers == 2
    assert config.tie_word_embeddings is False
    assert config.eos_token_id == EOS_ID and config.bos_token_id == BOS_ID
    assert getattr(config, "sliding_window", None) is None
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"

    weights = load_file(path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert weights["lm_head.weight"].shape == (VOCAB_SIZE, config.hidden_size)
    if arch == "qwen2":
        bias = weights["model.layers.0.self_attn.q_proj.bias"]
        assert bias.abs().min() > 0 and bias.std() > 0.1


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tokenizer_round_trips_bytes(tiny_models, arch):
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    text = "TOVA keeps tokens, 12345!"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and len(ids) == 1 + len(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == "<s>user: hi\nassistant: "


def test_build_is_deterministic_in_seed(tmp_path):
    a = load_file(build_tiny_model("llama_mha", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model("llama_mha", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny_model("llama_mha", tmp_path / "c", seed=4) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_unknown_arch_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_tiny_model("gpt2", tmp_path)


@pytest.mark.parametrize("n", [64, 200])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attention_is_peaked(hf_models, arch, n):
    """The last query's attention is far from uniform in every layer.

    Measured: each head's largest weight, averaged over heads, is 26x-112x uniform; the
    head-mean (TOVA's score) peaks at 7x-47x uniform.
    """
    with torch.no_grad():
        out = hf_models[arch](_random_ids(n, seed=n), output_attentions=True)
    for layer, attn in enumerate(out.attentions):
        last_row = attn[0, :, -1].float()  # [heads, n]
        per_head_peak = last_row.max(dim=-1).values.mean().item()
        score_peak = last_row.mean(dim=0).max().item()
        assert per_head_peak > 10.0 / n, (layer, per_head_peak * n)
        assert score_peak > 4.0 / n, (layer, score_peak * n)
        # Peaked, yet nothing underflows to an exact tie at zero.
        assert last_row.min().item() > 0.0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_logits_are_decisive(hf_models, arch):
    with torch.no_grad():
        logits = hf_models[arch](_random_ids(128, seed=7)).logits[0].float()
    top2 = logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    assert margin.median().item() > 1.0
    assert (margin > 1e-3).float().mean().item() > 0.98
