"""`jaxllm serve`: a real uvicorn server on 127.0.0.1 serving a tiny random model, driven by
the official ``openai`` client and by raw ``httpx`` requests.

One server (module scope) serves every test; its reference outputs come from
``LLM.generate`` on the same model before the server starts.  Tests that need a slow
device (disconnect, timeout, overload) slow the engine's step down for their duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import save_tiny_hf  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402

KEY = "test-key"
MODEL = "tiny"
MAX_LEN = 128
PROMPT = "Hi, how are you?"
CHAT = [{"role": "user", "content": "Tell me a joke."}]
DATA = Path(__file__).parent / "data" / "captain_byte.jsonl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_dir(tmp) -> Path:
    """A tiny random Llama with a small trained BPE tokenizer (and chat template)."""
    from jaxllm.train.testing import dataset_texts, train_tiny_tokenizer

    path, _ = save_tiny_hf(tmp, "llama", vocab_size=384)
    train_tiny_tokenizer(dataset_texts(DATA)).save_pretrained(path)
    return path


class Served:
    """The running server and what the tests compare it with."""

    def __init__(self, llm, server, port, refs):
        self.llm, self.server, self.port, self.refs = llm, server, port, refs
        self.url = f"http://127.0.0.1:{port}"
        self.app_state = server.config.app.state.server
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"})
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.name + "".join(f"[{v}]" for k, v in sorted(s.labels.items())
                                       if k != "model_name")
                out[key] = s.value
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Metrics once no request runs or waits and the server holds none."""
        end = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                    and m["jaxllm:server_requests_in_flight"] == 0) or time.monotonic() > end:
                return m
            time.sleep(0.05)

    @contextlib.contextmanager
    def slow_engine(self, delay: float):
        """Every engine step takes at least ``delay`` s (a slow device), while inside."""
        eng = self.llm.engine
        real = eng.step

        def slow():
            time.sleep(delay)
            return real()

        eng.step = slow
        try:
            yield
        finally:
            del eng.step  # back to the class's method


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from jaxllm.serve import ServeConfig, make_server

    path = _tiny_model_dir(tmp_path_factory.mktemp("serve"))
    # small engine: few bucket shapes, so few compiles
    llm = LLM(str(path), max_model_len=MAX_LEN, num_pages=48, page_size=8, max_num_seqs=4,
              max_num_batched_tokens=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    refs = {
        "text": llm.generate(PROMPT, greedy)[0],
        "chat": llm.chat(CHAT, greedy),
        "logprobs": llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=16,
                                                        logprobs=2))[0],
    }
    port = _free_port()
    server = make_server(llm, ServeConfig([MODEL, "alias"], api_key=KEY), port=port,
                         log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.02)
    s = Served(llm, server, port, refs)
    yield s
    server.should_exit = True
    thread.join(30)


# ---------------------------------------------------------------------- generation


def test_completion_equals_llm_generate(served):
    ref = served.refs["text"]
    out = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                           temperature=0)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    # token-id prompt, alias model name: the same completion
    out2 = served.client.completions.create(model="alias", prompt=ref.prompt_token_ids,
                                            max_tokens=16, temperature=0)
    assert out2.choices[0].text == ref.text
    # a batch of prompts: one choice per prompt, in order
    batch = served.client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT],
                                             max_tokens=16, temperature=0)
    assert [(c.index, c.text) for c in batch.choices] == [(0, ref.text), (1, ref.text)]
    assert batch.usage.completion_tokens == 2 * len(ref.token_ids)
    # streamed: the pieces add up to the same text, then usage, then [DONE]
    chunks = list(served.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason


def test_chat_equals_llm_chat(served):
    ref = served.refs["chat"]
    out = served.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                                temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = served.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                                   temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_raw_sse_framing(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
            "stream": True}
    with served.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_logprobs_match_llm_generate(served):
    ref = served.refs["logprobs"]
    out = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                           temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    want = [d[t] for t, d in zip(ref.token_ids, ref.outputs[0].logprobs)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    # keyed by token text (OpenAI's legacy shape): ids that decode alike share a key
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert all(max(top.values()) >= chosen - 1e-6 for top, chosen in
               zip(lp.top_logprobs, lp.token_logprobs))
    chat = served.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                                 temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_n_seeded_reproducible_and_penalties(served):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, seed=7, temperature=1.0,
              extra_body={"top_k": 50, "repetition_penalty": 1.1})
    a = served.client.completions.create(**kw)
    b = served.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # three different samples
    assert 3 <= a.usage.completion_tokens <= 24


def test_stop_string_and_echo(served):
    ref = served.refs["text"].text
    # a stop string from the middle of the greedy text: the output is cut before it
    cut = next(i for i in range(2, len(ref) - 2) if "\ufffd" not in ref[i:i + 2])
    stop = ref[cut:cut + 2]
    expect = ref[:ref.find(stop)]
    out = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                           temperature=0, stop=[stop])
    assert out.choices[0].text == expect and out.choices[0].finish_reason == "stop"
    echo = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                            temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + ref
    # vLLM's extras at the top level: ignore_eos + min_tokens run to max_tokens
    ext = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                           temperature=0,
                                           extra_body={"ignore_eos": True, "min_tokens": 12})
    assert ext.usage.completion_tokens == 12 and ext.choices[0].finish_reason == "length"


