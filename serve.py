"""
An OpenAI-compatible server for a next-block checkpoint: every answer decoded losslessly (token for
token what `ar` writes, in fewer forwards), streamed, and continuously batched with the request's
own sampling. One engine thread owns the model: a request's rows join its Decoder (sample.py) at
the next step and leave the moment they finish.

  python serve.py --ckpt=out/demo                  # http://127.0.0.1:8000, the chat page at /
  python serve.py --ckpt=out/x --port=8001 --api_key=secret --max_batch=32
  python serve.py --ckpt=out/x --mode=ar           # one token per forward, for comparison

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
  client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text), GET / (the chat page, ui.html). docs/design.md, "Serving".
"""

# configurator first: from here on a mistake, or a Ctrl-C while torch loads, prints one line
from configurator import UserError, at_least, configure, first_line, one_of
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback
from collections import deque

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

import chat
from api import (UNSUPPORTED, ApiError, ChatRequest, CompletionRequest, Event, Guard, Reply, Text,
                 error_response, stream, watch)
from checkpoint import find_hf_folder, load_for_decoding
from common import ceil_to, resolve_device
from metrics import Metrics
from model import load_config
from policy import draft_policy
from sample import Decoder, Row, check_drafts, model_block, step_width
from sampling import generation_defaults, never_written, sampling_from, stop_ids

# -------------------------------------------------------------------------------------------------
# config (python serve.py [config.py] --key=value)
out_dir = "out/demo"             # where the newest checkpoint is looked up when ckpt is ''
ckpt = ""                        # an HF folder from train.py, its global_step_N, or a run's out_dir
host = "127.0.0.1"               # the address to listen on ('0.0.0.0': every interface)
port = 8000                      # 0: any free port (the line at start-up says which)
api_key = ""                     # '' = none; else clients send `Authorization: Bearer <api_key>`
served_model_name = ""           # the model's name in requests; '' = the checkpoint folder's
mode = "lossless"                # 'lossless' (drafts verified, answers == ar) or 'ar'
drafts = "auto"                  # lossless: 'auto' (chosen per step) or an int in [0, B-1]
max_batch = 16                   # answers decoding at once (KV cache rows)
max_waiting = 64                 # answers waiting for a row; a request beyond them gets 429
max_model_len = 0                # prompt + answer tokens; 0 = the model's positions
max_body_mb = 4.0                # a request body over this gets 413
drain_s = 30.0                   # SIGTERM / Ctrl-C: running answers may finish for this long
reasoning = True                 # the reply's <think> block goes to `reasoning_content`
chat_template_kwargs = None      # template options for every request; None = the trained ones
compile = False                  # torch.compile the decoding step (every cache slot allocated)
log_requests = False             # uvicorn's access log
device = "auto"                  # 'auto', 'cpu', 'cuda'
dtype = "float32"                # 'float32' (answers == ar exactly) or 'bfloat16'
# -------------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))  # ui.html lies beside this file


# -------------------------------------------------------------------------------------------------
# the engine: one thread, one Decoder, a bounded queue

class Job:
    """One request's answers (rows) and where their events go (an asyncio queue in its loop)."""

    def __init__(self, rows, loop):
        self.rows, self.loop, self.events, self.t0 = rows, loop, asyncio.Queue(), time.perf_counter()
        for i, row in enumerate(rows):
            row.key = (self, i)


