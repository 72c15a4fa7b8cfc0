"""scripts/eval_quality.py on a tiny model: the files it writes, and its numbers against
independent Hugging Face computations.

* Full budget: exp(mean NLL) of a plain forward pass over the same windows.
* ``window`` at budget C, one eviction per token: query t sees positions [t - C, t] (the new
  token joins C cached ones, attends, then the oldest is dropped), in every layer; that is
  a plain forward pass with a banded 4-D attention mask.  ``sink_window`` adds the first
  ``sinks`` positions to the band.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval_quality.py"
LENGTH, WINDOWS, SINKS = 48, 2, 4


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    script = _load_script()
    start = time.monotonic()
    results = script.main([
        "--model", str(tiny_models["llama_gqa"]), "--quick", "--length", str(LENGTH),
        "--num-windows", str(WINDOWS), "--budgets", "1/8,1/4,1/2,full",
        "--num-probes", "3", "--probe-length", "384", "--probe-chunk", "8",
        "--sinks", str(SINKS), "--save-token-nll", "--device", "cpu", "--out", str(out),
    ])
    print(f"eval_quality --quick on tiny llama_gqa: {time.monotonic() - start:.1f} s")
    return script, results, out


def _band_mask(length: int, recent: int, sinks: int = 0) -> torch.Tensor:
    """0 where query i may attend key j (j <= i and (j >= i - recent or j < sinks))."""
    i = torch.arange(length).view(-1, 1)
    j = torch.arange(length).view(1, -1)
    visible = (j <= i) & ((j >= i - recent) | (j < sinks))
    return torch.where(visible, 0.0, float("-inf")).view(1, 1, length, length)


def _hf_nll(model, ids, mask=None) -> torch.Tensor:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": mask}
        logits = model(tokens, **kwargs).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[:-1]
    return -logprobs.gather(1, tokens[0, 1:].unsqueeze(1))[:, 0].double()


def test_files_and_tables(study):
    script, results, out = study
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == results["model"]
    assert saved["wall_time_s"] > 0
    md = (out / "results.md").read_text()
    assert "python3 scripts/eval_quality.py" in md and "--quick" in md
    assert "| tova |" in md and "Retrieval accuracy" in md and "Perplexity" in md
    assert "Per-window perplexity" in md and "Cost against the full cache" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "quality.png").stat().st_size > 0

    ppl = saved["perplexity"]
    assert ppl["windows"] == WINDOWS and ppl["scored_tokens"] == WINDOWS * (LENGTH - 1)
    assert [b["cache_size"] for b in ppl["budgets"]] == [6, 12, 24, 48]
    windows = ppl["window_token_ids"]
    assert all(len(w) == LENGTH and w[0] == 1 for w in windows)  # the tiny tokenizer's BOS
    assert ppl["byte_level"] and ppl["sanity"]["max_abs_diff"] <= ppl["sanity"]["tolerance"]
    # C = 6 <= sinks + 2: sink_window still runs (sinks 4 < 6); every cell is filled.
    # The default text: the book when vLLM's dependency ships it, else the stdlib sources.
    book = script.book_path()
    assert ppl["text"]["source"].startswith("book") == (book is not None)
    for row in ppl["tables"]["reference"].values():
        full = row[str(LENGTH)]
        for cell in row.values():
            assert cell["perplexity"] > 0
            assert cell["bits_per_byte"] == pytest.approx(cell["mean_nll"] / math.log(2))
            # Spread over windows: windows have equal token counts, so the overall
            # perplexity is the geometric mean of the per-window ones.
            per_window = cell["window_perplexity"]
            assert len(per_window) == WINDOWS
            assert cell["window_ppl_min"] == min(per_window)
            assert cell["window_ppl_max"] == max(per_window)
            assert cell["window_ppl_std"] == pytest.approx(statistics.stdev(per_window))
            assert cell["perplexity"] == pytest.approx(math.prod(per_window) ** (1 / WINDOWS))
            assert cell["ratio_to_full"] == pytest.approx(cell["perplexity"] / full["perplexity"])
            ratios = [a / b for a, b in zip(per_window, full["window_perplexity"])]
            assert cell["window_ratio_min"] == pytest.approx(min(ratios))
            assert cell["window_ratio_max"] == pytest.approx(max(ratios))
        assert full["ratio_to_full"] == 1 and full["window_ratio_max"] == 1


def test_full_budget_is_shared_and_matches_plain_forward(study, hf_models):
    _, results, _ = study
    table = results["perplexity"]["tables"]["reference"]
    full = {name: row[str(LENGTH)]["perplexity"] for name, row in table.items()}
    assert set(full) == {"tova", "window", "sink_window", "h2o"}
    assert len(set(full.values())) == 1

    model = hf_models["llama_gqa"]
    nll = torch.cat([_hf_nll(model, w) for w in results["perplexity"]["window_token_ids"]])
    assert full["tova"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


@pytest.mark.parametrize("policy", ["window", "sink_window"])
@pytest.mark.parametrize("budget", [6, 12, 24])
def test_window_policies_match_banded_attention(study, hf_models, policy, budget):
    _, results, _ = study
    cell = results["perplexity"]["tables"]["reference"][policy][str(budget)]
    model = hf_models["llama_gqa"]
    sinks = SINKS if policy == "sink_window" else 0
    mask = _band_mask(LENGTH, budget - sinks, sinks)
    oracle = [_hf_nll(model, w, mask) for w in results["perplexity"]["window_token_ids"]]
    for got, want in zip(cell["token_nll"], oracle):
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), want, atol=2e-4, rtol=0)
    nll = torch.cat(oracle)
    assert cell["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    # Eviction changes the numbers (guards against an oracle that never evicts).
    full = results["perplexity"]["tables"]["reference"][policy][str(LENGTH)]["perplexity"]
    assert cell["perplexity"] != full


def test_probe_records(study, tiny_models):
    from transformers import AutoTokenizer

    _, results, _ = study
    probe = results["retrieval"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama_gqa"])
    assert probe["num_probes"] == 3 and probe["format"] == "passkey"
    depths = [p["depth"] for p in probe["probes"]]
    assert depths == sorted(depths) and depths[0] < 0.5 < depths[-1]
    for p in probe["probes"]:
        assert tokenizer.decode(p["answer_ids"]) == " " + p["value"]
        assert p["key"] == "pass key" and len(p["value"]) == 5
    for row in probe["table"].values():
        for cell in row.values():
            assert len(cell["correct"]) == 3 and 0 <= cell["accuracy"] <= 1
    full = {row["384"]["accuracy"] for row in probe["table"].values()}
    assert full == {probe["full_accuracy"]}
    assert "full cache:" in (study[2] / "results.md").read_text()


@pytest.mark.parametrize("fmt", ["passkey", "kv"])
def test_probe_prompts(study, tiny_models, fmt):
    """Both probe formats: the prompt holds the answer once, after the queried item, and
    ends in the question; the queried depth spreads over the prompt."""
    from transformers import AutoTokenizer

    script = study[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama_gqa"])
    args = script.parse_args(["--model", "x", "--probe-format", fmt, "--num-probes", "4",
                              "--probe-length", "600"])
    probes = script.build_probes(tokenizer, args)
    assert len(probes) == 4 and len({p["value"] for p in probes}) == 4
    for p in probes:
        prompt = tokenizer.decode(p["prompt_ids"][1:])  # after the BOS
        assert abs(len(p["prompt_ids"]) - 600) < 120
        assert tokenizer.decode(p["answer_ids"]) == " " + p["value"]
        if fmt == "passkey":
            assert prompt.count(p["value"]) == 2  # "The pass key is K. ... K is the pass key."
            assert prompt.endswith(script.PASSKEY_QUESTION)
            needle = prompt.index(script.PASSKEY_NEEDLE.format(key=p["value"]))
            assert needle == p["index"] * len(script.PASSKEY_FILLER)
        else:
            assert prompt.count(f"{p['key']} = {p['value']}\n") == 1
            assert prompt.endswith(f"assert {p['key']} ==")
    depths = [p["depth"] for p in probes]
    assert depths == sorted(depths) and depths[0] < 0.3 and depths[-1] > 0.7


def test_windows_spread_and_book_text(study, tmp_path):
    script = study[0]
    ids = list(range(100))
    assert script.make_windows(ids, 3, 11, bos=None) == [ids[0:11], ids[11:22], ids[22:33]]
    spread = script.make_windows(ids, 3, 11, bos=-1, spread=True)
    assert spread == [[-1] + ids[0:10], [-1] + ids[33:43], [-1] + ids[66:76]]
    # A fixed stride: fewer windows are the first ones of the spread.
    assert script.make_windows(ids, 2, 11, bos=-1, stride=33) == spread[:2]
    with pytest.raises(ValueError):
        script.make_windows(ids, 4, 30, bos=None)
    with pytest.raises(ValueError):
        script.make_windows(ids, 2, 11, bos=None, stride=10)  # overlapping
    book = tmp_path / "book.txt"
    book.write_text("Produced by volunteers.\n\nOPTICKS:\n\nOR, A TREATISE\n")
    assert script.book_text(book) == "OPTICKS:\n\nOR, A TREATISE\n"
    found = script.book_path()
    assert found is None or found.name == "Isaac.Newton-Opticks.txt"


def test_cell_cache_and_ppl_chunk(tiny_models, tmp_path):
    """--cell-cache: a second run reads every cell back (a tampered cell shows through);
    --ppl-chunk K: the cells are teacher_forced_logprobs with prompt_chunk=K."""
    from transformers import AutoModelForCausalLM
    from tova_vllm.reference import teacher_forced_logprobs

    script = _load_script()
    argv = ["--model", str(tiny_models["llama_gqa"]), "--length", "40", "--num-windows", "1",
            "--budgets", "1/4,full", "--policies", "tova", "--ppl-chunk", "4",
            "--num-probes", "2", "--probe-length", "200", "--probe-chunk", "8",
            "--device", "cpu", "--cell-cache", str(tmp_path / "cells")]
    first = script.main(argv + ["--out", str(tmp_path / "a")])
    cell = first["perplexity"]["tables"]["reference"]["tova"]["10"]
    window = first["perplexity"]["window_token_ids"][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama_gqa"],
                                                 attn_implementation="eager").eval()
    want = -teacher_forced_logprobs(model, window, cache_size=10, prompt_chunk=4).double()
    assert cell["mean_nll"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert "every 4 tokens" in (tmp_path / "a" / "results.md").read_text()

    nll_files = sorted((tmp_path / "cells").glob("*.pt"))
    probe_files = sorted((tmp_path / "cells").glob("*.json"))
    assert len(nll_files) == 2 and len(probe_files) == 2 * 2  # (1/4, full) x 2 probes
    for f in nll_files:  # zero NLL: perplexity 1 if (and only if) the file is read back
        torch.save(torch.zeros_like(torch.load(f)), f)
    second = script.main(argv + ["--out", str(tmp_path / "b"), "--sanity-tol", "100"])
    assert second["perplexity"]["tables"]["reference"]["tova"]["10"]["perplexity"] == 1.0
    assert second["retrieval"]["table"] == first["retrieval"]["table"]


def test_budget_parsing(study):
    script = study[0]
    budgets = script.parse_budgets("1/16, 0.25,64,full,2000", 1024)
    assert [(b.cache_size, b.full) for b in budgets] == [
        (64, False), (256, False), (1024, True)]
    assert [b.cache_size for b in script.parse_budgets("8", 64)] == [8, 64]
    for bad in ("0", "1/0", "1.5", "x"):
        with pytest.raises(ValueError):
            script.parse_budgets(bad, 64)


def test_engine_prompt_logprobs_equal_the_reference(tiny_models, tmp_path, monkeypatch):
    """--backend both: vLLM's prompt logprobs under the plugin (chunked mode, an eviction
    after every prompt token, all four policies as per-request settings in one engine)
    equal the reference's streaming log-probabilities."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    script = _load_script()
    results = script.main([
        "--model", str(tiny_models["llama_gqa"]), "--backend", "both", "--skip-probe",
        "--length", "40", "--num-windows", "1", "--budgets", "1/4,1/2,full",
        "--threads", "1", "--out", str(tmp_path),
    ])
    ppl = results["perplexity"]
    assert set(ppl["tables"]) == {"reference", "vllm"}
    assert ppl["engine_vs_reference"]["max_abs_token_nll_diff"] < 1e-3
    reference, engine = ppl["tables"]["reference"], ppl["tables"]["vllm"]
    for policy, row in reference.items():
        for budget, cell in row.items():
            assert engine[policy][budget]["perplexity"] == pytest.approx(cell["perplexity"],
                                                                         rel=1e-4)
    # Eviction happened: the budgets differ from the full cache.
    assert reference["tova"]["10"]["perplexity"] != reference["tova"]["40"]["perplexity"]
