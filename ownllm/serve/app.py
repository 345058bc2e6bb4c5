"""`ownllm serve`: an OpenAI-compatible HTTP API (FastAPI) over one run, with streaming.

Where it sits: the deployment end of the flow. Endpoints: GET /health, GET /v1/models,
POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings. Every generation goes
through the continuous batcher (inference/batcher.py), so concurrent clients share decode
steps. Requests are validated by hand so that any malformed body gets an OpenAI-style error
object with a 4xx status (never a 500) and the server keeps serving.

Who may call it: by default only this machine's browser pages from the same origin and local
programs. The Host header must name 127.0.0.1, localhost, [::1] or the bound host (a DNS-rebinding
page names its own domain), a request that carries an Origin must come from this server's own
origin or one given with --allow-origin (which also answers CORS preflights), POST bodies must
be JSON, and with an API key (--api-key or OWNLLM_API_KEY) every /v1 call must carry it. Work that
can take long (rendering, tokenising, retrieval, tools) runs off the event loop, so /health and
other streams keep answering; a client that leaves frees its slot; past `max_waiting` queued
requests the answer is 503 with Retry-After. Fields this server cannot honour (n > 1, logprobs)
are a 400 naming them, never silently ignored. `response_format` (JSON mode, a JSON schema)
constrains the reply so it always parses (inference/structured.py).

Extras beyond the OpenAI schema: with `--kb`, a chat turn is answered from the knowledge base
(rag/answer.py) and the response carries `sources` (and `support`, streamed in the last chunk: the source
sentence that says each part of the answer); with `--tools`, the server runs the built-in
tools itself (agent loop) and returns the final answer with the trace in `tool_trace`. Tools
sent *by the client* (`tools` in the request) are not run: the reply carries `tool_calls` and
`finish_reason: "tool_calls"`, as OpenAI does; a tool marked `strict: true` gets calls whose
arguments fit its parameters schema, and `tool_choice` "required" or a tool's name is honoured.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ownllm.errors import OwnLLMError
from ownllm.inference.batcher import ContinuousBatcher, QueueFull, Request
from ownllm.inference.engine import SamplingParams
from ownllm.inference.generate import StopStrings

MAX_BODY = 1 << 20  # bytes
MAX_DEPTH = 32      # nesting of a request body (the deepest real one, tools' schemas, is far less)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SEED_RANGE = (-(2 ** 63), 2 ** 64)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerState:
    model: Any
    tok: Any
    model_id: str
    batcher: ContinuousBatcher
    api_key: str | None = None
    kb: Any = None
    registry: Any = None
    max_body: int = MAX_BODY
    template_kwargs: dict = field(default_factory=dict)   # defaults for an imported chat template's variables
    allow_hosts: frozenset = frozenset()                  # Host header values served besides LOCAL_HOSTS
    allow_origins: frozenset = frozenset()                # cross origins allowed (CORS), besides same-origin
    created: int = field(default_factory=lambda: int(time.time()))


def check_body(body) -> None:
    """Nesting depth and text a tokenizer can take (a lone surrogate from "\\ud800" is not UTF-8),
    walked without recursion."""
    stack = [(body, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"body nested deeper than {MAX_DEPTH} levels")
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
        elif isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
            stack.extend((k, depth + 1) for k in x)
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)


def refuse_unsupported(body: dict) -> None:
    """Fields the server cannot honour: a 400 naming them, never a reply that pretends."""
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(400, "'n' other than 1 is not supported: send one request per choice", "n")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "'best_of' is not supported", "best_of")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise APIError(400, "'logprobs' / 'top_logprobs' are not supported by this server", "logprobs")
    if body.get("echo") not in (None, False):
        raise APIError(400, "'echo' is not supported", "echo")
    if body.get("suffix") not in (None, ""):
        raise APIError(400, "'suffix' is not supported", "suffix")


def busy(e: QueueFull) -> APIError:
    return APIError(503, f"the server is busy ({e}); try again shortly", code="server_busy", type_="server_error",
                    headers={"Retry-After": "1"})


# -- validation ------------------------------------------------------------------------------------
def _get(body: dict, key: str, types, default=None, *, check=None, what: str = ""):
    if key not in body or body[key] is None:
        return default
    v = body[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{key}' must be {what or types}", key)
    if not isinstance(v, types):
        raise APIError(400, f"'{key}' must be {what or getattr(types, '__name__', types)}", key)
    if check is not None and not check(v):
        raise APIError(400, f"'{key}' is out of range: {what}", key)
    return v


def sampling_from(body: dict, state: ServerState, prompt_len: int, stop_ids: tuple[int, ...]) -> tuple[SamplingParams, list[str]]:
    ctx = state.model.config.max_seq_len
    room = ctx - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {ctx}", "messages",
                       "context_length_exceeded")
    max_tokens = _get(body, "max_completion_tokens", int, None, check=lambda v: v >= 1, what="an integer >= 1")
    max_tokens = _get(body, "max_tokens", int, max_tokens, check=lambda v: v >= 1, what="an integer >= 1")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} does not fit: the prompt is {prompt_len} tokens and the "
                       f"context is {ctx}", "max_tokens", "context_length_exceeded")
    temperature = _get(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2, what="a number in [0, 2]")
    top_p = _get(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]")
    seed = _get(body, "seed", int, None, check=lambda v: SEED_RANGE[0] <= v < SEED_RANGE[1],
                what="an integer in [-2^63, 2^64)")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stops = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    params = SamplingParams(max_new_tokens=max_tokens or room, temperature=float(temperature), top_k=None,
                            top_p=float(top_p), seed=seed, stop_ids=stop_ids, json_schema=response_schema(body))
    return params, [s for s in stops if s]


def response_schema(body: dict) -> dict | bool | None:
    """`response_format`: {"type": "text"} (None), {"type": "json_object"} (True: any JSON object) or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (the schema); a schema the
    grammar library cannot honour is a 400 naming the feature."""
    from ownllm.inference.structured import compile_grammar

    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = True
    elif kind == "json_schema" and isinstance(rf.get("json_schema"), dict) and isinstance(
            rf["json_schema"].get("schema", {}), dict):
        schema = rf["json_schema"].get("schema") or True
    else:
        raise APIError(400, "'response_format' must be {type: text}, {type: json_object} or "
                       "{type: json_schema, json_schema: {name, schema}}", "response_format")
    try:
        compile_grammar(schema)
    except OwnLLMError as e:
        raise APIError(400, f"response_format: {e}", "response_format") from None
    return schema


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise APIError(400, f"messages[{i}].role must be system, user, assistant or tool", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) for p in content):
                raise APIError(400, f"messages[{i}].content parts must be objects", f"messages[{i}].content")
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text" and isinstance(p.get("text"), str))
        if content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        msg = {"role": "system" if role == "developer" else role, "content": content or ""}
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                    and isinstance(c["function"].get("arguments", "{}"), (str, dict)) for c in calls):
                raise APIError(400, f"messages[{i}].tool_calls must be a list of function calls", f"messages[{i}].tool_calls")
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def parse_tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, description, parameters}}", "tools")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise APIError(400, f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}",
                           "tools")
        if not isinstance(f.get("description", ""), (str, type(None))):
            raise APIError(400, f"tools[{i}].function.description must be a string", "tools")
        params = f.get("parameters", {})
        props = params.get("properties", {}) if isinstance(params, dict) else None
        if not isinstance(params, dict) or not isinstance(props, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in props.items()):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object whose 'properties' "
                           "map names to schema objects", "tools")
        if not isinstance(f.get("strict", False), (bool, type(None))):
            raise APIError(400, f"tools[{i}].function.strict must be a boolean", "tools")
    return tools or None


def tool_grammar(body: dict, tools: list[dict] | None, tok) -> str | None:
    """The constraint on a reply that may call tools: with `strict: true` on a tool, its calls'
    arguments conform to its parameters schema; `tool_choice` "required" makes the reply calls only,
    {type: function, function: {name}} one call to that tool. None: free text."""
    from ownllm.inference.structured import compile_grammar, tool_call_grammar

    choice = body.get("tool_choice", "auto")
    if tools is None:
        return None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        choice = choice["function"]["name"]
    elif choice not in ("auto", "required"):
        raise APIError(400, "'tool_choice' must be none, auto, required or {type: function, function: {name}}",
                       "tool_choice")
    if choice == "auto" and not any(t["function"].get("strict") for t in tools):
        return None
    try:
        grammar = tool_call_grammar(tok, tools, choice)
        compile_grammar(lark=grammar)
    except OwnLLMError as e:
        raise APIError(400, str(e), "tool_choice" if "tool_choice" in str(e) else "tools") from None
    return grammar


# -- generation ------------------------------------------------------------------------------------
class TextStream:
    """Tokens from the batcher → text pieces, honouring stop strings; runs on the event loop."""

    def __init__(self, state: ServerState, ids: list[int], params: SamplingParams, stops: list[str], keep_special: bool):
        self.state, self.stops, self.keep_special = state, stops, keep_special
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.prompt_tokens = len(ids)
        self.finish_reason = "stop"
        self.req = Request(ids, params, self._emit)
        try:
            state.batcher.submit(self.req)
        except QueueFull as e:
            raise busy(e) from None

    def _emit(self, tok, reason):  # batcher thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (tok, reason))

    async def pieces(self):
        tok = self.state.tok
        dec = tok.stream_decoder()
        special = set(tok.special.values())
        text = StopStrings(self.stops)
        try:
            while True:
                t, reason = await self.queue.get()
                if t is None:
                    if reason and reason.startswith("error"):
                        raise APIError(500, reason, type_="server_error")
                    self.finish_reason = reason or "stop"
                    break
                self.tokens.append(t)
                if t in special and not self.keep_special:
                    continue
                out = text.push(dec.push(t) if t not in special else tok.decode([t]))
                if text.hit:
                    self.req.cancel()
                    self.finish_reason = "stop"
                    if out:
                        yield out
                    return
                if out:
                    yield out
            out = text.flush(dec.flush())
            if text.hit:  # a stop string completed by the decoder's last bytes
                self.finish_reason = "stop"
            if out:
                yield out
        finally:
            self.req.cancel()  # a client that went away frees its slot at the next step

    async def text(self, request: HTTPRequest | None = None) -> str:
        """The whole reply. With `request`, a client that went away (checked every 0.2 s) cancels
        the generation, so its slot is free within a step."""
        async def collect():
            return "".join([p async for p in self.pieces()])
        task = asyncio.ensure_future(collect())
        while request is not None and not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and await request.is_disconnected():
                self.req.cancel()
                task.cancel()
                raise APIError(499, "client closed the request", code="client_closed")
        return await task


def tool_calls_from(tok, ids: list[int], names=None) -> tuple[str, list[dict]]:
    from ownllm.agent.loop import split_calls

    text, raws = split_calls(tok, [t for t in ids if t not in tok.stop_ids], names)
    calls = []
    for raw in raws:
        try:
            obj = json.loads(raw)
            name, args = obj["name"], obj.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            name, args = "invalid_call", {"raw": raw}
        calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                      "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return text, calls


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- who may call ----------------------------------------------------------------------------------
def _hostname(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'; lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1: host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware in front of every route: Host allow-list, Origin (same-origin or
    --allow-origin, with CORS answers for the latter), JSON bodies only, the API key, the body size
    as announced. Pure ASGI, so a streaming reply and `request.is_disconnected` pass through untouched."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in self.state.allow_origins else {}
        try:
            self.check(scope, headers, origin)
        except APIError as e:
            e.headers = {**e.headers, **cors}
            return await e.response()(scope, receive, send)
        if scope["method"] == "OPTIONS" and cors:
            return await JSONResponse({}, headers={**cors, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                                   "Access-Control-Allow-Headers": "authorization, content-type",
                                                   "Access-Control-Max-Age": "600"})(scope, receive, send)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", []))
                           + [(k.lower().encode(), v.encode()) for k, v in cors.items()]}
            await send(message)
        return await self.app(scope, receive, send_with_cors)

    def check(self, scope, headers: dict, origin: str | None) -> None:
        st = self.state
        host = headers.get("host", "")
        if _hostname(host) not in LOCAL_HOSTS | st.allow_hosts:
            raise APIError(403, f"Host {host!r} is not served here (allow it with --allow-host)", code="host_not_allowed")
        if origin is not None and origin not in st.allow_origins:
            o = urlsplit(origin)
            if o.scheme not in ("http", "https") or o.netloc.lower() != host.lower():
                raise APIError(403, f"requests from origin {origin!r} are refused (allow it with --allow-origin)",
                               code="origin_not_allowed")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise APIError(415, "the body must be JSON (Content-Type: application/json)", code="unsupported_media_type")
        if st.api_key and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), st.api_key.encode()):
                raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key",
                               type_="authentication_error")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > st.max_body):
            raise APIError(413, f"request body over {st.max_body} bytes", code="body_too_large")


# -- the app ---------------------------------------------------------------------------------------
def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def read_json(state: ServerState, request: HTTPRequest) -> dict:
    """The request body: bounded, parsed, shape-checked, and naming this server's model if any."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > state.max_body:
            raise APIError(413, f"request body over {state.max_body} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: bad JSON, or an integer of > 4,300 digits
        raise APIError(400, f"body is not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise APIError(400, f"body nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object")
    check_body(body)
    model = body.get("model")
    if model is not None and model != state.model_id:
        raise APIError(404, f"model {model!r} does not exist (this server has {state.model_id!r})", "model",
                       "model_not_found")
    return body


def template_kwargs(state: ServerState, body: dict) -> dict:
    """An imported template's variables: the server's --template-arg defaults, then the request's."""
    return {**state.template_kwargs, **_get(body, "chat_template_kwargs", dict, {}, what="an object")}


async def _replay(chunks):
    for c in chunks:
        yield sse(c)
    yield "data: [DONE]\n\n"


@dataclass
class Reply:
    """One chat reply's id and shape: every chat.completion, whole or streamed, is built here."""

    state: ServerState
    stream: bool
    opts: dict
    cid: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:16]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict, finish: str | None) -> dict:
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.state.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self.chunk({}, None), "choices": [], "usage": use}

    def whole(self, msg: dict, finish: str, use: dict, extra: dict | None = None):
        """A reply known whole (tool calls, a refusal, the agent's answer, a finished text) as a
        chat.completion, or replayed as the chunks of a stream."""
        extra = extra or {}
        if not self.stream:
            return {"id": self.cid, "object": "chat.completion", "created": self.created, "model": self.state.model_id,
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish}], "usage": use, **extra}
        delta = {"role": "assistant", **({"content": msg["content"]} if msg.get("content") is not None else {}),
                 **({"tool_calls": [{**c, "index": i} for i, c in enumerate(msg["tool_calls"])]}
                    if msg.get("tool_calls") else {})}
        chunks = [{**self.chunk(delta, None), **extra}, self.chunk({}, finish)]
        if self.opts.get("include_usage"):
            chunks.append(self.usage_chunk(use))
        return StreamingResponse(_replay(chunks), media_type="text/event-stream")

    def fixed(self, text: str, extra: dict, prompt_tokens: int):
        return self.whole({"role": "assistant", "content": text}, "stop", usage(prompt_tokens, 0), extra)

    def streamed(self, ts: TextStream, splitter, extra: dict, prompt_len: int) -> StreamingResponse:
        """Text as it decodes: content (and a thinking model's reasoning_content) deltas."""
        def deltas(parts):
            return [sse(self.chunk({"reasoning_content" if k == "reasoning" else "content": t}, None)) for k, t in parts]

        async def events():
            yield sse({**self.chunk({"role": "assistant", "content": ""}, None), **extra})
            content = []
            async for piece in ts.pieces():
                parts = splitter.push(piece) if splitter else [("content", piece)]
                content += [t for k, t in parts if k == "content"]
                for event in deltas(parts):
                    yield event
            tail = splitter.flush() if splitter else []
            content += [t for k, t in tail if k == "content"]
            for event in deltas(tail):
                yield event
            # the last chunk says which source sentence supports each part of the whole answer
            yield sse({**self.chunk({}, ts.finish_reason), **support_field("".join(content), extra)})
            if self.opts.get("include_usage"):
                yield sse(self.usage_chunk(usage(prompt_len, len(ts.tokens))))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


