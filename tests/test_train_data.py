"""Fine-tuning data: record formats, assistant-only loss masks, packing, loader, errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.train import data as D
from jaxllm.train.testing import dataset_texts, train_tiny_tokenizer

DATA = Path(__file__).parent / "data" / "captain_byte.jsonl"


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(dataset_texts(DATA))


def _trained_text(tok, ids, mask):
    return tok.decode(ids[mask], skip_special_tokens=False)


def test_instruction_record_masks_only_the_answer(tok):
    kind, msgs = D.record_to_messages(
        {"instruction": "Say hi.", "input": "to Bob", "output": "Hi Bob!", "system": "Be brief."},
        "x:1")
    assert kind == "chat"
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hi.\n\nto Bob"},
                    {"role": "assistant", "content": "Hi Bob!"}]
    ids, mask = D.tokenize_chat(tok, msgs)
    full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert tok.decode(ids, skip_special_tokens=False) == full
    assert _trained_text(tok, ids, mask) == "Hi Bob!<|im_end|>\n"
    # the prompt part is exactly what inference tokenizes (chat template + generation prompt)
    prompt = tok.encode(tok.apply_chat_template(msgs[:-1]), add_special_tokens=False)
    assert list(ids[:len(prompt)]) == prompt and not mask[:len(prompt)].any()


@pytest.mark.parametrize("rec", [
    {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A1"},
                  {"role": "user", "content": "b?"}, {"role": "assistant", "content": "B2"}]},
    {"conversations": [{"from": "human", "value": "a?"}, {"from": "gpt", "value": "A1"},
                       {"from": "human", "value": "b?"}, {"from": "gpt", "value": "B2"}]},
    {"history": [["a?", "A1"]], "instruction": "b?", "output": "B2"},
    {"history": [["a?", "A1"]], "prompt": "b?", "response": "B2"},
], ids=["messages", "sharegpt", "history", "prompt-response"])
def test_multi_turn_formats_train_every_assistant_turn(tok, rec):
    kind, msgs = D.record_to_messages(rec, "x:1")
    ids, mask = D.tokenize_chat(tok, msgs)
    # two separate trained spans, each the answer + end-of-turn
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == \
        ["A1<|im_end|>\n", "B2<|im_end|>\n"]


def test_non_prefix_stable_template_falls_back_to_search(tok):
    # a template that renders differently once a later turn exists (not prefix-stable)
    template = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}<|im_start|>{{ m['role'] }}"
                "\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the answer"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}]
    ids, mask = D.tokenize_chat(tok, msgs, template)
    text = _trained_text(tok, ids, mask)
    assert text == "the answer<|im_end|>second<|im_end|>"


def test_text_records_train_on_all_tokens_plus_eos(tok, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"content": "x y"}) + "\n")
    ex = D.load_examples(f, tok)
    assert len(ex) == 2
    assert ex[0].tokens[-1] == tok.eos_token_id and ex[0].mask.all()
    assert ex[0].source.endswith("t.jsonl:1") and ex[1].source.endswith("t.jsonl:3")


@pytest.mark.parametrize("line,needle", [
    ('{"instruction": "hi", "output": 3}', "field 'output' must be a string, got int"),
    ('{"instruction": "hi"}', "missing field 'output'"),
    ('{"messages": [{"role": "pirate", "content": "x"}]}', "field 'messages[0].role'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"history": [["a"]], "instruction": "q", "output": "a"}', "field 'history[0]'"),
    ('{"foo": 1}', "unrecognised record"),
    ('{"instruction": "hi", "output": "x"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_record_error_names_line_and_field(tok, tmp_path, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "ok", "output": "fine"}\n' + line + "\n")
    with pytest.raises(D.DataError) as e:
        D.load_examples(f, tok)
    assert f"bad.jsonl:2: " in str(e.value) and needle in str(e.value), str(e.value)


def test_dataset_loads_and_is_learnable_style(tok):
    stats = D.DatasetStats()
    ex = D.load_examples(DATA, tok, stats=stats)
    assert 100 <= stats.records <= 200 and stats.examples == stats.records
    for e in ex:
        text = _trained_text(tok, e.tokens, e.mask)
        assert text.startswith("Arr, matey! ") and "Fair winds!<|im_end|>" in text, e.source


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [D.Example(rng.integers(3, 50, n).astype(np.int32), rng.random(n) < 0.5, f"e{i}")
            for i, n in enumerate(lengths)]


def test_packing_rows_segments_positions():
    ex = _examples([5, 9, 4, 20, 3])
    rows = D.pack(ex, 16)
    seg, pos = rows["segment_ids"], rows["positions"]
    assert rows["inputs"].shape[1] == 16
    # every example appears exactly once, contiguous, positions restart at 0
    found = 0
    for r in range(len(seg)):
        for s in set(seg[r].tolist()) - {0}:
            idx = np.nonzero(seg[r] == s)[0]
            assert (np.diff(idx) == 1).all() and (pos[r, idx] == np.arange(len(idx))).all()
            found += 1
    assert found == 5
    assert (rows["weights"][seg == 0] == 0).all()
    # inputs/targets are the shifted example (the 20-token one is cut to 17 = 16 + 1)
    e = ex[0]
    r, idx = next((r, np.nonzero(seg[r] == 1)[0]) for r in range(len(seg)))
    assert (rows["inputs"][r, idx] == e.tokens[:-1]).all()
    assert (rows["targets"][r, idx] == e.tokens[1:]).all()
    assert (rows["weights"][r, idx] == e.mask[1:]).all()
    unpacked = D.pack(ex, 16, packing=False)
    assert len(unpacked["inputs"]) == 5 and len(rows["inputs"]) < 5


def test_loader_is_deterministic_resumable_and_prefetches():
    ex = _examples([6, 7, 8, 9, 10, 11, 12, 5, 4, 3] * 3)
    a = D.DataLoader(ex, 24, 4, seed=3, prefetch=2)
    it = iter(a)
    batches = [next(it) for _ in range(7)]  # runs over an epoch boundary
    it.close()
    b = D.DataLoader(ex, 24, 4, seed=3, prefetch=0)
    it_b = iter(b)
    for batch, state in batches:
        got, st = next(it_b)
        assert st == state
        for k in D.FIELDS:
            np.testing.assert_array_equal(got[k], batch[k])
    # resume from the state after batch 3
    c = D.DataLoader(ex, 24, 4, seed=3, prefetch=2, state=batches[3][1])
    it_c = iter(c)
    for batch, state in batches[4:]:
        got, st = next(it_c)
        assert st == state
        np.testing.assert_array_equal(got["inputs"], batch["inputs"])
    it_c.close()
    # another seed shuffles differently; epochs differ from each other
    other = D.DataLoader(ex, 24, 4, seed=4).epoch_rows(0)["inputs"]
    assert not np.array_equal(other, a.epoch_rows(0)["inputs"][:len(other)])


def test_prefetch_propagates_errors():
    def gen():
        yield 1
        raise RuntimeError("boom")
    it = D.prefetch(gen(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_split_is_deterministic():
    ex = _examples([5] * 20)
    tr, ev = D.split_examples(ex, 0.2, seed=1)
    tr2, ev2 = D.split_examples(ex, 0.2, seed=1)
    assert len(ev) == 4 and [e.source for e in ev] == [e.source for e in ev2]
    assert {e.source for e in tr} | {e.source for e in ev} == {e.source for e in ex}
