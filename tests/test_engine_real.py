"""The real SmolLM2-135M through the paged engine vs the static-batch path (slow)."""

from __future__ import annotations

import asyncio

import pytest

from jaxllm import SamplingParams
from jaxllm.engine.async_engine import AsyncLLMEngine

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, in a small village by the sea, there lived"]


def _static(llm, prompts, sp):
    llm.static_batching = True
    try:
        return llm.generate(prompts, sp)
    finally:
        llm.static_batching = False


def test_engine_equals_static_path(smollm2):
    sp = SamplingParams(temperature=0.0, max_tokens=40)
    ref = _static(smollm2, PROMPTS, sp)
    got = smollm2.generate(PROMPTS, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.text for o in got] == [o.text for o in ref]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in ref]
    # stop strings go through the same TextTracker
    stop = SamplingParams(temperature=0.0, max_tokens=40, stop=[" "], include_stop_str_in_output=True)
    assert [o.text for o in smollm2.generate(PROMPTS, stop)] == \
        [o.text for o in _static(smollm2, PROMPTS, stop)]


def test_async_streams_on_the_real_model(smollm2):
    sp = SamplingParams(temperature=0.0, max_tokens=24)
    ref = [o.text for o in smollm2.generate(PROMPTS, sp)]
    aeng = AsyncLLMEngine.from_llm(smollm2)

    async def one(i):
        text = ""
        async for out in aeng.generate(PROMPTS[i], sp, f"real-{i}"):
            assert out.outputs[0].text.startswith(text)  # streamed text only grows
            text = out.outputs[0].text
        return text

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        finally:
            await aeng.shutdown()

    assert asyncio.run(main()) == ref


def test_beam_search_api(smollm2):
    outs = smollm2.beam_search(["The capital of France is"], beam_width=3, max_tokens=8)
    beams = outs[0].outputs
    assert len(beams) == 3 and len({tuple(b.token_ids) for b in beams}) == 3
    assert all(b.cumulative_logprob is not None and b.cumulative_logprob < 0 for b in beams)
    greedy = smollm2.generate("The capital of France is",
                              SamplingParams(temperature=0.0, max_tokens=8))[0]
    # the best beam is at least as likely as the greedy continuation
    lp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
    g = smollm2.generate("The capital of France is", lp)[0].outputs[0]
    assert g.token_ids == greedy.token_ids
    assert beams[0].cumulative_logprob >= g.cumulative_logprob - 1e-3 or \
        beams[0].finish_reason == "stop"