async def chat_completion(state: ServerState, request: HTTPRequest):
    body = await read_json(state, request)
    refuse_unsupported(body)
    messages = parse_messages(body)
    tools = parse_tools(body)
    tok = state.tok
    calls_grammar = tool_grammar(body, tools, tok) if tools is not None and tok.call_markers else None
    reply = Reply(state, _get(body, "stream", bool, False, what="a boolean"),
                  _get(body, "stream_options", dict, {}, what="an object"))
    if tools is not None and tok.call_markers is None:
        raise APIError(400, "this model's chat template has no tool-call format the server can read", "tools")
    checked, _ = sampling_from(body, state, 1, ())  # every field checked, even where a fixed reply needs none
    if checked.json_schema is not None and (tools is not None or state.registry is not None):
        raise APIError(400, "'response_format' with tools is not supported: a reply is either a tool call or "
                       "constrained content", "response_format")
    if state.registry is not None and tools is None:
        return await agent_reply(state, body, messages, reply)
    kwargs = template_kwargs(state, body)

    # off the event loop: retrieval and rendering a 1 MB conversation take a while
    ids, extra, fixed = await asyncio.to_thread(prepare_prompt, state, body, messages, tools, kwargs)
    if fixed is not None:
        return reply.fixed(fixed[0], extra, fixed[1])
    params, stops = sampling_from(body, state, len(ids), tok.stop_ids)
    if calls_grammar is not None:
        params = replace(params, grammar=calls_grammar)
    ts = TextStream(state, ids, params, stops, keep_special=tools is not None)
    if tools is not None:  # whole reply first: it may be tool calls
        await ts.text(request)
        text, calls = tool_calls_from(tok, ts.tokens, [t["function"]["name"] for t in tools])
        finish = "tool_calls" if calls and ts.finish_reason != "length" else ts.finish_reason
        msg = {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}
        return reply.whole(msg, finish, usage(len(ids), len(ts.tokens)))
    splitter = tok.reasoning_splitter(ids)   # a thinking model: <think>…</think> → reasoning_content
    if reply.stream:
        return reply.streamed(ts, splitter, extra, len(ids))
    text = await ts.text(request)
    msg = {"role": "assistant", "content": text}
    if splitter:
        reasoning, msg["content"] = splitter.split(text)
        msg["reasoning_content"] = reasoning or None
    return reply.whole(msg, ts.finish_reason, usage(len(ids), len(ts.tokens)), {**extra, **support_field(msg["content"], extra)})


