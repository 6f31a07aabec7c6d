"""Fine-tuning data: JSONL records -> token sequences with loss masks -> packed rows.

Record formats (one JSON object per line; the format is detected per record):

* instruction (Alpaca):  ``{"instruction", "input"?, "output", "system"?, "history"?}``
  -- ``history`` is a list of ``[user, assistant]`` pairs that precede the current turn;
* prompt/response:       ``{"prompt"|"query", "response"|"completion", "system"?, "history"?}``
* chat:                  ``{"messages": [{"role", "content"}, ...]}`` (roles system, user,
  assistant, tool) or ShareGPT ``{"conversations": [{"from", "value"}, ...]}``;
* plain text (pretraining): ``{"text": ...}`` or ``{"content": ...}``.

Chat-like records are rendered with the model's chat template and only the
assistant turns are trained on.  The assistant spans are found by rendering the
conversation prefix by prefix: the text between ``render(messages[:i],
add_generation_prompt=True)`` and ``render(messages[:i+1])`` is assistant turn
``i`` (its content plus the end-of-turn marker, which the model must learn to
emit).  Each span is tokenized separately, so the prompt tokens are exactly what
``LLM.apply_chat_template`` produces at inference; if the pieces do not
round-trip (templates that are not prefix-stable, tokenizers that add a dummy
prefix), the whole text is tokenized once and tokens are assigned to spans by
their character offsets.  Plain text trains on every token (+ EOS).

Rows: every example of ``n`` tokens contributes ``n - 1`` (input, target) pairs.
With packing, several examples share one row of ``seq_len`` positions; each gets
its own ``segment_id`` (1, 2, ...; padding is 0 with zero weight) and positions
restart at 0, so attention (given the segment ids) never crosses examples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "bot": "assistant", "model": "assistant",
                   "tool": "tool", "function": "tool", "observation": "tool"}
# A minimal ChatML template for tokenizers that ship none (tiny test tokenizers).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>", "<|endoftext|>")


class DataError(ValueError):
    """A malformed record: the message names the file, line and field."""


@dataclasses.dataclass
class Example:
    """One tokenized training example.

    ``tokens [n]`` int32; ``mask [n]`` bool: token ``i`` is a training target
    (predicted from token ``i-1``).  ``source`` is ``file:line``.
    """
    tokens: np.ndarray
    mask: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_targets(self) -> int:
        return int(self.mask[1:].sum())


# --------------------------------------------------------------------------- records


def _need_str(rec: Mapping, key: str, where: str, optional: bool = False) -> str | None:
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _history(rec: Mapping, where: str) -> list[dict[str, str]]:
    hist = rec.get("history") or []
    if not isinstance(hist, list):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] pairs, "
                        f"got {type(hist).__name__}")
    out = []
    for j, pair in enumerate(hist):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(s, str) for s in pair)):
            raise DataError(f"{where}: field 'history[{j}]' must be a [user, assistant] pair of "
                            f"strings, got {pair!r:.80}")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def record_to_messages(rec: Any, where: str) -> tuple[str, Any]:
    """Classify and validate one record: ``("chat", messages)`` or ``("text", str)``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        msgs = rec[key]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: field '{key}[{j}]' must be an object, "
                                f"got {type(m).__name__}")
            if key == "messages":
                role = m.get("role")
                if role not in ROLES:
                    raise DataError(f"{where}: field '{key}[{j}].role' must be one of {ROLES}, "
                                    f"got {role!r}")
                content = _need_str(m, "content", f"{where}: {key}[{j}]")
            else:
                role = _SHAREGPT_ROLES.get(m.get("from"))
                if role is None:
                    raise DataError(f"{where}: field '{key}[{j}].from' must be one of "
                                    f"{sorted(_SHAREGPT_ROLES)}, got {m.get('from')!r}")
                content = _need_str(m, "value", f"{where}: {key}[{j}]")
            out.append({"role": role, "content": content})
        out = _history(rec, where) + out
        if rec.get("system") is not None and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": _need_str(rec, "system", where)})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: field {key!r} has no assistant message to train on")
        return "chat", out
    if "instruction" in rec or "prompt" in rec or "query" in rec:
        if "instruction" in rec:
            user = _need_str(rec, "instruction", where)
            extra = _need_str(rec, "input", where, optional=True)
            if extra:
                user = f"{user}\n\n{extra}"
            answer_key = "output"
        else:
            user = _need_str(rec, "prompt" if "prompt" in rec else "query", where)
            answer_key = "response" if "response" in rec else "completion"
            if answer_key not in rec and "output" in rec:
                answer_key = "output"
        answer = _need_str(rec, answer_key, where)
        msgs = _history(rec, where) + [{"role": "user", "content": user},
                                       {"role": "assistant", "content": answer}]
        system = _need_str(rec, "system", where, optional=True)
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        return "chat", msgs
    for key in ("text", "content"):
        if key in rec:
            return "text", _need_str(rec, key, where)
    raise DataError(f"{where}: unrecognised record (fields {sorted(rec)[:8]}); expected "
                    "'messages', 'conversations', 'instruction'+'output', 'prompt'+'response' "
                    "or 'text'")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` for each non-blank line; ``where`` is ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset not found: {p}")
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield where, rec


# --------------------------------------------------------------------------- tokenization


def _render(tok, messages, add_generation_prompt: bool, template: str | None) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                   chat_template=template)


def _assistant_spans(tok, messages, full: str, template: str | None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full`` (see module docstring)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = end = -1
        try:
            prefix = _render(tok, messages[:i], True, template) if i else None
            upto = _render(tok, messages[:i + 1], False, template)
        except ValueError:
            prefix = upto = None
        if (prefix is not None and upto is not None and full.startswith(upto)
                and upto.startswith(prefix) and len(prefix) >= pos
                and m["content"] in upto[len(prefix):]):
            start, end = len(prefix), len(upto)
        else:  # not prefix-stable: find the content, extend over an end-of-turn marker
            start = full.find(m["content"], pos) if m["content"] else -1
            if start < 0:
                raise ValueError(f"could not locate assistant turn {i} in the rendered template")
            end = start + len(m["content"])
            for eot in END_OF_TURN:
                if full.startswith(eot, end):
                    end += len(eot)
                    break
        spans.append((start, end))
        pos = end
    return spans


def tokenize_chat(tok, messages: Sequence[Mapping[str, str]], template: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` of a conversation; mask is True on assistant-turn tokens."""
    if template is None and not getattr(tok, "chat_template", None):
        template = CHATML_TEMPLATE
    full = _render(tok, messages, False, template)
    spans = _assistant_spans(tok, messages, full, template)
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for start, end in spans:
        for text, trained in ((full[pos:start], False), (full[start:end], True)):
            if text:
                piece = tok.encode(text, add_special_tokens=False)
                ids += piece
                mask += [trained] * len(piece)
        pos = end
    if full[pos:]:
        piece = tok.encode(full[pos:], add_special_tokens=False)
        ids += piece
        mask += [False] * len(piece)
    if tok.decode(ids, skip_special_tokens=False) != full:  # pieces did not round-trip
        enc = tok.backend.encode(full, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def tokenize_text(tok, text: str, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = tok.encode(text, add_special_tokens=True)
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids = ids + [eos_id]
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)


@dataclasses.dataclass
class DatasetStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def describe(self) -> str:
        s = (f"{self.examples} examples from {self.records} records, {self.tokens} tokens "
             f"({self.target_tokens} trained)")
        if self.truncated or self.dropped:
            s += f"; {self.truncated} truncated, {self.dropped} dropped (no target left)"
        return s


def load_examples(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer,
                  max_len: int | None = None, chat_template: str | None = None,
                  stats: DatasetStats | None = None) -> list[Example]:
    """Read, validate and tokenize JSONL file(s).

    ``max_len``: examples longer than this many tokens are truncated (and dropped
    if no trained token is left).  Raises :class:`DataError` naming ``file:line``
    and the field for a malformed record.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    stats = stats if stats is not None else DatasetStats()
    eos = (tokenizer.eos_token_ids or (None,))[0] if tokenizer.eos_token_id is None \
        else tokenizer.eos_token_id
    out: list[Example] = []
    for path in paths:
        for where, rec in read_jsonl(path):
            stats.records += 1
            kind, value = record_to_messages(rec, where)
            try:
                if kind == "chat":
                    ids, mask = tokenize_chat(tokenizer, value, chat_template)
                else:
                    ids, mask = tokenize_text(tokenizer, value, eos)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            if max_len is not None and len(ids) > max_len:
                ids, mask = ids[:max_len], mask[:max_len]
                stats.truncated += 1
            ex = Example(ids, mask, where)
            if len(ids) < 2 or ex.num_targets == 0:
                stats.dropped += 1
                continue
            stats.examples += 1
            stats.tokens += len(ids)
            stats.target_tokens += ex.num_targets
            out.append(ex)
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no usable examples "
                        f"({stats.records} records, {stats.dropped} without trained tokens)")
    return out


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """Deterministic hold-out split: ``(train, eval)``."""
    if eval_fraction <= 0:
        return list(examples), []
    n_eval = max(1, int(round(len(examples) * eval_fraction)))
    if n_eval >= len(examples):
        raise ValueError(f"eval fraction {eval_fraction} leaves no training examples")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
    held = set(perm[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# --------------------------------------------------------------------------- packing

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")


def pack(examples: Sequence[Example], seq_len: int, packing: bool = True,
         max_open_rows: int = 64) -> dict[str, np.ndarray]:
    """Rows ``[R, seq_len]`` of ``inputs, targets, weights, positions, segment_ids``.

    ``packing``: first-fit of examples (in the given order) into the last
    ``max_open_rows`` rows that still have room; otherwise one example per row.
    Examples longer than ``seq_len + 1`` tokens are cut.
    """
    rows: list[list[Example]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for ex in examples:
        need = min(len(ex), seq_len + 1) - 1
        slot = None
        if packing:
            for r in open_rows:
                if free[r] >= need:
                    slot = r
                    break
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
            open_rows.append(slot)
            if len(open_rows) > max_open_rows:
                open_rows.pop(0)
        rows[slot].append(ex)
        free[slot] -= need
        if free[slot] <= 0 and slot in open_rows:
            open_rows.remove(slot)
    n = len(rows)
    out = {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
           "weights": np.zeros((n, seq_len), np.float32),
           "positions": np.zeros((n, seq_len), np.int32),
           "segment_ids": np.zeros((n, seq_len), np.int32)}
    for r, exs in enumerate(rows):
        off = 0
        for s, ex in enumerate(exs, 1):
            toks, mask = ex.tokens[:seq_len + 1], ex.mask[:seq_len + 1]
            m = len(toks) - 1
            out["inputs"][r, off:off + m] = toks[:-1]
            out["targets"][r, off:off + m] = toks[1:]
            out["weights"][r, off:off + m] = mask[1:]
            out["positions"][r, off:off + m] = np.arange(m)
            out["segment_ids"][r, off:off + m] = s
            off += m
    return out


# --------------------------------------------------------------------------- loading


class DataLoader:
    """Deterministic, resumable stream of global batches ``{field: [rows, seq_len]}``.

    Epoch ``e`` shuffles the examples with ``default_rng([seed, e])`` and packs
    them; batches take ``batch_rows`` consecutive rows and run on into the next
    epoch when one ends.  ``state()`` after a batch (epoch, row) resumes exactly
    at the next one.  Iteration prefetches ``prefetch`` batches on a background
    thread.
    """

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_rows: int, *,
                 seed: int = 0, shuffle: bool = True, packing: bool = True, prefetch: int = 2,
                 state: Mapping[str, int] | None = None) -> None:
        if not examples:
            raise ValueError("DataLoader: no examples")
        self.examples = list(examples)
        self.seq_len, self.batch_rows = seq_len, batch_rows
        self.seed, self.shuffle, self.packing, self.prefetch = seed, shuffle, packing, prefetch
        self.epoch, self.row = (int(state["epoch"]), int(state["row"])) if state else (0, 0)
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
                     if self.shuffle else np.arange(len(self.examples)))
            self._cache = (epoch, pack([self.examples[i] for i in order], self.seq_len,
                                       self.packing))
        return self._cache[1]

    @property
    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0)["inputs"])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def next_batch(self) -> dict[str, np.ndarray]:
        parts: list[dict[str, np.ndarray]] = []
        need = self.batch_rows
        while need:
            rows = self.epoch_rows(self.epoch)
            take = min(need, len(rows["inputs"]) - self.row)
            parts.append({k: v[self.row:self.row + take] for k, v in rows.items()})
            self.row += take
            need -= take
            if self.row >= len(rows["inputs"]):
                self.epoch, self.row = self.epoch + 1, 0
        return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
        """Yield ``(batch, state after it)`` forever, prefetched on a thread."""
        def produce():
            while True:
                b = self.next_batch()
                yield b, self.state()
        if self.prefetch <= 0:
            return produce()
        return prefetch(produce(), self.prefetch)


def eval_batches(examples: Sequence[Example], seq_len: int, batch_rows: int,
                 packing: bool = True) -> list[dict[str, np.ndarray]]:
    """Fixed evaluation batches (last one padded with zero-weight rows)."""
    rows = pack(examples, seq_len, packing)
    n = len(rows["inputs"])
    out = []
    for i in range(0, n, batch_rows):
        b = {k: v[i:i + batch_rows] for k, v in rows.items()}
        pad = batch_rows - len(b["inputs"])
        if pad:
            b = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in b.items()}
        out.append(b)
    return out


class _Stop:
    pass


def prefetch(it: Iterable, size: int = 2) -> Iterator:
    """Run ``it`` on a daemon thread, ``size`` items ahead; exceptions are re-raised here.

    Closing the returned generator (or dropping it) stops the thread after its
    current item.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_Stop())
        except BaseException as e:  # noqa: BLE001 -- forwarded to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="jaxllm-prefetch")
    t.start()

    def consume():
        try:
            while True:
                item = q.get()
                if isinstance(item, _Stop):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    return consume()
