"""The OpenAI-compatible server: the official client works unchanged; bad input never gets a 5xx."""
import json
import socket
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ownllm.serve.app import create_app
from tests.conftest import ScriptedBatcher, free_port as _free_port, server_state as _state, start_server

fastapi_testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture(scope="module")
def client(run_dir):
    state = _state(run_dir)
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1") as c:
        c.state = state
        yield c
    state.batcher.close()


def test_models_health_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "base"
    page = client.get("/")
    assert page.status_code == 200 and "<title>ownllm chat</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: everything is local


def test_chat_completion_plain_and_streamed(client):
    body = {"model": "base", "messages": [{"role": "user", "content": "Hello 你好"}], "max_tokens": 8,
            "temperature": 0, "seed": 1}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    j = r.json()
    assert j["object"] == "chat.completion" and j["choices"][0]["message"]["role"] == "assistant"
    assert j["choices"][0]["finish_reason"] in ("stop", "length")
    assert j["usage"]["completion_tokens"] <= 8 and j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == j["choices"][0]["message"]["content"]  # greedy: streamed == non-streamed
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == j["usage"]["completion_tokens"]


def test_completions_and_embeddings(client):
    r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["object"] == "text_completion" and r.json()["usage"]["prompt_tokens"] > 0
    e = client.post("/v1/embeddings", json={"input": ["a", "春"]}).json()
    assert len(e["data"]) == 2 and abs(sum(x * x for x in e["data"][0]["embedding"]) - 1) < 1e-4


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None), (b"[1, 2]", 400, None), (b'"text"', 400, None),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"messages": []}, 400, "messages"), ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {}}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(client, body, status, param):
    r = client.post("/v1/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["param"] == param
    assert client.get("/health").status_code == 200  # still serving


def test_explain_reads_the_reply_with_the_models_own_probabilities(client):
    """POST /v1/explain (the chat page's "why"): the reply is read as text after the rendered
    conversation; its probabilities are the model's, and control-token text stays text."""
    state = client.state
    msgs = [{"role": "user", "content": "Hello 你好"}]
    reply = "to be <|end|> 春"
    j = client.post("/v1/explain", json={"messages": msgs, "reply": reply, "top_k": 3}).json()
    ids = state.tok.render(msgs, add_generation_prompt=True).ids
    new = state.tok.encode_text(reply)
    assert [s["id"] for s in j["steps"]] == new and j["reply"] == reply
    assert not set(new) & set(state.tok.special.values())   # "<|end|>" in the reply is read as text
    with torch.no_grad():
        probs = state.model(torch.tensor([ids + new]))[0, len(ids) - 1: -1].float().softmax(-1)
    assert [s["prob"] for s in j["steps"]] == pytest.approx([float(probs[i, t]) for i, t in enumerate(new)], abs=1e-5)
    assert all(len(s["alternatives"]) == 3 for s in j["steps"]) and len(j["lens"]) == state.model.config.n_layers
    assert "attention" not in j   # only when asked: it is layers × heads × context
    j = client.post("/v1/explain", json={"messages": msgs, "reply": reply, "attention_token": 1}).json()
    cfg = state.model.config
    assert j["attention_token"] == 1 and len(j["context"]) == len(ids) + 1   # the prompt and reply token 0
    assert len(j["attention"]) == cfg.n_layers and all(len(layer) == cfg.n_heads for layer in j["attention"])
    assert all(len(h) == len(ids) + 1 and sum(h) == pytest.approx(1, abs=1e-3) for layer in j["attention"] for h in layer)
    for body, param in (({"messages": msgs}, "reply"), ({"messages": msgs, "reply": "x", "top_k": 99}, "top_k"),
                        ({"messages": msgs, "reply": "x", "attention_token": 5}, "attention_token"),
                        ({"messages": msgs + [{"role": "assistant", "content": "a"}], "reply": "x"}, "messages")):
        r = client.post("/v1/explain", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_body_limit_and_api_key(run_dir):
    state = _state(run_dir, api_key="s3cret")
    state.max_body = 2000
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1") as c:
        msg = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=msg).status_code == 401
        assert c.post("/v1/chat/completions", json=msg, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/chat/completions", json=msg, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        r = c.post("/v1/chat/completions", json=big, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert c.get("/health").status_code == 200  # health needs no key
        assert c.post("/v1/explain", json={**msg, "reply": "y"}).status_code == 401
    state.batcher.close()


def _nested(depth: int, leaf) -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# the shapes that once gave 500s: seeds past 64 bits, lone surrogates, deep nesting, control-token text
edge_values = (st.sampled_from([2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30, "<|end|><|system|>x", "\ud800"])
               | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
               | st.integers(30, 900).map(lambda d: _nested(d, {"a": 1})))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=20) | edge_values,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["base", "x"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                                "content": st.text(max_size=30) | json_values}), max_size=3) | json_values,
    "max_tokens": st.integers(-5, 300) | json_values, "temperature": st.floats(-1, 3) | json_values,
    "top_p": json_values, "stop": json_values, "seed": json_values, "stream": st.booleans() | json_values,
    "tools": json_values | st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.text(max_size=5) | json_values}, optional={"parameters": st.fixed_dictionaries(
            {}, optional={"properties": json_values}) | json_values})}), max_size=2),
    "prompt": st.text(max_size=20) | json_values, "input": json_values,
    "chat_template_kwargs": json_values | st.dictionaries(st.sampled_from(["messages", "range", "x"]), json_values),
    "n": json_values, "logprobs": json_values, "response_format": json_values,
})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
def test_random_bodies_never_5xx(client, body, path):
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
        body["max_tokens"] = min(body["max_tokens"], 4)  # keep generation short
    # json.dumps writes inf/nan as Infinity/NaN, which Python's parser on the server accepts
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert "message" in r.json()["error"]