def support_field(answer: str, extra: dict) -> dict:
    """{"support": …} for a reply from shown sources: which sentence says each part of the answer
    (rag/attribute.py); {} otherwise."""
    if not extra.get("sources"):
        return {}
    from ownllm.rag.attribute import attribute

    return {"support": [sp.to_dict() for sp in attribute(answer or "", [s["text"] for s in extra["sources"]])]}


def prepare_prompt(state: ServerState, body: dict, messages: list[dict], tools, kwargs: dict):
    """(prompt ids, extra response fields, fixed reply or None): with a knowledge base, a user
    turn becomes the sources prompt (or the refusal, when no source is relevant); otherwise the
    conversation in the chat template."""
    tok = state.tok
    if state.kb is not None and tools is None and messages[-1]["role"] == "user" and body.get("rag", True):
        from ownllm.rag.answer import prompt_ids, retrieve
        from ownllm.data.grounded import REFUSAL, language

        q = messages[-1]["content"]
        hits = retrieve(state.kb, q)
        if not hits:
            return None, {"sources": []}, (REFUSAL[language(q)], len(tok.encode_text(q)))
        ids, shown = prompt_ids(tok, q, hits, state.model.config.max_seq_len - 64)
        return ids, {"sources": [{"index": i, "path": state.kb.display_path(h.path), "line": h.line,
                                  "text": h.text} for i, h in enumerate(shown, 1)]}, None
    return tok.render(messages, add_generation_prompt=True, tools=tools, template_kwargs=kwargs).ids, {}, None