def test_concurrent_streaming_clients(served):
    ref = served.refs["text"]

    async def one(client):
        stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=100)))
        async with client:
            return await asyncio.gather(*[one(client) for _ in range(64)])

    texts = asyncio.run(main())
    assert texts == [ref.text] * 64
    m = served.wait_idle()
    assert m["vllm:kv_cache_usage_perc"] == 0.0


# ---------------------------------------------------------------------- cancellation


def test_disconnect_aborts_and_frees_pages(served):
    before = served.metrics().get("vllm:request_success_total[abort]", 0.0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0,
            "ignore_eos": True}
    with served.slow_engine(0.05):
        # streaming: read one chunk, hang up
        with served.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())
            assert served.metrics()["vllm:kv_cache_usage_perc"] > 0
        # non-streaming: hang up while it runs
        with _raw_post(served, body):
            _wait_for(lambda: served.metrics()["vllm:num_requests_running"] == 1)
        # non-streaming: hang up before it reaches the engine (the server is held inside
        # tokenization until the socket is closed, so it is admitted after its client left)
        srv, encode = served.app_state, served.app_state.encode
        entered, gone = threading.Event(), threading.Event()
        srv.encode = lambda *a: (entered.set(), gone.wait(10), encode(*a))[2]
        try:
            with _raw_post(served, body):
                assert entered.wait(10)
        finally:
            gone.set()
            del srv.encode
        m = served.wait_idle()
    assert m["vllm:kv_cache_usage_perc"] == 0.0  # every page back in the pool
    assert m["vllm:request_success_total[abort]"] == before + 3


@contextlib.contextmanager
def _raw_post(served, body: dict):
    """POST ``body`` to /v1/completions on a raw socket; leaving the block hangs up
    (no client-side timeout to race with the server's pace)."""
    data = json.dumps(body).encode()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        yield


def _wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_request_timeout(served):
    srv = served.app_state
    srv.config.request_timeout = 0.3
    try:
        with served.slow_engine(0.05):
            r = served.http.post("/v1/completions", json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True})
            stream = served.http.post("/v1/completions", json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True,
                "stream": True}).text
    finally:
        srv.config.request_timeout = 600.0
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert '"code": "request_timeout"' in stream and stream.endswith("data: [DONE]\n\n")
    assert served.wait_idle()["vllm:kv_cache_usage_perc"] == 0.0


def test_overload_gets_429_and_admitted_complete(served):
    srv = served.app_state
    srv.config.max_waiting_requests = 1  # capacity: 4 running + 1 waiting

    async def one(client):
        return await client.post("/v1/completions", json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
            "ignore_eos": True})

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*[one(c) for _ in range(9)])

    try:
        with served.slow_engine(0.05):
            rs = asyncio.run(main())
    finally:
        srv.config.max_waiting_requests = 256
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 5 + [429] * 4
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 48
    m = served.wait_idle()
    assert m["jaxllm:requests_rejected_total"] >= 4


# ---------------------------------------------------------------------- errors, auth, routes


