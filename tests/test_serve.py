"""serve.py: a real server on a random loopback port, talked to with the real `openai` client and
plain HTTP: chat and completions, streamed and not, n, stop strings, seeds; concurrent clients each
getting exactly what generate(..., 'ar') writes alone; disconnects, every error case, SIGTERM while
streaming, an engine failure; and the chat page in headless Chromium. Every request loop is
bounded (timeouts, a fixed number of tries)."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import ROOT, tiny_model

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # servers, as processes

LONG = "What is"  # see random_checkpoint
QUESTIONS = ["What is 123+456?", "What is 700+311?", "Say hi", "What is 999+999?", "2+2",
             "What is 405+596?", "Name a colour", "What is 100+100?"]


def random_checkpoint(folder, seed=0):
    """A checkpoint as train.py writes one, with random weights: the demo's tokenizer (its chat
    template opens a <think> block) and its mask token, block size 4. Its greedy answer to the
    completion prompt LONG never stops (3000 tokens): what the tests that need a long answer ask."""
    import chat
    from demo import demo_tokenizer
    tok = demo_tokenizer()
    mask_id, _ = chat.add_mask_token(tok)
    model = tiny_model("qwen3", vocab_size=128, seed=seed, max_position_embeddings=4096)
    model.config.mask_token_id, model.config.next_block_size = mask_id, 4
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


class Server:
    """`python serve.py --port=0 ...` with its address read from its first line; stopped (SIGTERM,
    then kill) at the end."""

    def __init__(self, ckpt, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt={ckpt}", "--port=0",
                                      "--device=cpu", *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines, self.clients = [], []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve.py ended: {self.proc.wait()} {self.proc.stderr.read()}")
            self.lines.append(line)
            if line.startswith("serving "):
                self.url = line.split(" on ")[-1].strip()
                break
        else:
            raise AssertionError("serve.py did not start in 120 s")
        self.name = line.split()[1]
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def client(self, key="none"):
        """An openai client, closed at `stop` (a socket left open warns: the suite fails)."""
        self.clients.append(openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                                          timeout=120))
        return self.clients[-1]

    def stop(self):
        for c in self.clients:
            c.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc.stdout.close()
        return self.proc.returncode


def post(url, body, headers=None, raw=None):
    """(status, parsed JSON body) of a POST; raw: bytes sent as they are."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:  # its connection closed, not left to the garbage collector
            return e.code, json.loads(e.read())


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def expected(folder, ids, max_new, **settings):
    """What generate(..., 'ar') writes for one prompt alone, with the server's stop tokens and
    never-written tokens (the model loaded as serve.py loads it)."""
    import chat
    from checkpoint import load_for_decoding
    from sample import generate
    from sampling import never_written, stop_ids
    if folder not in _MODELS:
        model, tok, path = load_for_decoding(folder, torch.device("cpu"))
        conversation = chat.Chat(tok)
        stops = stop_ids(conversation, path)
        _MODELS[folder] = (model, tok, conversation, stops,
                           never_written(conversation, model.config.mask_token_id, stops))
    model, tok, conversation, stops, never = _MODELS[folder]
    tokens, _ = generate(model, ids, "ar", max_new, eos_token_id=stops, suppress_tokens=never,
                         **settings)
    return tokens


_MODELS = {}