async def explain_reply(state: ServerState, request: HTTPRequest):
    """POST /v1/explain {messages, reply, top_k?, attention_token?}: why the model would write
    `reply` after `messages` — each token's probability, rank and alternatives, and the logit lens
    (the web page's "why" view); with `attention_token` (an index into the reply's tokens), also
    every layer's and head's attention from that token back over the context, and the context's
    tokens. The reply is read as text, never as control tokens."""
    from ownllm.evaluation.explain import explain_ids

    body = await read_json(state, request)
    messages = parse_messages(body)
    if messages[-1]["role"] != "user":
        raise APIError(400, "'messages' must end with the user turn the reply answers", "messages")
    reply = _get(body, "reply", str, None, what="a string")
    if not reply:
        raise APIError(400, "'reply' must be a non-empty string: the assistant text to explain", "reply")
    top_k = _get(body, "top_k", int, 5, what="an integer")
    if not 1 <= top_k <= 20:
        raise APIError(400, "'top_k' must be between 1 and 20", "top_k")
    at = _get(body, "attention_token", int, None, what="an integer")

    def run():
        ids, extra, fixed = prepare_prompt(state, body, messages, None, template_kwargs(state, body))
        if fixed is not None:
            raise APIError(400, "no source is relevant to this question, so the reply is the fixed refusal: "
                           "the model did not write it", "messages")
        new = state.tok.encode_text(reply)
        if len(ids) + len(new) > state.model.config.max_seq_len:
            raise APIError(400, f"conversation and reply are {len(ids) + len(new)} tokens; the context is "
                           f"{state.model.config.max_seq_len}", "reply")
        if at is not None and not 0 <= at < len(new):
            raise APIError(400, f"'attention_token' must index the reply's {len(new)} tokens (0 … {len(new) - 1})",
                           "attention_token")
        with state.batcher.lock:
            res = explain_ids(state.model, state.tok, ids, new, top_k, token=at or 0)
        return {k: res[k] for k in ("steps", "lens", "reply") + (("context", "attention_token", "attention")
                                                                  if at is not None else ())}
    return await asyncio.to_thread(run)