@pytest.fixture(scope="module")
def live_server(run_dir):
    state = _state(run_dir)
    with start_server(state) as url:
        yield url, state
    state.batcher.close()


def test_official_openai_client(live_server):
    openai = pytest.importorskip("openai")
    url, state = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["base"]
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 6
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    # a tool call: the model's turn is scripted, the plumbing is real
    tok = state.tok
    call = '{"name": "calculator", "arguments": {"expression": "12*34"}}'
    real = state.batcher
    state.batcher = ScriptedBatcher([tok.special["<|tool_call|>"], *tok.encode(call), tok.special["<|/tool_call|>"]])
    try:
        tools = [{"type": "function", "function": {"name": "calculator", "description": "exact arithmetic",
                                                   "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
        r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "12×34?"}], tools=tools)
        assert r.choices[0].finish_reason == "tool_calls"
        tc = r.choices[0].message.tool_calls[0]
        assert tc.function.name == "calculator" and json.loads(tc.function.arguments) == {"expression": "12*34"}
        chunks = list(client.chat.completions.create(model="base", messages=[{"role": "user", "content": "12×34?"}],
                                                     tools=tools, stream=True))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert chunks[0].choices[0].delta.tool_calls[0].function.name == "calculator"
    finally:
        state.batcher = real


def test_disconnect_frees_the_slot(live_server):
    import http.client

    import urllib.request

    url, state = live_server
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 100, "temperature": 1.0}
    for seed in range(30):  # a seed whose reply runs the full 100 tokens (an untrained model may stop early)
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "seed": seed}).encode(),
                                     headers={"Content-Type": "application/json"})
        if json.loads(urllib.request.urlopen(req).read())["choices"][0]["finish_reason"] == "length":
            break
    b = state.batcher
    step = b._step
    b._step = lambda: (time.sleep(0.03), step())  # slow decoding down: 100 tokens would take 3 s
    try:
        cancelled = b.cancelled
        body = {**body, "seed": seed, "stream": True}
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(40).startswith(b"data: ")
        for _ in range(100):
            if b.active == 1:
                break
            time.sleep(0.01)
        assert b.active == 1
        t0 = time.perf_counter()
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
        conn.close()
        while b.active and time.perf_counter() - t0 < 2.5:
            time.sleep(0.01)
        assert b.active == 0 and b.cancelled == cancelled + 1
        assert time.perf_counter() - t0 < 1.5  # freed long before the 100 tokens would have finished
    finally:
        b._step = step