def chat_ids(folder, question):
    expected(folder, [1], 1)  # loads the model and its template
    return _MODELS[folder][2].prompt_ids([{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    folder = random_checkpoint(tmp_path_factory.mktemp("random") / "model")
    server = Server(folder, "--max_batch=8", "--served_model_name=tiny")
    yield server, folder
    assert server.stop() == 0, server.stderr


def test_chat_and_completions_streamed_or_not_are_ar_exactly(random_server):
    server, folder = random_server
    client = server.client()
    ids = chat_ids(folder, QUESTIONS[0])
    want = expected(folder, ids, 40, temperature=0.8, top_p=0.9, seed=[5])
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=40,
        temperature=0.8, top_p=0.9, seed=5, extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    assert choice.model_extra["token_ids"] == want and reply.model_extra["prompt_token_ids"] == ids
    assert choice.finish_reason == ("stop" if len(want) < 40 else "length")
    usage = reply.usage
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(want)
    assert 1 <= usage.model_extra["forwards"] <= len(want)
    # the demo template opens <think>: the text is reasoning until </think>, then content
    tok = _MODELS[folder][1]
    text = tok.decode(want[:-1] if choice.finish_reason == "stop" else want)
    reasoning, close, content = text.partition("</think>")
    message = choice.message
    assert (message.model_extra.get("reasoning_content") or "", message.content) == \
        (reasoning, content.lstrip() if close else "")
    shown = (message.model_extra.get("reasoning_content") or "") + message.content
    # streamed: the same tokens, one chunk per forward, usage at the end
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=40,
        temperature=0.8, top_p=0.9, seed=5, stream=True, stream_options={"include_usage": True},
        extra_body={"return_token_ids": True}))
    streamed = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids")
                                                               or [])]
    assert streamed == want and chunks[-1].usage.completion_tokens == len(want)
    assert 1 <= chunks[-1].usage.model_extra["forwards"] <= len(want)  # 'auto': timing decides
    deltas = "".join((ch.delta.model_extra.get("reasoning_content") or "") + (ch.delta.content or "")
                     for c in chunks for ch in c.choices)
    assert deltas == shown
    # completions: a string and token ids give the same answer; n answers use seed + j
    prompt_ids = tok("What is").input_ids
    for prompt in ("What is", prompt_ids):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, n=2, seed=3,
                                        temperature=1.0, extra_body={"return_token_ids": True})
        for j, c in enumerate(out.choices):
            assert c.model_extra["token_ids"] == expected(folder, prompt_ids, 12, temperature=1.0,
                                                          seed=[3 + j])
        assert out.choices[0].text != out.choices[1].text
    # a stop string ends the text before it
    greedy = expected(folder, prompt_ids, 30)
    full = tok.decode(greedy)
    stop = full[6:8]
    out = client.completions.create(model="tiny", prompt="What is", max_tokens=30, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="What is", max_tokens=30, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_concurrent_clients_each_get_their_answer_alone(random_server):
    """16 clients at once (more than the 8 rows: some wait), each its own prompt, temperature and
    seed, streamed or not: every answer is generate(..., 'ar') of its prompt alone."""
    server, folder = random_server
    cases = [(QUESTIONS[i % len(QUESTIONS)] + " " * (i // 8), [0.0, 0.7, 1.0][i % 3], 100 + i,
              i % 2 == 0) for i in range(16)]
    got = [None] * len(cases)

    def run(i):
        question, temperature, seed, streamed = cases[i]
        client = server.client()
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": question}],
                      max_tokens=48, temperature=temperature, seed=seed,
                      extra_body={"return_token_ids": True})
        if streamed:
            got[i] = [t for c in client.chat.completions.create(stream=True, **kwargs)
                      for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
        else:
            got[i] = client.chat.completions.create(**kwargs).choices[0].model_extra["token_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, (question, temperature, seed, _) in enumerate(cases):
        want = expected(folder, chat_ids(folder, question), 48, temperature=temperature,
                        seed=[seed])
        assert got[i] == want, i


def metric(server, name):
    status, text = get(server.url + "/metrics")
    assert status == 200
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("nextblock_" + name)}


def test_a_client_that_goes_away_frees_its_row(random_server):
    server, folder = random_server
    before = metric(server, "finished_total").get('nextblock_finished_total{reason="cancelled"}', 0)
    stream = server.client().completions.create(model="tiny", prompt=LONG, max_tokens=400,
                                                stream=True, temperature=0)
    next(iter(stream))
    stream.close()  # the connection closes mid-answer
    for _ in range(200):  # bounded: 20 s
        running = metric(server, "requests_running")["nextblock_requests_running"]
        cancelled = metric(server, "finished_total").get(
            'nextblock_finished_total{reason="cancelled"}', 0)
        if running == 0 and cancelled == before + 1:
            break
        time.sleep(0.1)
    assert running == 0 and cancelled == before + 1
    text = get(server.url + "/metrics")[1]
    for name in ("requests_waiting", "generation_tokens_total", "forwards_total",
                 "tokens_per_forward", 'steps_total{shape="', "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_count"):
        assert "nextblock_" + name in text, name


KEY = {"Authorization": "Bearer sk-test"}
OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ERROR_SERVER = ["--served_model_name=tiny", "--api_key=sk-test", "--max_batch=1", "--max_waiting=0",
                "--max_body_mb=0.01", "--max_model_len=200"]
ERRORS = [  # (mistake, path, body or raw bytes, headers, status, param, words in the message)
    ("no API key", "chat/completions", OK, {}, 401, None, "API key"),
    ("a wrong API key", "chat/completions", OK, {"Authorization": "Bearer wrong"}, 401, None,
     "API key"),
    ("a body that is not JSON", "chat/completions", b"{not json", KEY, 400, None, "not valid JSON"),
    ("messages of the wrong type", "chat/completions", {"messages": "hi"}, KEY, 400, "messages",
     "valid list"),
    ("a field of the wrong type", "chat/completions", {**OK, "temperature": "hot"}, KEY, 400,
     "temperature", "number"),
    ("a negative temperature", "chat/completions", {**OK, "temperature": -1}, KEY, 400,
     "temperature", "greater than or equal"),
    ("top_p above 1", "chat/completions", {**OK, "top_p": 1.5}, KEY, 400, "top_p",
     "less than or equal"),
    ("n = 0", "chat/completions", {**OK, "n": 0}, KEY, 400, "n", "greater than"),
    ("max_tokens past the context", "chat/completions", {**OK, "max_tokens": 500}, KEY, 400,
     "max_tokens", "maximum context length is 200"),
    ("a prompt longer than the context", "chat/completions",
     {"messages": [{"role": "user", "content": "x" * 300}]}, KEY, 400, "messages",
     "maximum context length"),
    ("an unknown role", "chat/completions", {**OK, "messages": [{"role": "wizard", "content": "hi"}]},
     KEY, 400, "messages", "unknown role"),
    ("a field this server does not do", "chat/completions", {**OK, "logprobs": True}, KEY, 400,
     "logprobs", "not supported"),
    ("an empty stop string", "chat/completions", {**OK, "stop": [""]}, KEY, 400, "stop", "empty"),
    ("a stop token outside the vocabulary", "chat/completions", {**OK, "stop_token_ids": [10 ** 6]},
     KEY, 400, "stop_token_ids", "vocabulary"),
    ("an unknown mode", "chat/completions", {**OK, "mode": "beam"}, KEY, 400, "mode", "decodes"),
    ("a token id outside the vocabulary", "completions", {"prompt": [10 ** 6]}, KEY, 400, "prompt",
     "vocabulary"),
    ("an unknown model", "chat/completions", {**OK, "model": "gpt-4"}, KEY, 404, "model",
     "does not exist"),
    ("an unknown path", "nope", OK, KEY, 404, None, "no such path"),
    ("a body over max_body_mb", "chat/completions",
     {**OK, "messages": [{"role": "user", "content": "x" * 20000}]}, KEY, 413, None, "larger than")]


def test_every_mistake_gets_an_openai_error_and_the_server_goes_on(tmp_path):
    folder = random_checkpoint(tmp_path / "model")
    server = Server(folder, *ERROR_SERVER)
    chat_url = server.url + "/v1/chat/completions"
    try:
        for what, path, body, headers, status, param, words in ERRORS:
            raw = body if isinstance(body, bytes) else None
            got, reply = post(f"{server.url}/v1/{path}", None if raw else body, headers, raw)
            assert got == status, (what, reply)
            error = reply["error"]
            assert set(error) == {"message", "type", "param", "code"}, reply
            assert error["param"] == param and words in error["message"], (what, error)
            assert "\n" not in error["message"]
        # a full queue: one row, no waiting room; a long answer holds the row
        client = server.client("sk-test")
        long = client.completions.create(model="tiny", prompt=LONG, max_tokens=150, stream=True,
                                         temperature=0)
        next(iter(long))
        status, reply = post(chat_url, OK, KEY)
        assert status == 429 and reply["error"]["code"] == "queue_full"
        long.close()
        for _ in range(100):  # the row frees within 10 s, and the server answers again
            status, reply = post(chat_url, OK, KEY)
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200 and reply["choices"][0]["message"] is not None
        assert get(server.url + "/health")[0] == 200  # /health and /metrics need no key
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr, server.stderr


def test_sigterm_while_streaming_ends_the_stream_and_exits_0(tmp_path):
    folder = random_checkpoint(tmp_path / "model")
    server = Server(folder, "--served_model_name=tiny", "--drain_s=1")
    client = server.client()
    stream = client.completions.create(model="tiny", prompt=LONG, max_tokens=3000, stream=True,
                                       temperature=0, extra_body={"return_token_ids": True})
    chunks = iter(stream)
    next(chunks)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    status, _ = get(server.url + "/health")
    assert status == 503  # draining: no new work
    assert post(server.url + "/v1/completions", {"prompt": "x"})[0] == 503
    rest = list(chunks)  # the stream ends by itself: aborted after drain_s, with its last chunk
    assert rest and rest[-1].choices[0].finish_reason == "abort"  # 3000 tokens take longer
    assert server.proc.wait(timeout=60) == 0
    assert server.stop() == 0 and "Traceback" not in server.stderr


def test_an_engine_failure_fails_its_requests_and_the_engine_recovers(tmp_path):
    """In process: a step that raises fails the requests in flight with 500, and the next request
    decodes as usual on a fresh cache."""
    import serve
    from api import ChatRequest
    from checkpoint import load_for_decoding
    folder = random_checkpoint(tmp_path / "model")
    model, tok, path = load_for_decoding(folder, torch.device("cpu"))
    service = serve.Service(model, tok, path, dict(
        mode="lossless", drafts=3, max_batch=4, max_waiting=4, max_model_len=0, reasoning=True,
        compile=False, chat_template_kwargs=None, served_model_name="tiny"))
    engine = service.engine
    broken = engine.decoders["lossless"]
    broken.step = lambda: (_ for _ in ()).throw(RuntimeError("a planted failure"))

    class Client:  # what Service.answer needs of a request: receive() for disconnects
        async def receive(self):
            await asyncio.sleep(3600)

    async def ask():
        body = ChatRequest(messages=[{"role": "user", "content": "What is 1+2?"}], max_tokens=8)
        try:
            return json.loads((await service.answer(Client(), body, "chat",
                                                    [service.chat_prompt(body)])).body)
        except serve.ApiError as e:
            return e.status, e.message

    engine.start()
    try:
        failed = asyncio.run(ask())
        assert failed[0] == 500 and "a planted failure" in failed[1]
        assert engine.decoders["lossless"] is not broken  # a fresh decoder
        reply = asyncio.run(ask())
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        engine.stop()


def browser():
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver), or skip."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium / chromedriver on this machine (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1200,800"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service as DriverService
    return webdriver.Chrome(service=DriverService(driver_path), options=options)


def test_the_chat_page_streams_the_answer_in_a_real_browser(trained_demo, tmp_path):
    from selenium.webdriver.common.by import By
    driver = browser()  # or skip, before a server starts
    server = Server(trained_demo["out_dir"], "--served_model_name=demo")
    try:
        driver.get(server.url + "/")
        assert "demo" in driver.title
        driver.find_element(By.ID, "compare").click()  # ar beside it
        driver.find_element(By.ID, "question").send_keys("What is 123+456?")
        driver.find_element(By.ID, "send").click()
        deadline = time.time() + 120
        while time.time() < deadline:
            answers = driver.find_elements(By.CSS_SELECTOR, ".answer")
            if len(answers) == 2 and all(a.get_attribute("data-done") == "true" for a in answers):
                break
            time.sleep(0.2)
        main, ar = answers
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        reply = server.client().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What is 123+456?"}])
        message = reply.choices[0].message
        assert main.get_attribute("data-content") == message.content == \
            ar.get_attribute("data-content")
        assert main.get_attribute("data-reasoning") == message.model_extra["reasoning_content"]
        spans = main.find_elements(By.CSS_SELECTOR, "span")
        assert {s.get_attribute("class").split()[0] for s in spans} == {"f0", "f1"}
        stats = driver.find_element(By.ID, "main-stats").text
        assert "tokens/forward" in stats and "tokens/s" in stats
        tokens, forwards = map(int, re.match(r"(\d+) tokens · (\d+) forwards", stats).groups())
        assert tokens == reply.usage.completion_tokens and 1 <= forwards < tokens  # drafts accepted
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()
        assert server.stop() == 0


if __name__ == "__main__":  # the server's table in docs/errors.md, from a real server
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        server = Server(random_checkpoint(Path(d) / "model"), *ERROR_SERVER)
        print("| mistake | status | `param` | message |\n|---|---|---|---|")
        try:
            for what, path, body, headers, status, param, _ in ERRORS:
                raw = body if isinstance(body, bytes) else None
                got, reply = post(f"{server.url}/v1/{path}", None if raw else body, headers, raw)
                message = reply["error"]["message"].replace("|", "\\|")
                print(f"| {what} | {got} | {param or ''} | {message} |")
        finally:
            server.stop()
