"""
The OpenAI protocol, as serve.py speaks it: the request fields (typed: a wrong type is a 400 that
names the field), the error bodies, the key and body-size guard, an answer's text as it streams
(stop strings cut, `<think>` reasoning apart), and the chat.completion / text_completion replies
and their server-sent chunks. No model here: serve.py's engine fills a Reply's events.
"""

import hmac
import json
import time
import uuid
from typing import NamedTuple, Optional, Union

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


UNSUPPORTED = {  # request fields that would change an answer and that this server does not do
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "response_format": (None, {"type": "text"}), "suffix": (None, ""), "guided_json": (None,),
    "tool_choice": (None, "auto", "none")}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request's mistake, or the server's state, as an OpenAI error body."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status, message, param=None, code=None):
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status, message, param=None, code=None):
    return JSONResponse(error_body(status, message, param, code), status_code=status)


# -------------------------------------------------------------------------------------------------
# requests: the fields, typed (a wrong type is a 400 naming the field)

class Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    """What chat and completions requests share: the model, the answer's length, its sampling."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM's -1 (and 0): off
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: bool = False
    mode: Optional[str] = None  # this server's: 'lossless' (its default) or 'ar', for comparison


class ChatRequest(Sampled):
    messages: list[dict]
    tools: Optional[list[dict]] = None
    chat_template_kwargs: Optional[dict] = None


class CompletionRequest(Sampled):
    prompt: Union[str, list[str], list[int], list[list[int]]]


# -------------------------------------------------------------------------------------------------
# the answer's text: streamed as it grows, stop strings cut, reasoning apart

class Event(NamedTuple):
    """What the engine tells a request about one of its answers after a forward."""
    index: int  # the answer (choice) in its request
    tokens: list  # the tokens this forward wrote
    finish: str  # None while it decodes; 'stop', 'length', 'abort' (the server stopped) ...
    error: str  # an engine failure: the request fails with 500



class Text:
    """One choice's text, decoded as its tokens arrive. `update` returns what can be sent now: the
    text is held back where it might still become a stop string, `</think>`, or a character
    whose bytes are not all there. With thinking, the text before `</think>` is reasoning."""

    def __init__(self, tokenizer, stops, thinking, stop_ids):
        self.tok, self.stops, self.thinking, self.stop_ids = tokenizer, stops, thinking, stop_ids
        self.tokens, self.text = [], ""
        self.reasoning, self.content = "", ""  # what was sent of each
        self.stopped = False  # a stop string ended it
        self.finish = None

    def update(self, tokens, finish):
        """(reasoning delta, content delta) after tokens arrive; finish: the engine's reason."""
        if self.finish is not None:
            return "", ""
        self.tokens += tokens
        body = self.tokens[:-1] if finish == "stop" and self.tokens and \
            self.tokens[-1] in self.stop_ids else self.tokens
        text = self.tok.decode(body, skip_special_tokens=False)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, finish = text[:cut], True, "stop"
        self.finish = finish
        safe = len(text) if finish else self.hold(text)
        reasoning, content = split_reasoning(text[:safe], self.thinking)
        delta = reasoning[len(self.reasoning):], content[len(self.content):]
        self.reasoning, self.content, self.text = reasoning, content, text
        return delta

    def hold(self, text):
        """How much of text is safe to send: not a trailing partial character, nor a tail that
        could still grow into a stop string or `</think>`."""
        end = len(text.rstrip("\ufffd"))
        marks = self.stops + (["</think>"] if self.thinking else [])
        for mark in marks:
            for n in range(min(len(mark) - 1, end), 0, -1):
                if text[end - n:end] == mark[:n]:
                    end -= n
                    break
        return end


def split_reasoning(text, thinking):
    """(reasoning, content): with thinking, what precedes `</think>` (a leading `<think>` dropped)
    and what follows it (leading whitespace dropped); else ("", text)."""
    if not thinking:
        return "", text
    before, close, after = text.partition("</think>")
    before = before[len("<think>"):] if before.startswith("<think>") else before
    return before, after.lstrip() if close else ""