def test_stop_strings_cut_the_reply_even_across_tokens(run_dir):
    state = _state(run_dir)
    real = state.batcher
    state.batcher = ScriptedBatcher(state.tok.encode("Hello world. Bye now"))
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1") as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "stop": ["ld. B", "zzz"]}
        j = c.post("/v1/chat/completions", json=body).json()
        assert j["choices"][0]["message"]["content"] == "Hello wor" and j["choices"][0]["finish_reason"] == "stop"
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == "Hello wor"
        j = c.post("/v1/completions", json={"prompt": "x", "stop": "now"}).json()
        assert j["choices"][0]["text"] == "Hello world. Bye "
    real.close()


def test_rag_sources_and_server_side_tools(run_dir, tmp_path):
    from ownllm.rag.store import KnowledgeBase

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "varnok.md").write_text("Varnok is a town in the Selam valley. The mayor of Varnok is Irdel Fask.\n")
    kb_path = tmp_path / "kb.sqlite"
    with KnowledgeBase(kb_path, create=True) as kb:
        kb.index([docs])
    state = _state(run_dir, kb=str(kb_path))
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1") as c:
        j = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who is the mayor of Varnok?"}],
                                                  "max_tokens": 4}).json()
        assert j["sources"][0]["path"].endswith("varnok.md") and "Irdel Fask" in j["sources"][0]["text"]
        assert j["sources"][0]["path"] == "varnok.md"   # relative to the indexed folder: no paths of this disk
        from ownllm.rag.attribute import attribute

        texts = [s["text"] for s in j["sources"]]
        want = [sp.to_dict() for sp in attribute(j["choices"][0]["message"]["content"], texts)]
        assert j["support"] == want and want
        # streamed: the sources come first, the support of the whole answer with the last chunk
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who is the mayor of Varnok?"}],
                                                  "max_tokens": 4, "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        assert [s["text"] for s in chunks[0]["sources"]] == texts
        assert chunks[-1]["choices"][0]["finish_reason"] and chunks[-1]["support"] == [
            sp.to_dict() for sp in attribute(content, texts)]
        j = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who founded Zembla?"}]}).json()
        assert j["sources"] == [] and j["choices"][0]["message"]["content"] == "The sources do not say."
    state.batcher.close()
    state = _state(run_dir, tools="calculator")
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1") as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "12 × 34?"}]})
        assert r.status_code == 200 and "tool_trace" in r.json() and r.json()["choices"][0]["message"]["role"] == "assistant"
    state.batcher.close()


def test_hostile_request_corpus_never_gets_a_5xx(client):
    """bench/hostile.py's request corpus (≥ 500: deep nesting, 4,300-digit integers, lone surrogates,
    seeds past 64 bits, tool schemas of every wrong shape, reserved template names, unsupported
    fields, wrong content types, other origins and hosts) through the real app."""
    from bench.hostile import request_corpus

    corpus = request_corpus()
    assert len(corpus) >= 500
    bad = []
    for path, headers, body in corpus:
        r = client.post(path, content=body, headers=headers)
        if r.status_code >= 500 or (r.status_code >= 400 and "error" not in r.json()):
            bad.append((r.status_code, path, body[:80]))
    assert bad == []
    assert client.get("/health").json()["busy_slots"] == 0


@pytest.mark.parametrize("field,value", [("n", 2), ("logprobs", True), ("top_logprobs", 3),
                                         ("response_format", {"type": "xml"})])
def test_fields_it_cannot_honour_are_refused_by_name(client, field, value):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] in (field, "logprobs")


