"""The real SmolLM2-135M-Instruct GGUF against HF transformers loading the same file."""

import numpy as np
import pytest
import torch

from jaxllm import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]


def test_logits_match_transformers(smollm2, hf_smollm2):
    for prompt in PROMPTS:
        ids = smollm2.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
        got = smollm2.logits(ids)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-3


def test_greedy_generation_is_token_identical(smollm2, hf_smollm2):
    ids = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    # min_tokens suppresses EOS exactly like HF min_new_tokens
    outs = smollm2.generate(ids, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32))
    for prompt_ids, out in zip(ids, outs):
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([prompt_ids]), max_new_tokens=32,
                                      min_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt_ids):].tolist()
        assert out.finish_reason == "length"


def test_public_api_paths_agree(smollm2):
    sp = SamplingParams(temperature=0.0, max_tokens=24)
    text = smollm2.generate("The capital of France is", sp)[0].text
    assert "Paris" in text
    assert "".join(smollm2.stream("The capital of France is", sp)) == text
    by_ids = smollm2.generate([smollm2.tokenizer.encode("The capital of France is")], sp)[0]
    assert by_ids.text == text and by_ids.prompt is None
    reply = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], sp)
    assert "Paris" in reply.text and reply.finish_reason == "stop"
    assert reply.token_ids[-1] in smollm2.eos_token_ids


def test_stop_strings_are_cut_and_streamed_safely(smollm2):
    free = smollm2.generate("Count: one, two, three,", SamplingParams(temperature=0.0,
                                                                      max_tokens=16))[0].text
    stop = free.strip().split()[1]  # a word the model does produce
    sp = SamplingParams(temperature=0.0, max_tokens=16, stop=[stop])
    out = smollm2.generate("Count: one, two, three,", sp)[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert free.startswith(out.text)
    assert "".join(smollm2.stream("Count: one, two, three,", sp)) == out.text


def test_n_samples_and_seeds(smollm2):
    sp = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=11)
    a = smollm2.generate("Once upon a time", sp)[0]
    b = smollm2.generate("Once upon a time", sp)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


@pytest.mark.parametrize("prompt,match", [
    ("", "prompt 0 is empty"),
    ([10**6], "outside the vocabulary"),
    (3.5, "must be a string or a list of token ids"),
])
def test_bad_prompts(smollm2, prompt, match):
    with pytest.raises((ValueError, TypeError), match=match):
        smollm2.generate([prompt] if prompt != "" else "", SamplingParams(max_tokens=2))


def test_prompt_longer_than_context(smollm2):
    with pytest.raises(ValueError, match="max_model_len"):
        smollm2.generate([[5] * smollm2.max_model_len], SamplingParams(max_tokens=2))
