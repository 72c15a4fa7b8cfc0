"""A byte-level tokenizer whose token ids are simply ``byte + 3``.

A BPE with no merges over the GPT-2 byte-level alphabet, a ``ByteLevel`` pre-tokenizer
without the split regex, a post-processor that prepends ``<s>``, saved through
``PreTrainedTokenizerFast``; the byte symbols are numbered in *byte order*, so that

    id 0 = <pad>, id 1 = <s> (bos), id 2 = </s> (eos), id 3 + b = the byte b (0..255).

A training pipeline can then encode raw bytes without the tokenizer:
``ids = numpy.frombuffer(data, numpy.uint8) + 3``.  The tests' tiny checkpoints
(``tests/tiny_models.py``) use this tokenizer too.

Usage::

    from byte_tokenizer import build_byte_tokenizer, save_byte_tokenizer
    tok = build_byte_tokenizer()
    save_byte_tokenizer(out_dir)   # writes tokenizer.json, tokenizer_config.json, ...
"""

from __future__ import annotations

import json
from pathlib import Path

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
BYTE_OFFSET = NUM_SPECIAL  # token id = byte + BYTE_OFFSET
VOCAB_SIZE = NUM_SPECIAL + 256

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode stand-in map, which the ``ByteLevel``
    pre-tokenizer and decoder of the ``tokenizers`` library use."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer(model_max_length: int = 2048):
    """Return a ``transformers.PreTrainedTokenizerFast`` with ids ``byte + 3``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_map = bytes_to_unicode()
    assert set(byte_map.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
    vocab.update({byte_map[b]: BYTE_OFFSET + b for b in range(256)})

    # A BPE with no merges over the byte alphabet: every byte is one token, any text
    # encodes, and nothing needs training.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    tok.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_byte_tokenizer(tok) -> None:
    """Assert that ``tok`` maps text to ``[bos] + [b + 3 for b in utf8(text)]``."""
    text = "def f(x):\n\treturn x  # é ✓ \x00\x7f\r\n"
    want = [BOS_ID] + [b + BYTE_OFFSET for b in text.encode("utf-8")]
    got = tok(text)["input_ids"]
    assert got == want, (got, want)
    assert tok.decode(got, skip_special_tokens=True) == text
    assert len(tok) == VOCAB_SIZE, len(tok)


def save_byte_tokenizer(out_dir, model_max_length: int = 2048):
    """Build, check and save the tokenizer to ``out_dir``; return it."""
    out_dir = Path(out_dir)
    tok = build_byte_tokenizer(model_max_length)
    check_byte_tokenizer(tok)
    tok.save_pretrained(out_dir)
    # transformers maps some model types (qwen2) to tokenizer classes that add
    # an "<|endoftext|>" unk token unless unk is explicitly absent; a byte-level vocabulary
    # needs none, and the extra id would exceed the model's vocab.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["unk_token"] = None
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return tok


if __name__ == "__main__":
    import sys
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        save_byte_tokenizer(d)
        check_byte_tokenizer(AutoTokenizer.from_pretrained(d))
    print("ok", file=sys.stderr)