def test_other_origins_hosts_and_non_json_bodies_are_refused(run_dir, monkeypatch):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    monkeypatch.setenv("OWNLLM_API_KEY", "k3y")
    state = _state(run_dir, allow_origin=["http://localhost:3000"])
    key = {"authorization": "Bearer k3y"}
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1:8000") as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 401   # the key came from the environment
        assert c.post("/v1/chat/completions", json=body, headers=key).status_code == 200
        assert c.post("/v1/chat/completions", json=body, headers={**key, "origin": "http://127.0.0.1:8000"}).status_code == 200
        r = c.post("/v1/chat/completions", json=body, headers={**key, "origin": "http://evil.example"})
        assert r.status_code == 403 and "origin" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", content=json.dumps(body), headers={**key, "content-type": "text/plain"})
        assert r.status_code == 415
        assert c.post("/v1/chat/completions", json=body, headers={**key, "host": "evil.example"}).status_code == 403
        assert c.get("/health", headers={"host": "attacker.example:8000"}).status_code == 403   # DNS rebinding
        r = c.post("/v1/chat/completions", json=body, headers={**key, "origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        pre = c.options("/v1/chat/completions", headers={"origin": "http://localhost:3000",
                                                         "access-control-request-method": "POST"})
        assert pre.status_code == 200 and "authorization" in pre.headers["access-control-allow-headers"]
        assert c.options("/v1/chat/completions", headers={"origin": "http://evil.example"}).status_code == 403
    state.batcher.close()


def test_busy_server_answers_503_and_a_failed_prefill_is_answered(client, monkeypatch):
    b = client.state.batcher
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    monkeypatch.setattr(b, "max_waiting", 0)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    monkeypatch.undo()

    def broken(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(b.model, "last_logits", broken)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    h = client.get("/health").json()
    assert h["busy_slots"] == 0 and h["queued"] == 0 and h["slots"] == 4


def test_a_client_that_leaves_frees_its_slot_within_a_second(live_server):
    from bench.hostile import disconnect_free_seconds

    url, state = live_server
    model = state.batcher.model
    real = model.last_logits

    def slow(*a, **k):   # ~0.05 s a step: decoding the rest of the context would take seconds
        time.sleep(0.05)
        return real(*a, **k)
    model.last_logits = slow
    try:
        assert disconnect_free_seconds(url) < 1.0   # non-streaming: nobody reads the reply any more
        assert disconnect_free_seconds(url, {"messages": [{"role": "user", "content": "Hi"}], "temperature": 1,
                                             "stream": True}) < 1.0
    finally:
        del model.last_logits
    assert state.batcher.cancelled >= 2


def test_a_huge_request_does_not_stall_the_event_loop(run_dir):
    """Rendering and tokenising a ~1 MB conversation runs off the event loop: /health keeps
    answering. The server runs as `ownllm serve` in its own process (in this one, the test's
    own polling thread would wait on the same interpreter lock)."""
    import http.client
    import subprocess
    import sys

    from bench.hostile import health

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ownllm", "serve", "--run", str(run_dir), "--port", str(port),
                               "--slots", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                health(url)
                break
            except OSError:
                time.sleep(0.05)
        body = json.dumps({"messages": [{"role": "user", "content": "word 字 " * 75_000}]}).encode()
        status, took = [], []

        def send():
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            status.append(conn.getresponse().status)
            took.append(time.perf_counter() - t0)
        t = threading.Thread(target=send)
        t.start()
        slowest = 0.0
        while t.is_alive():
            t0 = time.perf_counter()
            health(url)
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.01)
        t.join()
    finally:
        server.terminate()
        server.wait(10)
    assert status == [400]   # too long for the context, and told so
    assert took[0] > 0.3 and slowest < 0.2, (took, slowest)   # it took a while, and /health never waited on it


def test_agent_turns_decode_through_the_shared_batcher(tiny_run):
    """A server-side agent request shares decode steps with everything else instead of holding
    the model for its whole run (which froze every stream)."""
    state = _state(tiny_run, tools="calculator")
    real, calls = state.batcher.generate, []

    def generate(ids, params):
        calls.append(state.batcher.lock.locked())
        return real(ids, params)
    state.batcher.generate = generate
    with fastapi_testclient.TestClient(create_app(state), base_url="http://127.0.0.1") as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "12 × 34?"}]})
        assert r.status_code == 200 and "tool_trace" in r.json()
    state.batcher.close()
    assert calls and not any(calls)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"enum": ["Paris", "Tokyo", "Lima"]},
                                           "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}


def _is_person(x) -> bool:
    return (isinstance(x, dict) and set(x) == {"name", "age", "city", "tags"} and isinstance(x["name"], str)
            and len(x["name"]) <= 12 and isinstance(x["age"], int) and 0 <= x["age"] <= 120
            and x["city"] in ("Paris", "Tokyo", "Lima") and isinstance(x["tags"], list) and len(x["tags"]) <= 3
            and all(isinstance(t, bool) for t in x["tags"]))