class Engine:
    """The decoding loop in its own thread, over one Decoder per mode served (the server's mode,
    and ar beside lossless for comparison): rows wait (at most max_waiting per mode), join their
    Decoder when it has free rows (prefilled at the next step), step together, and leave when
    done; after each forward every row's new tokens go to its request. An exception inside a step
    fails that Decoder's requests (500) and the loop goes on with a fresh cache."""

    def __init__(self, model, decoder_args, max_batch, max_waiting, metrics):
        self.model, self.decoder_args, self.metrics = model, decoder_args, metrics
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.lock = threading.Condition()
        self.decoders = {m: self.fresh(m) for m in decoder_args}
        self.waiting, self.cancels = {m: deque() for m in decoder_args}, []
        self.running = self.draining = False
        self.sent, self.seen = {}, {}  # per row: tokens sent (-1: its end too), time of the last
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    def fresh(self, mode):
        return Decoder(self.model, rows=self.max_batch, **self.decoder_args[mode])

    def start(self):
        self.running = True
        self.thread.start()

    def stop(self):
        with self.lock:
            self.running = False
            self.lock.notify()
        self.thread.join(timeout=10)

    def counts(self):
        """(answers running, answers waiting), over every mode."""
        return (sum(len(d.busy) for d in self.decoders.values()),
                sum(len(w) for w in self.waiting.values()))

    def submit(self, job, mode):
        with self.lock:
            if self.draining:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            running = sum(r is not None for r in self.decoders[mode].slots)
            waiting = len(self.waiting[mode])
            if running + waiting + len(job.rows) > self.max_batch + self.max_waiting:
                raise ApiError(429, f"the server is busy: {running} answers running and {waiting} "
                               f"waiting (max_batch {self.max_batch}, max_waiting "
                               f"{self.max_waiting}); try again later", code="queue_full")
            self.waiting[mode].extend(job.rows)
            self.lock.notify()

    def cancel(self, rows, reason="cancelled"):
        """Stop rows at the next step (a client gone, a stop string seen, the server stopping)."""
        with self.lock:
            self.cancels += [(r, reason) for r in rows if not r.done]
            self.lock.notify()

    def idle(self):
        return not (self.cancels or any(self.waiting.values()) or
                    any(d.busy for d in self.decoders.values()))

    def loop(self):
        with torch.inference_mode():
            while True:
                with self.lock:
                    while self.running and self.idle():
                        self.lock.wait()
                    if not self.running:
                        return
                    for row, reason in self.cancels:
                        row.finish = row.finish or reason
                    self.cancels = []
                    joining = {m: self.take(m) for m in self.decoders}
                for mode, rows in joining.items():
                    self.advance(mode, rows)

    def take(self, mode):
        """The waiting rows that join now (the cancelled ones end here)."""
        queue, decoder = self.waiting[mode], self.decoders[mode]
        for row in [r for r in queue if r.done]:
            queue.remove(row)
            self.emit(row)
            self.metrics.finished(row)
        return [queue.popleft() for _ in range(min(decoder.free, len(queue)))]

    def advance(self, mode, joining):
        """One forward of a mode's Decoder (after its new rows' prefill), and what it wrote."""
        decoder = self.decoders[mode]
        try:
            decoder.join(joining)
            self.emit_all(decoder)
            decoder.step()
            self.emit_all(decoder)
        except Exception as e:  # the engine's fault, not a client's: logged, its requests failed
            traceback.print_exc()
            self.fail(mode, joining, f"the engine failed: {first_line(e)}")
            return
        for r in decoder.release():
            self.metrics.finished(r)
            self.sent.pop(r, None)
            self.seen.pop(r, None)
        if not any(decoder.slots) and decoder.f.cache.kv_len:
            self.decoders[mode] = self.fresh(mode)  # idle: let a long answer's cache go

    def emit_all(self, decoder):
        for r in decoder.slots:
            if r is not None:
                self.emit(r)

    def emit(self, row):
        """Send the row's tokens since the last emit, and its end once it is done (once)."""
        sent, now = self.sent.get(row, 0), time.perf_counter()
        if sent < 0 or (len(row.out) == sent and not row.done):
            return
        new, (job, index), last = row.out[sent:], row.key, self.seen.get(row)
        if new:
            self.metrics.tokens(new, job.t0 if last is None else last, now, first=last is None)
        self.sent[row], self.seen[row] = -1 if row.done else len(row.out), now
        self.post(job, Event(index, new, row.finish, None))

    def post(self, job, event):
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # its loop is closed: nobody is listening
            pass

    def fail(self, mode, joining, message):
        rows = [r for r in self.decoders[mode].slots if r is not None] + joining
        self.decoders[mode] = self.fresh(mode)  # before the answers: a retry finds a fresh cache
        for r in rows:
            r.finish = r.finish or "error"
            self.post(r.key[0], Event(r.key[1], [], "error", message))
            self.sent.pop(r, None)
            self.seen.pop(r, None)
        self.metrics.engine_errors += 1

    def drain(self):
        with self.lock:
            self.draining = True

    def abort_all(self):
        with self.lock:
            rows = [r for q in self.waiting.values() for r in q] + \
                [r for d in self.decoders.values() for r in d.slots if r is not None]
        self.cancel(rows, "abort")


