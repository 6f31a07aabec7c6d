"""Request outputs and the host-side text tracker (detokenization + stop strings)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence (vLLM's ``CompletionOutput``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


@dataclasses.dataclass
class RequestOutput:
    """The result of one prompt.  ``text``/``token_ids``/``finish_reason`` are the first
    completion's; ``outputs`` holds all ``n`` of them (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class TextTracker:
    """Turns a growing list of token ids into text, applying stop strings.

    ``add`` returns the newly *safe* text: text that can no longer turn out to be
    the start of a stop string, and never a partial UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams) -> None:
        if tokenizer is None and params.stop:
            raise ValueError("SamplingParams.stop needs a tokenizer; this model has none")
        self.params = params
        # no tokenizer (token-id-only model): token ids are tracked, text stays empty
        self.detok = tokenizer and IncrementalDetokenizer(
            tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._emitted = 0
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; returns the text delta that is safe to show."""
        for tok in token_ids:
            if self.finished:
                break
            self.token_ids.append(int(tok))
            before = len(self.text)
            if self.detok is not None:
                self.text += self.detok.add([int(tok)])
            if self.params.stop and len(self.text) > before:
                self._check_stop(before)
        return self._delta()

    def _check_stop(self, before: int) -> None:
        start = max(0, before - self._max_stop + 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
            self.finish_reason, self.stop_reason = "stop", s

    def finish(self, reason: str, stop_token: int | None = None) -> str:
        """Mark finished by the device (EOS / stop id / length); returns the last delta."""
        if not self.finished:
            self.finish_reason = reason
            self.stop_reason = stop_token
        return self._delta()

    def _delta(self) -> str:
        end = len(self.text)
        if not self.finished and self.params.stop:
            # hold back a tail that could still grow into a stop string
            for k in range(min(self._max_stop - 1, end - self._emitted), 0, -1):
                tail = self.text[end - k:]
                if any(s.startswith(tail) for s in self.params.stop):
                    end -= k
                    break
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def completion(self, index: int = 0) -> CompletionOutput:
        return CompletionOutput(index=index, text=self.text, token_ids=list(self.token_ids),
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)