def test_response_format_json_schema_always_parses(client):
    """A random tiny model, sampled at temperature 1: every reply under the schema parses and fits it,
    streamed or not; JSON mode gives an object; an unsupported schema feature is a 400 naming it."""
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(12):
        body = {"messages": [{"role": "user", "content": f"Person {seed}"}], "temperature": 1, "seed": seed,
                "response_format": rf}
        j = client.post("/v1/chat/completions", json=body).json()
        assert j["choices"][0]["finish_reason"] == "stop", j
        assert _is_person(json.loads(j["choices"][0]["message"]["content"]))
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    assert _is_person(json.loads("".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])))
    j = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "seed": 1,
                                                  "response_format": {"type": "json_object"}, "max_tokens": 60}).json()
    text, finish = j["choices"][0]["message"]["content"], j["choices"][0]["finish_reason"]
    assert (finish == "stop" and isinstance(json.loads(text), dict)) or (finish == "length" and text.startswith("{"))
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such"}}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "response_format": bad})
    assert r.status_code == 400 and "no-such" in r.json()["error"]["message"] and r.json()["error"]["param"] == "response_format"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "response_format": rf,
                                                  "max_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length"   # cut by max_tokens, and said so


def test_engine_and_batcher_constrain_every_row(run_dir):
    """SamplingParams(json_schema=…) through a left-padded Engine batch and through the batcher; a regex too."""
    from ownllm.inference import Engine, SamplingParams
    from ownllm.inference.batcher import ContinuousBatcher
    from ownllm.inference.generate import load_run

    model, tok = load_run(run_dir)
    engine = Engine(model, tok.pad_id, tokenizer=tok)
    prompts = [tok.encode("ROMEO: my name is"), tok.encode("Hi")]
    for seed in range(4):
        params = SamplingParams(max_new_tokens=100, temperature=1.0, seed=seed, json_schema=PERSON, stop_ids=tok.stop_ids)
        for out in engine.generate(prompts, params):
            person = json.loads(tok.decode(out))
            assert _is_person(person) and list(person) == list(PERSON["properties"])   # in the schema's order
    digits = SamplingParams(max_new_tokens=20, temperature=1.0, seed=0, regex=r"[0-9]{3}-[a-z]{2}")
    assert all(__import__("re").fullmatch(r"[0-9]{3}-[a-z]{2}", tok.decode(o)) for o in engine.generate(prompts, digits))
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, tok.pad_id).generate(prompts, digits)
    b = ContinuousBatcher(model, tok.pad_id, slots=2, tokenizer=tok)
    try:
        for seed in range(4):
            params = SamplingParams(max_new_tokens=100, temperature=1.0, seed=seed, json_schema=PERSON, stop_ids=tok.stop_ids)
            assert _is_person(json.loads(tok.decode(b.generate(prompts[seed % 2], params))))
    finally:
        b.close()


def test_draw_first_then_check_samples_the_masked_distribution(run_dir):
    """Greedy and plain-temperature rows draw unmasked and compute the mask only when the grammar
    refuses the token: the tokens still follow softmax(logits) restricted to the allowed set
    (2,000 rows, about half of whose first draws are refused, against the exact masked
    distribution); top-k / top-p rows mask first."""
    from ownllm.inference import SamplingParams
    from ownllm.inference.engine import sample_next
    from ownllm.inference.generate import load_run
    from ownllm.inference.structured import constraint_for, draw_constrained, draws_first, mask_rows_

    _, tok = load_run(run_dir)
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=None, top_p=1.0, regex="[a-h]")
    assert draws_first(params) and draws_first(SamplingParams(temperature=0)) and not draws_first(SamplingParams())
    V, n = tok.vocab_size, 2000
    allowed = [tok.encode(c)[0] for c in "abcdefgh"]
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    logits[allowed] += torch.linspace(0, 2, 8)
    logits[allowed] += (logits.logsumexp(0) - logits[allowed].logsumexp(0))   # about half the mass allowed
    want = mask_rows_(logits[None].clone(), [constraint_for(params, tok, V)]).softmax(-1)[0]
    assert sorted(want.nonzero().flatten().tolist()) == sorted(allowed)
    rows = [constraint_for(params, tok, V) for _ in range(n)]
    gen = torch.Generator().manual_seed(1)
    refused = []

    def draw(lg, idx):
        if idx is not None:
            refused.append(len(idx))
        return sample_next(lg, params, gen)
    tok_ids = draw_constrained(logits.repeat(n, 1), rows, params, draw)
    assert 0.3 * n < refused[0] < 0.7 * n and all(c.complete for c in rows)
    got = torch.bincount(tok_ids, minlength=V).float() / n
    assert ((got - want).abs() <= 4 * (want * (1 - want) / n).sqrt() + 0.005).all(), (got[allowed], want[allowed])


