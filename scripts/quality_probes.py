"""The quality study's retrieval probe: passkey and key-value prompts, greedy
answers per policy and budget (``scripts/eval_quality.py``)."""

from __future__ import annotations

import json
import random
import string
from typing import Any

from quality_common import budget_cell, Progress, policy_of, budget_error
from quality_text import encode
from quality_ppl import cell_file


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
    per_filler = len(encode(tokenizer, PASSKEY_FILLER * 8)) / 8
    fixed = len(encode(tokenizer, PASSKEY_NEEDLE.format(key="12345") + PASSKEY_QUESTION))
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
            if name != "*" and budget_error(name, budget, args):
                continue
            policy = policy_of("tova" if name == "*" else name, args)
            correct, outputs = [], []
            for i, probe in enumerate(probes):
                prompt, answer = probe["prompt_ids"], probe["answer_ids"]
                # Full: large enough that nothing is ever evicted.
                size = len(prompt) + len(answer) if budget.full else budget.cache_size
                saved = None
                if args.cell_cache is not None:
                    args.cell_cache.mkdir(parents=True, exist_ok=True)
                    saved = cell_file(args.cell_cache, model, prompt + answer,
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
            key, cell = budget_cell(name, budget, args.probe_length)
            if key not in raw:
                cell.update(accuracy=None, error=budget_error(name, budget, args))
            else:
                correct = raw[key]["correct"]
                cell.update(accuracy=sum(correct) / len(correct), correct=correct,
                            outputs=raw[key]["outputs"])
            row[str(budget.cache_size)] = cell
        table[name] = row
    return table