class Guard:
    """The API key (/v1 only: /health and /metrics are the operator's) and the body's size (by its
    Content-Length, and as a chunked body arrives), checked before a route reads anything."""

    def __init__(self, app, key, limit, metrics):
        self.app, self.key, self.limit, self.metrics = app, key, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = None
        if self.key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                refusal = (401, "missing or wrong API key (send the header `Authorization: "
                           "Bearer <key>`)", "invalid_api_key")
        size = headers.get(b"content-length", b"0")
        if refusal is None and (not size.isdigit() or int(size) > self.limit):
            refusal = (413, self.too_large(), "request_too_large")
        if refusal is not None:
            self.metrics.request_errors[refusal[0]] += 1
            response = error_response(refusal[0], refusal[1], code=refusal[2])
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self.too_large())
            return message

        await self.app(scope, counted, send)

    def too_large(self):
        return f"the body is larger than {round(self.limit / 2 ** 20, 3):g} MB (max_body_mb)"


async def watch(request, engine, rows):
    """Cancel the rows when the client goes away (a closed tab, a killed script)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.cancel(rows)
            return


class Reply:
    """A request's reply as it builds: OpenAI's chat.completion / text_completion objects and
    their stream chunks."""

    def __init__(self, kind, name, body, job, texts, prompt_ids, engine):
        self.kind, self.name, self.body, self.job, self.texts = kind, name, body, job, texts
        self.prompt_ids, self.engine = prompt_ids, engine
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created, self.done = int(time.time()), 0

    def object(self, chunk):
        base = "chat.completion" if self.kind == "chat" else "text_completion"
        return base + ".chunk" if chunk and self.kind == "chat" else base

    async def next(self):
        """The next event's choice index and deltas, or raise ApiError(500) on an engine failure."""
        event = await self.job.events.get()
        if event.error:
            raise ApiError(500, event.error, code="engine_error")
        text = self.texts[event.index]
        if text.finish is not None:
            return None
        delta = text.update(event.tokens, event.finish)
        if text.stopped and event.finish is None:  # a stop string: the engine may stop it too
            self.engine.cancel([self.job.rows[event.index]], "stop")
        if text.finish is not None:
            self.done += 1
        return event.index, event.tokens, delta

    async def collect(self):
        while self.done < len(self.texts):
            await self.next()

    def usage(self):
        completion = sum(len(t.tokens) for t in self.texts)
        prompt = sum(len(p) for p in self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "forwards": sum(r.forwards for r in self.job.rows)}

    def head(self):
        return {"id": self.id, "object": self.object(False), "created": self.created,
                "model": self.name}

    def whole(self):
        choices = []
        for i, t in enumerate(self.texts):
            choice = {"index": i, "finish_reason": t.finish, "logprobs": None}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": t.content,
                                     "reasoning_content": t.reasoning or None}
            else:
                choice["text"] = t.content
            if self.body.return_token_ids:
                choice["token_ids"] = t.tokens
            choices.append(choice)
        out = dict(self.head(), choices=choices, usage=self.usage())
        if self.body.return_token_ids:
            out["prompt_token_ids"] = self.prompt_ids[0] if len(self.prompt_ids) == 1 \
                else self.prompt_ids
        return out

    def chunk(self, index, tokens, delta, finish, first=False):
        reasoning, content = delta
        choice = {"index": index, "finish_reason": finish, "logprobs": None}
        if self.kind == "chat":
            choice["delta"] = {"role": "assistant", "content": ""} if first else \
                {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
        else:
            choice["text"] = content
        if self.body.return_token_ids and not first:
            choice["token_ids"] = tokens
        out = dict(self.head(), object=self.object(True), choices=[choice])
        if self.body.stream_options and self.body.stream_options.include_usage:
            out["usage"] = None
        return out


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(reply, watcher):
    """The reply as server-sent events, one chunk per forward of each choice, then [DONE]."""
    try:
        if reply.kind == "chat":
            for i in range(len(reply.texts)):
                yield sse(reply.chunk(i, [], ("", ""), None, first=True))
        while reply.done < len(reply.texts):
            try:
                got = await reply.next()
            except ApiError as e:
                yield sse(error_body(e.status, e.message, code=e.code))
                break
            if got is not None:
                index, tokens, delta = got
                yield sse(reply.chunk(index, tokens, delta, reply.texts[index].finish))
        else:
            if reply.body.stream_options and reply.body.stream_options.include_usage:
                yield sse(dict(reply.head(), object=reply.object(True), choices=[],
                               usage=reply.usage()))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        reply.engine.cancel(reply.job.rows)