@pytest.mark.parametrize("body,param,status", [
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature", 400),
    ({"prompt": PROMPT, "top_p": 0}, "top_p", 400),
    ({"prompt": PROMPT, "n": 0}, "n", 400),
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens", 400),
    ({"prompt": PROMPT, "logprobs": 99}, "logprobs", 400),
    ({"prompt": PROMPT, "stop": [""]}, "stop", 400),
    ({"prompt": PROMPT, "top_k": -5}, "top_k", 400),
    ({"prompt": PROMPT, "min_tokens": 30, "max_tokens": 10}, "min_tokens", 400),
    ({"prompt": [1, 2, 100000]}, "prompt", 400),
    ({"prompt": []}, "prompt", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"temperature": 0}, "prompt", 400),
    ({"prompt": PROMPT, "max_tokens": 1000}, "max_tokens", 400),
    ({"prompt": PROMPT, "model": "gpt-4"}, "model", 404),
    ({"prompt": PROMPT, "logit_bias": {"5": 1.0}}, "logit_bias", 400),
])
def test_invalid_completion_requests(served, body, param, status):
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_prompt_too_long_names_both_lengths(served):
    r = served.http.post("/v1/completions", json={"prompt": list(range(5, 205))})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "200" in msg and str(MAX_LEN) in msg
    r = served.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "arr " * 300}]})
    assert r.status_code == 400 and str(MAX_LEN) in r.json()["error"]["message"]
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    for raw in (b"{not json", b"[1, 2]", b'"a"', b"\xff\xfe"):
        r = served.http.post("/v1/completions", content=raw,
                             headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    r = served.http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_auth(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(served.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(served.url + "/v1/completions", headers=headers, json={"prompt": "x"})
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0
                      ).models.list()
    assert httpx.get(served.url + "/health").status_code == 200  # health needs no key


def test_routes(served):
    models = served.client.models.list().data
    assert [m.id for m in models] == [MODEL, "alias"]
    r = served.http.get("/health/generate")
    assert r.status_code == 200 and r.json()["tokens"] == 1
    assert served.http.get("/version").json()["version"]
    tok = served.http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tok["tokens"] == served.llm.tokenizer.encode(PROMPT)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_LEN
    chat_tok = served.http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat_tok["tokens"] == served.llm.apply_chat_template(CHAT)
    assert served.http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {
        "prompt": PROMPT}
    assert served.http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_metrics_names(served):
    served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    m = served.wait_idle()
    for name in ("vllm:time_to_first_token_seconds_count",
                 "vllm:time_per_output_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total[length]"):
        assert name in m, name
    assert m["vllm:time_to_first_token_seconds_count"] >= 1
    assert m["vllm:generation_tokens_total"] >= 4
    assert m["vllm:prefix_cache_hits_total"] > 0  # the same prompt, many times


# ---------------------------------------------------------------------- playground


def _browser():
    """Headless Chromium through Selenium, or skip saying what is missing."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                   if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1200,800"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_playground_in_browser(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    text = lambda el: browser.find_element(By.ID, el).get_attribute("textContent")  # noqa: E731
    try:
        browser.get(served.url + "/")
        browser.find_element(By.ID, "apikey").send_keys(KEY)
        browser.execute_script(
            "document.getElementById('apikey').dispatchEvent(new Event('change'))")
        wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        wait.until(lambda b: text("model").startswith(MODEL))
        for field, value in (("temperature", "0"), ("max_tokens", "16")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "input").send_keys(CHAT[0]["content"])
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: text("finish") in ("stop", "length"))
        replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert replies[-1].get_attribute("textContent") == served.refs["chat"].text
        assert text("ntok") == str(len(served.refs["chat"].token_ids))
        assert text("ttft").endswith(" s")
        wait.until(lambda b: text("kv").endswith("%"))  # the engine panel polls /metrics
        browser.save_screenshot(str(os.environ.get("JAXLLM_PLAYGROUND_SCREENSHOT",
                                                    tmp_path / "playground.png")))
        # Stop cancels: the server aborts the request and its pages come back
        before = served.metrics().get("vllm:request_success_total[abort]", 0.0)
        browser.find_element(By.ID, "clear").click()
        box = browser.find_element(By.ID, "max_tokens")
        box.clear()
        box.send_keys("80")
        with served.slow_engine(0.15):
            browser.find_element(By.ID, "input").send_keys("Another one")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: text("ttft").endswith(" s"))
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda b: text("finish") == "stopped")
            m = served.wait_idle()
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        assert m.get("vllm:request_success_total[abort]", 0.0) == before + 1
    finally:
        browser.quit()


# ---------------------------------------------------------------------- fuzzing

_weird = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
    st.text(max_size=20), st.just(""), st.just("\U0001F600" * 50),
    st.lists(st.integers(-5, 2**40), max_size=5), st.dictionaries(st.text(max_size=5),
                                                                  st.integers(), max_size=2))
_fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop",
           "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
           "echo", "stream", "top_k", "min_p", "repetition_penalty", "min_tokens",
           "ignore_eos", "stop_token_ids", "max_completion_tokens", "stream_options"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(_fields), _weird, max_size=6),
       base=st.sampled_from([{}, {"prompt": "arr"}, {"messages": [{"role": "user",
                                                                   "content": "hi"}]}]))
def test_fuzz_never_5xx(served, route, body, base):
    body = {**base, **body}
    if body.get("max_tokens") is None or not isinstance(body.get("max_tokens"), int):
        body.pop("max_tokens", None)
    r = served.http.post(route, json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzz_leaves_server_healthy(served):
    # tokenized off the event loop (long), then refused: longer than the context
    r = served.http.post("/v1/completions", json={"prompt": "\U0001F600" * 40 + "x" * 40000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = served.http.post("/v1/completions", content=b" " * (32 * 2**20 + 1),
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert served.http.get("/health/generate").status_code == 200
    assert served.wait_idle()["vllm:kv_cache_usage_perc"] == 0.0


# ---------------------------------------------------------------------- the command


def test_cli_serve_sigterm_exits_zero(served, tmp_path):
    """`jaxllm serve` in its own process: answers, then SIGTERM -> exit status 0."""
    port = _free_port()
    model_dir = Path(served.llm.model_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLM_NO_PROGRESS": "1"}
    code = ("import sys; from jaxllm.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(model_dir), "--port", str(port),
         "--served-model-name", "cli", "--max-model-len", str(MAX_LEN), "--num-pages", "48",
         "--page-size", "8", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "jaxllm serve did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "cli", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
        assert r.json()["choices"][0]["text"] == served.refs["text"].text
        # SIGTERM while a stream runs: the stream still completes, then the process exits 0
        body = {"model": "cli", "prompt": PROMPT, "max_tokens": 100, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                          timeout=60) as s:
            lines = s.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            events = [first] + [x for x in lines if x]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 100
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
