"""`ownllm serve`: an OpenAI-compatible HTTP API (FastAPI) over one run, with streaming.

Where it sits: the deployment end of the flow. Endpoints: GET /health, GET /v1/models,
POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings. Every generation goes
through the continuous batcher (inference/batcher.py), so concurrent clients share decode
steps. Requests are validated by hand so that any malformed body gets an OpenAI-style error
object with a 4xx status (never a 500) and the server keeps serving.

Extras beyond the OpenAI schema: with `--kb`, a chat turn is answered from the knowledge base
(rag/answer.py) and the response carries `sources`; with `--tools`, the server runs the built-in
tools itself (agent loop) and returns the final answer with the trace in `tool_trace`. Tools
sent *by the client* (`tools` in the request) are not run: the reply carries `tool_calls` and
`finish_reason: "tool_calls"`, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ownllm.inference.batcher import ContinuousBatcher, Request
from ownllm.inference.engine import SamplingParams
from ownllm.inference.generate import StopStrings

MAX_BODY = 1 << 20  # bytes


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

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
    created: int = field(default_factory=lambda: int(time.time()))


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
    seed = _get(body, "seed", int, None, what="an integer")
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
                            top_p=float(top_p), seed=seed, stop_ids=stop_ids)
    return params, [s for s in stops if s]


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
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, description, parameters}}", "tools")
    return tools or None


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
        state.batcher.submit(self.req)

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

    async def text(self) -> str:
        return "".join([p async for p in self.pieces()])


def tool_calls_from(tok, ids: list[int]) -> tuple[str, list[dict]]:
    from ownllm.agent.loop import split_calls

    text, raws = split_calls(tok, [t for t in ids if t not in tok.stop_ids])
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


# -- the app ---------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ownllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ownllm = state

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        try:
            if state.api_key and request.url.path.startswith("/v1/"):
                auth = request.headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                    raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key",
                                   type_="authentication_error")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > state.max_body):
                raise APIError(413, f"request body over {state.max_body} bytes", code="body_too_large")
            return await call_next(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request: HTTPRequest) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > state.max_body:
                raise APIError(413, f"request body over {state.max_body} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "body must be a JSON object")
        model = body.get("model")
        if model is not None and model != state.model_id:
            raise APIError(404, f"model {model!r} does not exist (this server has {state.model_id!r})", "model",
                           "model_not_found")
        return body

    def handle(fn):
        async def wrapper(request: HTTPRequest):
            try:
                return await fn(request)
            except APIError as e:
                return JSONResponse(e.body(), status_code=e.status)
        wrapper.__name__ = fn.__name__
        return wrapper

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_id, "active_requests": state.batcher.active}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "ownllm"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return HTMLResponse(files("ownllm.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/v1/chat/completions")
    @handle
    async def chat_completions(request: HTTPRequest):
        body = await read_json(request)
        messages = parse_messages(body)
        tools = parse_tools(body)
        stream = _get(body, "stream", bool, False, what="a boolean")
        opts = _get(body, "stream_options", dict, {}, what="an object")
        tok = state.tok
        if tools is not None and tok.call_markers is None:
            raise APIError(400, "this model's chat template has no tool-call format the server can read", "tools")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        extra: dict = {}
        if state.registry is not None and tools is None:
            return await _agent_reply(body, messages, stream, opts, cid, created)
        if state.kb is not None and tools is None and messages[-1]["role"] == "user" and body.get("rag", True):
            from ownllm.rag.answer import prompt_ids, retrieve
            from ownllm.rag.grounded import REFUSAL, language

            q = messages[-1]["content"]
            hits = retrieve(state.kb, q)
            if not hits:
                extra["sources"] = []
                return _fixed_reply(REFUSAL[language(q)], stream, opts, cid, created, extra, len(tok.encode(q)))
            ids, shown = prompt_ids(tok, q, hits, state.model.config.max_seq_len - 64)
            extra["sources"] = [{"index": i, "path": h.path, "line": h.line, "text": h.text} for i, h in enumerate(shown, 1)]
        else:
            ids = tok.render(messages, add_generation_prompt=True, tools=tools, template_kwargs=template_kwargs(body)).ids
        params, stops = sampling_from(body, state, len(ids), tok.stop_ids)
        ts = TextStream(state, ids, params, stops, keep_special=tools is not None)
        if tools is not None:  # whole reply first: it may be tool calls
            await ts.text()
            text, calls = tool_calls_from(tok, ts.tokens)
            finish = "tool_calls" if calls else ts.finish_reason
            msg = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = calls
            if stream:
                delta = {"role": "assistant", **({"content": text} if text else {}),
                         **({"tool_calls": [{**c, "index": i} for i, c in enumerate(calls)]} if calls else {})}
                chunks = [_chunk(cid, created, state, delta, None), _chunk(cid, created, state, {}, finish)]
                if opts.get("include_usage"):
                    chunks.append({**_chunk(cid, created, state, {}, None), "choices": [], "usage": usage(len(ids), len(ts.tokens))})
                return StreamingResponse(_replay(chunks), media_type="text/event-stream")
            return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                    "usage": usage(len(ids), len(ts.tokens))}
        splitter = tok.reasoning_splitter(ids)   # a thinking model: <think>…</think> → reasoning_content
        if stream:
            def deltas(parts):
                return [sse(_chunk(cid, created, state, {"reasoning_content" if k == "reasoning" else "content": t}, None))
                        for k, t in parts]

            async def events():
                yield sse({**_chunk(cid, created, state, {"role": "assistant", "content": ""}, None), **extra})
                async for piece in ts.pieces():
                    for event in deltas(splitter.push(piece) if splitter else [("content", piece)]):
                        yield event
                for event in deltas(splitter.flush() if splitter else []):
                    yield event
                yield sse(_chunk(cid, created, state, {}, ts.finish_reason))
                if opts.get("include_usage"):
                    yield sse({**_chunk(cid, created, state, {}, None), "choices": [], "usage": usage(len(ids), len(ts.tokens))})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text = await ts.text()
        msg = {"role": "assistant", "content": text}
        if splitter:
            reasoning, msg["content"] = splitter.split(text)
            msg["reasoning_content"] = reasoning or None
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "message": msg, "finish_reason": ts.finish_reason}],
                "usage": usage(len(ids), len(ts.tokens)), **extra}

    def template_kwargs(body: dict) -> dict:
        """An imported template's variables: the server's --template-arg defaults, then the request's."""
        return {**state.template_kwargs, **_get(body, "chat_template_kwargs", dict, {}, what="an object")}

    def _chunk(cid, created, st, delta, finish):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    async def _replay(chunks):
        for c in chunks:
            yield sse(c)
        yield "data: [DONE]\n\n"

    def _fixed_reply(text, stream, opts, cid, created, extra, prompt_tokens):
        if stream:
            chunks = [{**_chunk(cid, created, state, {"role": "assistant", "content": text}, None), **extra},
                      _chunk(cid, created, state, {}, "stop")]
            if opts.get("include_usage"):
                chunks.append({**_chunk(cid, created, state, {}, None), "choices": [], "usage": usage(prompt_tokens, 0)})
            return StreamingResponse(_replay(chunks), media_type="text/event-stream")
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage(prompt_tokens, 0), **extra}

    async def _agent_reply(body, messages, stream, opts, cid, created):
        from ownllm.agent.loop import Agent

        sampling_from(body, state, 1, ())  # validate the fields even though the agent samples greedily
        agent = Agent(state.model, state.tok, state.registry, template_kwargs=template_kwargs(body))

        def run():
            with state.batcher.lock:
                return agent.run(messages)
        res = await asyncio.get_running_loop().run_in_executor(None, run)
        trace = [{"name": c.name, "arguments": c.arguments if c.valid else c.raw, "result": c.result} for c in res.calls]
        return _fixed_reply(res.answer, stream, opts, cid, created, {"tool_trace": trace}, 0)

    @app.post("/v1/completions")
    @handle
    async def completions(request: HTTPRequest):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        stream = _get(body, "stream", bool, False, what="a boolean")
        opts = _get(body, "stream_options", dict, {}, what="an object")
        tok = state.tok
        ids = tok.encode(prompt)
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
        text = await ts.text()
        return {**choice(text, ts.finish_reason), "usage": usage(len(ids), len(ts.tokens))}

    @app.post("/v1/embeddings")
    @handle
    async def embeddings(request: HTTPRequest):
        body = await read_json(request)
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts) or len(texts) > 256:
            raise APIError(400, "'input' must be a non-empty string or a list of 1-256 non-empty strings", "input")
        embedder = getattr(state.kb, "embedder", None) if state.kb is not None else None

        def run():
            if embedder is not None:
                return embedder.encode(texts).tolist(), sum(len(embedder.tok.encode(t).ids) for t in texts)
            return model_embeddings(state, texts)
        vecs, n_tokens = await asyncio.get_running_loop().run_in_executor(None, run)
        return {"object": "list", "model": state.model_id, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]}

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