async def agent_reply(state: ServerState, body: dict, messages: list[dict], reply: Reply):
    from ownllm.agent.loop import Agent

    agent = Agent(state.model, state.tok, state.registry, template_kwargs=template_kwargs(state, body),
                  generate=state.batcher.generate)  # its turns share decode steps with every stream
    try:
        res = await asyncio.to_thread(agent.run, messages)
    except QueueFull as e:
        raise busy(e) from None
    trace = [{"name": c.name, "arguments": c.arguments if c.valid else c.raw, "result": c.result} for c in res.calls]
    return reply.fixed(res.answer, {"tool_trace": trace}, 0)


async def text_completion(state: ServerState, request: HTTPRequest):
    body = await read_json(state, request)
    refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", "prompt")
    stream = _get(body, "stream", bool, False, what="a boolean")
    opts = _get(body, "stream_options", dict, {}, what="an object")
    tok = state.tok
    ids = await asyncio.to_thread(tok.encode, prompt)  # raw text: a completion prompt is the model's input as written
    params, stops = sampling_from(body, state, len(ids), (tok.eos_id,))
    ts = TextStream(state, ids, params, stops, keep_special=False)
    cid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())

    def choice(text, finish):
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    if stream:
        async def events():
            async for piece in ts.pieces():
                yield sse(choice(piece, None))
            yield sse(choice("", ts.finish_reason))
            if opts.get("include_usage"):
                yield sse({**choice("", None), "choices": [], "usage": usage(len(ids), len(ts.tokens))})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    text = await ts.text(request)
    return {**choice(text, ts.finish_reason), "usage": usage(len(ids), len(ts.tokens))}