class Service:
    """What the endpoints share: the tokenizer and its chat template (per template options), the
    checkpoint's sampling defaults, the tokens that end an answer and those never written, the
    context length, the engine and the metrics."""

    def __init__(self, model, tokenizer, folder, options):
        B, mask_id = model_block(model)
        mode = options["mode"]
        check_drafts(options["drafts"], B)
        if mode == "lossless" and mask_id is None:
            raise UserError(f"{folder} has no mask token: not trained by train.py, so it can only "
                            "be served with --mode=ar")
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.context = min(options["max_model_len"] or positions or 4096, positions or 1 << 30)
        self.tokenizer, self.folder, self.name = tokenizer, folder, options["served_model_name"]
        self.mode, self.defaults = mode, generation_defaults(folder)
        trained = getattr(model.config, "chat_template_kwargs", None) or {}
        self.options = dict(trained, **(options["chat_template_kwargs"] or {}))
        self.conversations = {}
        try:  # a tokenizer without a chat template serves /v1/completions only
            first = self.conversation(None)
        except ApiError:
            first = None
        self.stops = stop_ids(first, folder) if first else [tokenizer.eos_token_id]
        never = never_written(first, mask_id, self.stops) if first else [mask_id]
        self.thinks = options["reasoning"] and "<think>" in (tokenizer.chat_template or "")
        self.metrics = Metrics()
        policy = draft_policy(model, B - 1, options["compile"], "served") \
            if mode == "lossless" and options["drafts"] == "auto" else None
        common = dict(capacity=ceil_to(self.context + step_width(mode, B) + B, 64), block_size=B,
                      mask_token_id=mask_id, compiled=options["compile"],
                      suppress=[t for t in never if t is not None])
        decoders = {"ar": dict(common, mode="ar")}  # ar always: the page compares it beside
        if mode == "lossless":
            decoders["lossless"] = dict(common, mode="lossless", policy=policy,
                                        drafts=0 if policy else options["drafts"])
        self.engine = Engine(model, decoders, options["max_batch"], options["max_waiting"],
                             self.metrics)

    def conversation(self, kwargs):
        """The Chat of these template options over the server's (kept: building one renders
        probes)."""
        merged = dict(self.options, **(kwargs or {}))
        key = json.dumps(merged, sort_keys=True, default=str)
        if key not in self.conversations:
            if len(self.conversations) >= 16:
                self.conversations.pop(next(iter(self.conversations)))
            try:
                self.conversations[key] = chat.Chat(self.tokenizer, merged)
            except (UserError, chat.TemplateError) as e:
                raise ApiError(400, f"the chat template: {e}", "chat_template_kwargs") from None
        return self.conversations[key]

    def check(self, body):
        """The request names this model and asks for nothing this server does not do."""
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"the model `{body.model}` does not exist (this server serves "
                           f"`{self.name}`)", "model", "model_not_found")
        for key, allowed in UNSUPPORTED.items():
            value = (body.model_extra or {}).get(key, getattr(body, key, None))
            if value not in allowed:
                raise ApiError(400, f"{key}={value!r} is not supported by this server", key,
                               "unsupported_parameter")

    def chat_prompt(self, body):
        """(prompt ids, thinking: the prompt opened a <think> block) of a chat request."""
        conversation = self.conversation(body.chat_template_kwargs)
        try:
            messages = chat.check_messages(body.messages, "messages", "messages")
            text = conversation.render(messages, body.tools, generation=True)
            ids = conversation.prompt_ids(messages, body.tools)
        except UserError as e:
            raise ApiError(400, str(e).replace("messages: column 'messages' ", ""),
                           "messages") from None
        except chat.TemplateError as e:
            raise ApiError(400, f"the chat template refused these messages: {e}",
                           "messages") from None
        return ids, self.thinks and text.rfind("<think>") > text.rfind("</think>")

    def completion_prompts(self, body):
        """[(prompt ids, False)] of a completions request: a string, a list of them, token ids,
        or a list of those."""
        many = isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
        out, vocab = [], len(self.tokenizer)
        for p in body.prompt if many else [body.prompt]:
            ids = self.tokenizer(p).input_ids if isinstance(p, str) else list(p)
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, "prompt: empty, or a token id outside the vocabulary "
                               f"(0..{vocab - 1})", "prompt")
            out.append((ids, False))
        return out

    def rows(self, body, ids):
        """The request's answers to one prompt as Rows: its sampling (the checkpoint's defaults
        where it says nothing), seeds seed + j, stop tokens, length."""
        context, vocab = self.context, len(self.tokenizer)
        wanted = body.max_completion_tokens or body.max_tokens
        if len(ids) + (wanted or 1) > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the "
                           f"request needs {len(ids) + (wanted or 1)} ({len(ids)} in the prompt, "
                           f"{wanted or 1} in the answer): shorten the prompt or lower max_tokens",
                           "max_tokens" if wanted else "messages", "context_length_exceeded")
        try:
            sampling = sampling_from(self.defaults, body.temperature,
                                     0 if body.top_k == -1 else body.top_k, body.top_p, body.min_p)
        except UserError as e:
            raise ApiError(400, str(e), str(e).split("=")[0]) from None
        extra = set(body.stop_token_ids or [])
        if any(not 0 <= t < vocab for t in extra):
            raise ApiError(400, "stop_token_ids: every id must be a token of the model's "
                           f"vocabulary (0..{vocab - 1})", "stop_token_ids")
        seed = body.seed if body.seed is not None else random.getrandbits(31)
        return [Row(ids, seed=seed + j, sampling=sampling, stops=frozenset(self.stops) | extra,
                    max_new=wanted or context - len(ids)) for j in range(body.n)]

    async def answer(self, request, body, kind, prompts):
        """Decode prompts ((ids, thinking) each) n times each; stream or collect the reply."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop: a stop string must not be empty", "stop")
        rows, texts = [], []
        for ids, thinking in prompts:
            for row in self.rows(body, ids):
                rows.append(row)
                texts.append(Text(self.tokenizer, stops, thinking, row.stops))
        mode = body.mode or self.mode
        if mode not in self.engine.decoders:
            raise ApiError(400, f"mode={mode!r}: this server decodes "
                           f"{' or '.join(map(repr, self.engine.decoders))}", "mode")
        job = Job(rows, asyncio.get_running_loop())
        self.engine.submit(job, mode)
        watcher = asyncio.create_task(watch(request, self.engine, rows))
        reply = Reply(kind, self.name, body, job, texts, [ids for ids, _ in prompts], self.engine)
        if body.stream:
            return StreamingResponse(stream(reply, watcher), media_type="text/event-stream")
        try:
            await reply.collect()
        finally:
            watcher.cancel()
            self.engine.cancel(rows)
        return JSONResponse(reply.whole())


def make_app(service, api_key="", max_body_mb=4.0):
    """The FastAPI app: the endpoints, OpenAI error bodies for every mistake, the guard; the
    service's engine runs while the app does."""
    engine, metrics = service.engine, service.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="next-block", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, key=api_key, limit=int(max_body_mb * 2 ** 20), metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        metrics.request_errors[e.status] += 1
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        metrics.request_errors[400] += 1
        err = (e.errors() or [{}])[0]
        if err.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON", code="invalid_json")
        param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
        return error_response(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param,
                              code="invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        metrics.request_errors[e.status_code] += 1
        message = {404: f"no such path: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(e.status_code, message.get(e.status_code, str(e.detail)),
                              code={404: "not_found", 413: "request_too_large"}.get(e.status_code))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check(body)
        return await service.answer(request, body, "chat", [service.chat_prompt(body)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check(body)
        return await service.answer(request, body, "completion", service.completion_prompts(body))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": service.name, "object": "model", "owned_by": "next-block",
            "created": int(os.path.getmtime(service.folder)), "max_model_len": service.context}]}

    @app.get("/health")
    async def health():  # 503 while draining: a load balancer sends new requests elsewhere
        running, waiting = engine.counts()
        return JSONResponse({"status": "draining" if engine.draining else "ok",
                             "running": running, "waiting": waiting},
                            status_code=503 if engine.draining else 200)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(*engine.counts()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        with open(os.path.join(HERE, "ui.html")) as f:
            return HTMLResponse(f.read().replace("{{MODEL}}", service.name)
                                .replace("{{MODE}}", service.mode))

    return app


# -------------------------------------------------------------------------------------------------
# running it: a socket, uvicorn, and signals that drain

class Server(uvicorn.Server):
    """uvicorn's server with this script's signals: the first SIGTERM / Ctrl-C stops taking
    requests (503) and lets the running answers finish for up to drain_s, then ends them
    ('abort') and exits 0; a second Ctrl-C exits at once."""

    def __init__(self, config, engine, drain_seconds):
        super().__init__(config)
        self.engine, self.drain_seconds, self.draining = engine, drain_seconds, False

    def capture_signals(self):
        loop = asyncio.get_running_loop()

        def handle(signum, frame):
            if self.draining:
                self.should_exit = self.force_exit = True
                return
            self.draining = True
            print(f"{signal.Signals(signum).name}: draining (up to {self.drain_seconds:g} s; "
                  "Ctrl-C again to stop now)", flush=True)
            loop.call_soon_threadsafe(lambda: loop.create_task(self.drain()))

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, handle)
        return contextlib.nullcontext()

    async def drain(self):
        self.engine.drain()
        deadline = time.monotonic() + self.drain_seconds
        while any(self.engine.counts()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.engine.abort_all()
        for _ in range(100):  # the aborted streams send their last chunk
            if not any(self.engine.counts()):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        self.should_exit = True


def model_name(path):
    """A served model's name from the path it was given by: its run's folder (out/demo -> demo),
    whether the path is the run, a global_step_N in it, or that step's huggingface/ folder."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    while len(parts) > 1 and (parts[-1] == "huggingface" or parts[-1].startswith("global_step_")):
        parts.pop()
    return parts[-1]


def check_serve(c):
    """The settings of serve.py, checked before the model loads."""
    one_of("mode", c["mode"], ("lossless", "ar"))
    one_of("dtype", c["dtype"], ("float32", "bfloat16"))
    for key in ("max_batch", "max_waiting", "port"):
        at_least(key, c[key], 1 if key == "max_batch" else 0)
    if c["port"] > 65535:
        raise UserError(f"port={c['port']}: must be at most 65535")
    for key in ("max_model_len", "drain_s"):
        at_least(key, c[key], 0)
    if not c["max_body_mb"] > 0:
        raise UserError(f"max_body_mb={c['max_body_mb']!r}: must be > 0")
    if c["chat_template_kwargs"] is not None and not isinstance(c["chat_template_kwargs"], dict):
        raise UserError(f"chat_template_kwargs={c['chat_template_kwargs']!r}: expected a dict")
    return int(c["drafts"]) if str(c["drafts"]).isdigit() else c["drafts"]


if __name__ == "__main__":
    config = configure(globals())
    drafts = check_serve(config)
    dev = resolve_device(device)
    path = find_hf_folder(ckpt or out_dir)
    if mode == "lossless" and getattr(load_config(path), "mask_token_id", None) is None:
        raise UserError(f"{path} has no mask token: not trained by train.py, so it can only be "
                        "served with --mode=ar")
    try:
        listener = socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    model, tokenizer, _ = load_for_decoding(path, dev)
    model = model.to(getattr(torch, dtype))
    service = Service(model, tokenizer, path, dict(
        mode=mode, drafts=drafts, max_batch=max_batch, max_waiting=max_waiting,
        max_model_len=max_model_len, reasoning=reasoning, compile=compile,
        chat_template_kwargs=chat_template_kwargs,
        served_model_name=served_model_name or model_name(ckpt or out_dir)))
    app = make_app(service, api_key, max_body_mb)
    if not log_requests:
        logging.getLogger("uvicorn.access").disabled = True
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                   lifespan="on"), service.engine, drain_s)
    bound = listener.getsockname()
    print(f"serving {service.name} ({path}, {mode}, max_batch {max_batch}) on http://{bound[0]}:"
          f"{bound[1]}", flush=True)
    server.run(sockets=[listener])
    print("stopped", flush=True)
