"""Tiny models, tokenizers and batches for fine-tuning tests and examples (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from tokenizers import Tokenizer as _T, decoders, models, pre_tokenizers, trainers

from jaxllm.config import ModelConfig
from jaxllm.tokenizer import Tokenizer
from jaxllm.train.data import CHATML_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(vocab_size: int = 128, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                bos_token_id=None, eos_token_ids=(2,))
    base.update(kw)
    return ModelConfig(**base)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """A byte-level BPE (ChatML specials, ChatML template) trained on ``texts``."""
    tok = _T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return Tokenizer(tok, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", source="tiny-bpe")


def dataset_texts(path: str | Path) -> list[str]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(" ".join(_strings(json.loads(line))))
    return out


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def random_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int,
                 segments: int = 1) -> dict[str, np.ndarray]:
    """A random packed batch with ``segments`` examples per row and a random loss mask."""
    inputs = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
    targets = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
    weights = (rng.random((rows, seq_len)) < 0.7).astype(np.float32)
    seg = np.zeros((rows, seq_len), np.int32)
    pos = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, seq_len - 1), segments - 1, replace=False)) \
            if segments > 1 else np.array([], int)
        bounds = [0, *cuts.tolist(), seq_len - 2]  # last 2 positions are padding
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), 1):
            seg[r, a:b] = s
            pos[r, a:b] = np.arange(b - a)
    weights[seg == 0] = 0
    return {"inputs": inputs, "targets": targets, "weights": weights, "positions": pos,
            "segment_ids": seg}
