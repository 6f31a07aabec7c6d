"""OpenAI-protocol request models, their validation, and OpenAI error objects.

Requests are checked here, field by field, before anything reaches the engine: a bad
field becomes a 400 whose error object names it (``param``), never a 500.  Field names,
defaults and bounds follow OpenAI's API; vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ...) are
accepted at the top level, where the ``openai`` client's ``extra_body`` puts them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jaxllm.sampling import SamplingParams

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class APIError(Exception):
    """An error that becomes an OpenAI error object with HTTP ``status``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Base(BaseModel):
    # unknown fields are ignored (as OpenAI and vLLM do); inf / nan are not numbers here
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=1e4)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=1e4)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(not 0 <= t <= INT32_MAX for t in v):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return v

    def sampling_params(self, *, max_tokens: int, vocab_size: int, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        best_of: int | None = None) -> SamplingParams:
        """The engine's :class:`SamplingParams` for this request (fields already checked)."""
        if self.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias")
        if self.stop_token_ids and any(t >= vocab_size for t in self.stop_token_ids):
            raise APIError(f"stop_token_ids must be below the vocabulary size ({vocab_size})",
                           param="stop_token_ids")
        if self.min_tokens > max_tokens:
            raise APIError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                           f"({max_tokens})", param="min_tokens")
        top_k = self.top_k if self.top_k is not None else 0
        if top_k >= vocab_size:
            top_k = 0  # keeping the whole vocabulary is no top-k at all
        try:
            return SamplingParams(
                n=self.n, best_of=best_of,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=top_k,
                min_p=self.min_p or 0.0,
                repetition_penalty=(1.0 if self.repetition_penalty is None
                                    else self.repetition_penalty),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                seed=None if self.seed is None else self.seed & (2**64 - 1),
                max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:  # "SamplingParams.<field> ..." names the field
            msg = str(e)
            param = None
            if msg.startswith("SamplingParams."):
                param = msg.split(".", 1)[1].split(" ", 1)[0]
            raise APIError(msg, param=param) from None


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: PromptType
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    best_of: int | None = Field(None, ge=1, le=128)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_nonempty(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("a token-id prompt must not be empty")
            if isinstance(v[0], int) and any(not 0 <= t <= INT32_MAX for t in v):
                raise ValueError("token ids must be non-negative integers")
            if isinstance(v[0], list) and any(not 0 <= t <= INT32_MAX for p in v for t in p):
                raise ValueError("token ids must be non-negative integers")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request (a batch is a list of strings or of id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        """Raise for OpenAI features this server does not implement."""
        if self.tools:
            raise APIError("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError("response_format other than text is not supported",
                           param="response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")


class TokenizeRequest(_Base):
    """``POST /tokenize`` (vLLM's): a prompt, or chat messages rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Base):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes -> ``model``, or an :class:`APIError` naming the offending field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise APIError(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        # drop pydantic's union-branch names ("str", "list[int]", ...) from the path
        param = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in
                         ("str", "int", "float", "bool", "list", "dict", "function-after"))
        msg = err.get("msg", "invalid value")
        inp = err.get("input")
        shown = _short(inp)
        raise APIError(f"{param or 'body'}: {msg}" + (f" (got {shown})" if shown else ""),
                       param=param or None) from None
    except RecursionError:
        raise APIError("the body is nested too deeply") from None


def _short(x: Any) -> str:
    if isinstance(x, (dict, list)) or x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."