def test_official_client_structured_outputs(live_server):
    """`client.chat.completions.parse` with a Pydantic model, and `response_format=` with a JSON schema,
    unchanged against the server."""
    from typing import Literal

    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")

    class Booking(pydantic.BaseModel):
        city: Literal["Paris", "Tokyo", "Lima"]
        nights: int = pydantic.Field(ge=1, le=9)
        breakfast: bool

    url, _ = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    for seed in range(3):
        r = client.chat.completions.parse(model="base", messages=[{"role": "user", "content": "Book a room"}],
                                          response_format=Booking, temperature=1, seed=seed)
        b = r.choices[0].message.parsed
        assert isinstance(b, Booking) and 1 <= b.nights <= 9
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Who?"}], temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert _is_person(json.loads(r.choices[0].message.content))


STRICT_TOOLS = [
    {"type": "function", "function": {"name": "book", "strict": True,
                                      "parameters": {**PERSON, "properties": {k: PERSON["properties"][k] for k in ("city", "age")},
                                                     "required": ["city", "age"]}}},
    {"type": "function", "function": {"name": "note",
                                      "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]


def test_strict_tools_get_arguments_that_fit_their_schema(client):
    """A random tiny model at temperature 1: with tool_choice naming a strict tool, every reply is one
    call to it whose arguments fit its parameters schema; with "required", calls to offered tools
    and no text; an unknown tool name and an unsupported strict schema are 400s naming the field."""
    def ask(choice, seed, tools=STRICT_TOOLS, stream=False):
        body = {"messages": [{"role": "user", "content": f"{seed}"}], "tools": tools, "tool_choice": choice,
                "temperature": 1, "seed": seed, "stream": stream}
        if not stream:
            return client.post("/v1/chat/completions", json=body)
        with client.stream("POST", "/v1/chat/completions", json=body) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        return [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", []) if ch["choices"]]

    named = {"type": "function", "function": {"name": "book"}}
    for seed in range(8):
        j = ask(named, seed).json()
        assert "choices" in j, j
        calls = j["choices"][0]["message"]["tool_calls"]
        assert j["choices"][0]["finish_reason"] == "tool_calls" and [c["function"]["name"] for c in calls] == ["book"]
        args = json.loads(calls[0]["function"]["arguments"])
        assert set(args) == {"city", "age"} and args["city"] in ("Paris", "Tokyo", "Lima") and 0 <= args["age"] <= 120
    streamed = ask(named, 3, stream=True)
    assert streamed and streamed[0]["function"]["name"] == "book"
    both = [STRICT_TOOLS[0], {"type": "function", "function": {"name": "note", "strict": True, "parameters": {
        "type": "object", "properties": {"text": {"type": "string", "maxLength": 4}}, "required": ["text"],
        "additionalProperties": False}}}]
    for seed in range(4):
        choice = ask("required", seed, tools=both).json()["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert choice["message"]["content"] is None and calls[0]["function"]["name"] in ("book", "note"), choice
        if choice["finish_reason"] == "tool_calls":   # not cut by max_tokens: every call whole
            assert all(c["function"]["name"] in ("book", "note") for c in calls)
    r = ask({"type": "function", "function": {"name": "nope"}}, 0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice" and "nope" in r.json()["error"]["message"]
    bad = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "no-such"}}}}}]
    r = ask("auto", 0, tools=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "no-such" in r.json()["error"]["message"]
    r = ask("sometimes", 0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
