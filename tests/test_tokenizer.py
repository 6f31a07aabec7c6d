"""Tokenizer: GGUF and HF-dir tokenizers against transformers, chat templates, and the
incremental detokenizer (multibyte text split across byte-level tokens)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer
from jaxllm.weights import default_model_path
from jaxllm.weights.gguf import tokenizer_from_gguf

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " 123 4567 x1y22 3.14159",
    "emoji 😀🎉👩‍👩‍👧 and 日本語のテキスト, ünïcödé, Ελληνικά, русский",
    "  leading spaces\n\n\ttabs and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text <|endoftext|> more <repo_name> x",
    "I'm 'quoted' don't we'll",
    "",
    "def f(x):\n    return x ** 2  # comment",
]

CONVERSATION = [
    {"role": "user", "content": "What is 2+2? Answer in 日本語 😀"},
    {"role": "assistant", "content": "4 です!"},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf_tok():
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gguf_encode_decode_match_transformers(tok, hf_tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == \
            hf_tok(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                hf_tok.decode(ids, skip_special_tokens=skip), (text, skip)
    assert tok.decode(tok.encode(TEXTS[3])) == TEXTS[3]


def test_special_tokens_and_ids(tok, hf_tok):
    # SmolLM2: bos <|im_start|> (1), eos = pad = <|im_end|> (2); HF generation_config uses
    # eos 2; <|endoftext|> (0) is the unk token and not a stop token for chat.
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1 == hf_tok.bos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == hf_tok.eos_token_id
    assert tok.eos_token_ids == (2,)
    assert tok.pad_token_id == 2 == hf_tok.pad_token_id
    assert tok.vocab_size == 49152 == len(hf_tok)
    assert tok.id_to_token(1) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == 2
    assert tok.encode("<|im_end|>") == [2]  # special tokens stay whole
    assert tok.is_special(0) and not tok.is_special(100)


def test_chat_template_matches_transformers(tok, hf_tok):
    for agp in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=agp)
        ref = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=agp, tokenize=False)
        assert ours == ref
        ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=agp, tokenize=True)
        ref_ids = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=agp, tokenize=True)
        ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
        assert ids == list(ref_ids)
    text = tok.apply_chat_template(CONVERSATION[:1])
    # the SmolLM2 template injects its default system prompt when none is given
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    sys_first = [{"role": "system", "content": "Be brief."}] + CONVERSATION[:1]
    assert tok.apply_chat_template(sys_first) == hf_tok.apply_chat_template(
        sys_first, add_generation_prompt=True, tokenize=False)


def test_chat_template_sandbox_and_raise_exception(tok):
    t = "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}" \
        "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=t) == \
        "<|im_start|>x<|im_end|>"
    with pytest.raises(ValueError, match="only one message"):
        tok.apply_chat_template(CONVERSATION, chat_template=t)
    with pytest.raises(ValueError, match="chat template error"):  # sandbox: no dunder access
        tok.apply_chat_template(CONVERSATION, chat_template="{{ messages.__class__.__mro__ }}"
                                "{{ ''.__class__.__subclasses__() }}")


def test_hf_dir_round_trip(tok, hf_tok, tmp_path):
    # transformers' tokenizer saved as an HF dir -> our from_hf_dir
    hf_dir = tmp_path / "hf"
    hf_tok.save_pretrained(hf_dir)
    ours = Tokenizer.from_hf_dir(hf_dir)
    for text in TEXTS:
        assert ours.encode(text) == hf_tok(text)["input_ids"], text
    assert ours.eos_token_ids == (2,) and ours.bos_token_id == 1
    assert ours.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)

    # our tokenizer saved -> transformers.AutoTokenizer and our from_hf_dir
    out = tok.save_pretrained(tmp_path / "ours")
    back = transformers.AutoTokenizer.from_pretrained(out)
    again = Tokenizer.from_hf_dir(out)
    for text in TEXTS:
        assert back(text)["input_ids"] == tok.encode(text) == again.encode(text), text
    assert back.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(CONVERSATION)
    assert (again.eos_token_ids, again.bos_token_id, again.vocab_size) == \
        (tok.eos_token_ids, tok.bos_token_id, tok.vocab_size)


def test_generation_config_eos_ids(tok, tmp_path):
    d = tok.save_pretrained(tmp_path / "t")
    (d / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    assert Tokenizer.from_hf_dir(d).eos_token_ids == (2, 0)


def _stream(tok, ids, prompt_ids=None, chunk=1, skip=True):
    det = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(det.add(ids[i:i + chunk]))
    pieces.append(det.flush())
    return det, pieces


def test_incremental_detokenizer_multibyte(tok):
    text = "Emoji 😀🎉👩‍👩‍👧 then 日本語のテキスト and ünïcödé — done. 🚀"
    ids = tok.encode(text)
    # byte-level BPE splits these characters over several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for chunk in (1, 2, 3):
        det, pieces = _stream(tok, ids, chunk=chunk)
        assert "".join(pieces) == tok.decode(ids) == text
        assert det.text == text
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_raw_bytes_and_prompt(tok):
    # Every character as single byte tokens: the worst case for holding back.
    text = "añ日😀x"
    byte_ids = [tok.token_to_id(_byte_token(b)) for b in text.encode()]
    assert None not in byte_ids
    det, pieces = _stream(tok, byte_ids)
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["a", "ñ", "日", "😀", "x"]

    # With a prompt (context only) and special tokens in the stream.
    prompt = tok.apply_chat_template(CONVERSATION, tokenize=True)
    gen = tok.encode("Sure! 2+2 = 4 😀") + [2]
    det, pieces = _stream(tok, gen, prompt_ids=prompt)
    assert "".join(pieces) == tok.decode(gen) == "Sure! 2+2 = 4 😀"
    det, pieces = _stream(tok, gen, prompt_ids=prompt, skip=False)
    assert "".join(pieces) == "Sure! 2+2 = 4 😀<|im_end|>"


def test_incremental_detokenizer_random_streams(tok):
    rng = random.Random(0)
    vocab = tok.vocab_size
    for trial in range(20):
        ids = [rng.randrange(17, vocab) for _ in range(rng.randrange(1, 60))]
        full = tok.decode(ids)
        det, pieces = _stream(tok, ids, chunk=rng.choice([1, 1, 2, 5]))
        assert "".join(pieces) == full
        # nothing but the final flush may carry U+FFFD
        assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in full


def test_incremental_detokenizer_numpy_ids(tok):
    ids = np.array(tok.encode("numpy ids 😀"), dtype=np.int32)
    det = IncrementalDetokenizer(tok)
    out = "".join(det.add(i) for i in ids) + det.flush()
    assert out == "numpy ids 😀"


def _byte_token(b: int) -> str:
    from jaxllm.weights.gguf import _bytes_to_unicode  # noqa: PLC2701

    return _bytes_to_unicode()[b]


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """A llama.cpp SentencePiece vocabulary (tokenizer.ggml.model == "llama")."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "e", "l", "o", "h", "w", "r", "d", "t", "a", "n", "s", "i", "▁t", "he", "▁the",
              "ll", "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "in", "an", "▁a",
              "▁an", "at", "en", "es", "日", "本"]
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    tokens += pieces
    types += [1] * len(pieces)
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = tokenizer_from_gguf(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", " hello  world", "the tan ant", "日本語 😀", "hello</s>", "", "\n\nx"]:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.eos_token_ids == (2,) and ours.bos_token_id == 1
    ids = ours.encode("hello 日本語 world 😀", add_special_tokens=False)
    det, pieces = _stream(ours, ids, prompt_ids=[1])
    assert "".join(pieces) == "hello 日本語 world 😀"
    assert all("\ufffd" not in p for p in pieces)
