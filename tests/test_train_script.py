"""scripts/train_byte_llama.py: a two-step run on a tiny shape writes a checkpoint that
transformers loads, with a tokenizer whose ids are bytes + 3, and a training summary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_byte_llama.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_byte_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_two_step_run_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = _load_script()
    out = tmp_path / "ckpt"
    threads = torch.get_num_threads()
    try:
        trainer.main(["--out", str(out), "--steps", "2", "--seq-len", "64", "--batch-size", "2",
                      "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                      "--intermediate", "64", "--val-max-tokens", "2048",
                      "--warmup-steps", "1", "--timing-steps", "1"])
    finally:
        torch.set_num_threads(threads)  # the trainer takes every core
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 259 and model.config.num_hidden_layers == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [b + 3 for b in text.encode()]
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([[1] + ids])).logits
    assert torch.isfinite(logits).all()
    # The held-out split is deterministic and small (what eval_quality.py measures on).
    root, files = trainer.corpus_files()
    held_out = [p for p in files if trainer.is_val(p.relative_to(root).as_posix())]
    assert 0 < len(held_out) < len(files) // 10


def test_committed_checkpoint_is_small_and_loads():
    """models/byte-llama-stdlib (the quality study's model, README) stays under 20 MB and
    predicts Python better than chance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(__file__).resolve().parents[1] / "models" / "byte-llama-stdlib"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20_000_000
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("import os\n\n\ndef main():\n    return os.path.join(a, b)\n")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert nll.item() / 0.6931 < 4.0  # bits per byte; uniform over 259 ids is 8.0
