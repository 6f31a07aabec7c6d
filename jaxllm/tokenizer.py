"""Tokenization, detokenization and chat templates.

Built on the ``tokenizers`` package (Rust, fast start-up) and a sandboxed ``jinja2``
environment that mirrors ``transformers``' chat-template rendering; ``transformers``
itself is never imported here.  :meth:`Tokenizer.from_hf_dir` reads ``tokenizer.json`` +
``tokenizer_config.json`` (+ ``chat_template.jinja`` / ``special_tokens_map.json`` /
``generation_config.json``); a GGUF file's tokenizer is built by
:func:`jaxllm.weights.gguf.tokenizer_from_gguf`.

:class:`IncrementalDetokenizer` turns a stream of generated ids into text deltas that
never end inside a UTF-8 sequence.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# Tokens that chat templates use to end a turn; if one appears in the template and in the
# vocabulary it is a stop token in addition to eos (llama.cpp's "end of generation" set).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                      "<|endoftext|>", "<|end_of_text|>", "</s>", "<|END_OF_TURN_TOKEN|>",
                      "<|return|>", "<|call|>", "<turn|>")

def _token_content(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, Mapping):
        return tok.get("content")
    return str(tok)


@lru_cache(maxsize=16)
def _compile_template(template: str):
    """Compile a chat template the way ``transformers`` does (sandboxed jinja2)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant tokens in HF templates; render body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus special tokens and the model's chat template.

    ``vocab_size`` counts the tokenizer's entries (added tokens included); a model's
    embedding may have more rows (padding).
    """

    def __init__(self, backend, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None,
                 extra_eos_token_ids: Iterable[int] = (), source: str | None = None):
        self._tok = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.source = source
        self._special: frozenset[int] | None = None
        eos: list[int] = []
        for tid in ([self.token_to_id(eos_token)] if eos_token else []) + list(extra_eos_token_ids):
            if tid is not None and tid not in eos:
                eos.append(int(tid))
        for t in END_OF_TURN_TOKENS:
            tid = self.token_to_id(t)
            if tid is not None and chat_template and t in chat_template and tid not in eos:
                eos.append(tid)
        self._eos_ids = tuple(eos)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` etc.) from an HF directory."""
        from tokenizers import Tokenizer as _Backend

        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (only fast/`tokenizers` tokenizers "
                                    "are supported)")
        try:
            backend = _Backend.from_file(str(tj))
        except Exception as e:
            raise ValueError(f"{tj}: cannot parse tokenizer ({e})") from None
        cfg = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        elif not template and (d / "chat_template.json").is_file():
            template = _read_json(d / "chat_template.json").get("chat_template")

        def special(name):
            return _token_content(cfg.get(name)) or _token_content(smap.get(name))

        if "add_bos_token" in cfg or "add_eos_token" in cfg:
            # As transformers (v5) does: explicit flags rebuild the post-processor.
            bos, eos = special("bos_token"), special("eos_token")
            set_post_processor(backend, bos if cfg.get("add_bos_token") and bos else None,
                                eos if cfg.get("add_eos_token") and eos else None)
        extra = []
        for f in (d / "generation_config.json",):
            e = _read_json(f).get("eos_token_id")
            extra += e if isinstance(e, list) else ([] if e is None else [e])
        return cls(backend, chat_template=template, bos_token=special("bos_token"),
                   eos_token=special("eos_token"), unk_token=special("unk_token"),
                   pad_token=special("pad_token"), extra_eos_token_ids=extra, source=str(d))

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``)
        loadable by :meth:`from_hf_dir` and by ``transformers.AutoTokenizer``."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                               "clean_up_tokenization_spaces": False}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(self, name) is not None:
                cfg[name] = getattr(self, name)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return d

    # -- properties --------------------------------------------------------------------

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Stop ids: eos, generation_config's eos ids, and end-of-turn tokens the chat
        template uses (e.g. ``<|im_end|>``, ``<|eot_id|>``)."""
        return self._eos_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                if v is not None}

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids()

    def _special_ids(self) -> frozenset[int]:
        if self._special is None:
            self._special = frozenset(
                i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return self._special

    # -- encode / decode ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, chat_template: str | None = None,
                            **kwargs) -> str | list[int]:
        """Render ``messages`` with the model's jinja chat template (as ``transformers`` does:
        sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``,
        special tokens as variables).  Extra ``kwargs`` (``tools``, ``documents``, ...) are
        passed to the template.  ``tokenize=True`` returns ids (no extra special tokens)."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(f"tokenizer ({self.source}) has no chat template; pass chat_template=")
        import jinja2

        variables = {**self.special_tokens_map, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            text = _compile_template(template).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, eos_token_ids={self.eos_token_ids})")


class IncrementalDetokenizer:
    """Turns generated ids into text deltas.

    ``add(ids)`` returns only newly completed text; while the decoded tail ends in U+FFFD
    (an incomplete UTF-8 sequence split across byte tokens) the text is held back.  Only
    a short window of ids is re-decoded per call (vLLM's prefix/read offsets), so the cost
    per token is constant.  ``prompt_ids`` give the decoder context (leading-space
    handling of SentencePiece) without being emitted.  ``flush()`` returns whatever is
    still held at the end of generation; ``text`` is all text emitted so far.
    """

    _CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in (prompt_ids or ())][-self._CONTEXT:]
        self._prefix = 0
        self._read = len(self._ids)
        self._chunks: list[str] = []

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        if isinstance(token_ids, int) or hasattr(token_ids, "__index__"):
            token_ids = [token_ids]
        self._ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        # keep the window short
        if self._prefix > 4096:
            drop = self._prefix - self._CONTEXT
            del self._ids[:drop]
            self._prefix -= drop
            self._read -= drop
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """Emit any held-back text (may contain U+FFFD if generation stopped mid-character)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self._prefix = self._read = len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)


def set_post_processor(backend, bos: str | None, eos: str | None) -> None:
    """Add ``bos`` / ``eos`` around every encoded sequence (``None``: leave that side out)."""
    from tokenizers import processors

    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(special)))


def encode_prompt(prompt: Any, tokenizer: Any, vocab_size: int, max_model_len: int, *,
                  name: str = "prompt", source: Any = "this model") -> tuple[str | None, list[int]]:
    """A prompt (text, or token ids as a list / tuple / array) -> ``(text or None, ids)``,
    checked: ids inside the vocabulary, not empty, room left in ``max_model_len`` to
    generate.  Errors name the prompt (``name``) and, for a missing tokenizer, ``source``."""
    import numpy as np

    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{name} is text, but {source} has no tokenizer (tokenizer.json); "
                             "pass token ids instead")
        text, ids = prompt, list(tokenizer.encode(prompt))
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        try:
            ids, text = [int(t) for t in prompt], None
        except (TypeError, ValueError):
            raise TypeError(f"{name} has a token id that is not an integer") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]}, outside the vocabulary "
                             f"[0, {vocab_size})")
    else:
        raise TypeError(f"{name} must be a string or a list of token ids, "
                        f"got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{name} is empty")
    if len(ids) >= max_model_len:
        raise ValueError(f"{name} has {len(ids)} tokens; the context (max_model_len) is "
                         f"{max_model_len}, which leaves no room to generate")
    return text, ids


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return out if isinstance(out, dict) else {}