async def embeddings_reply(state: ServerState, request: HTTPRequest):
    body = await read_json(state, request)
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts) or len(texts) > 256:
        raise APIError(400, "'input' must be a non-empty string or a list of 1-256 non-empty strings", "input")
    embedder = getattr(state.kb, "embedder", None) if state.kb is not None else None

    def run():
        if embedder is not None:
            return embedder.encode(texts).tolist(), sum(len(embedder.tok.encode(t).ids) for t in texts)
        return model_embeddings(state, texts)
    vecs, n_tokens = await asyncio.to_thread(run)
    return {"object": "list", "model": state.model_id, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]}


async def answer(handler, state: ServerState, request: HTTPRequest):
    """A POST route's reply, or its error as the OpenAI-shaped JSON a client expects."""
    try:
        return await handler(state, request)
    except APIError as e:
        return e.response()
    except OwnLLMError as e:  # the conversation cannot be rendered (template refused it, ...)
        return APIError(400, str(e)).response()


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ownllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ownllm = state
    app.add_middleware(Guard, state=state)

    @app.get("/health")
    async def health():
        b = state.batcher
        return {"status": "ok", "model": state.model_id, "active_requests": b.active, "slots": len(b.slots),
                "busy_slots": b.active, "queued": b.queued}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "ownllm"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return HTMLResponse(files("ownllm.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    def post(handler):
        async def route(request: HTTPRequest):
            return await answer(handler, state, request)
        route.__name__ = handler.__name__
        return route
    for path, handler in (("/v1/chat/completions", chat_completion), ("/v1/completions", text_completion),
                          ("/v1/embeddings", embeddings_reply), ("/v1/explain", explain_reply)):
        app.post(path)(post(handler))
    return app


@torch.inference_mode()
def model_embeddings(state: ServerState, texts: list[str]) -> tuple[list[list[float]], int]:
    """Mean of the model's final hidden states over each text's tokens, L2-normalised."""
    tok, model = state.tok, state.model
    ctx = model.config.max_seq_len
    out, n = [], 0
    with state.batcher.lock:
        for t in texts:
            ids = tok.encode(t)[:ctx] or [tok.bos_id]
            n += len(ids)
            h = model.hidden_states(torch.tensor([ids], device=model.device))[0].float().mean(0)
            out.append(torch.nn.functional.normalize(h, dim=0).tolist())
    return out, n


def build_state(args) -> "ServerState":
    """ServerState for `ownllm serve`'s options (an argparse namespace; tests and benches build one)."""
    from ownllm.agent.loop import open_tools
    from ownllm.chat_template import parse_template_args
    from ownllm.inference.batcher import ContinuousBatcher
    from ownllm.inference.generate import load_run
    from ownllm.rag.demo import open_kb
    from ownllm.train.distributed import set_threads

    run = Path(args.run)
    model, tok = load_run(run, getattr(args, "quantize", None))
    set_threads(getattr(args, "threads", None))
    reg = kb = None
    if getattr(args, "tools", None):
        from ownllm.agent.loop import require_tool_calls

        require_tool_calls(tok)
        reg, _ = open_tools(args.tools, args.kb, args.db, args.embedder)
    elif getattr(args, "kb", None):
        kb = open_kb(args.kb, args.embedder)
    host = getattr(args, "host", "127.0.0.1")
    batcher = ContinuousBatcher(model, tok.pad_id, slots=args.slots, max_waiting=getattr(args, "max_waiting", 64),
                                tokenizer=tok)
    if getattr(args, "warm_up", False):
        batcher.warm_up()
    return ServerState(model=model, tok=tok, model_id=run.resolve().name,
                       api_key=args.api_key or os.environ.get("OWNLLM_API_KEY") or None,
                       batcher=batcher,
                       kb=kb, registry=reg, template_kwargs=parse_template_args(getattr(args, "template_arg", [])),
                       allow_hosts=frozenset(h.lower() for h in [host, *(getattr(args, "allow_host", None) or [])]),
                       allow_origins=frozenset(getattr(args, "allow_origin", None) or []))


@contextmanager
def serving(state: "ServerState", host: str = "127.0.0.1"):
    """The app on a free port of `host`, in a thread, until the block ends; yields its base URL
    (a smoke test, a bench, the tests)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(400):
        if server.started or not t.is_alive():
            break
        time.sleep(0.05)
    if not server.started:
        raise OwnLLMError(f"the server did not start on {host}:{port}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        t.join(10)
