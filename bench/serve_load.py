"""Concurrent streaming clients against `ownllm serve` on loopback: throughput, TTFT, latency.

    python bench/serve_load.py [--run runs/quickstart/sft] [--seconds 20] [--clients 1,8]

Starts the server in-process (uvicorn on 127.0.0.1, a free port), warms it up at each client
count (a compiled server builds a graph per batch width on first use), then for each client count
runs that many threads for a bounded time; each sends streaming chat requests back to back
(max_tokens 64; text continuations by default, so replies run long) and records time to first token, total latency and completion tokens (from
`stream_options.include_usage`). Without --run a tiny model is pretrained briefly first. Run
alone: the machine has 2 cores. Ends with `RESULT speedup_8_clients=… ttft_p50_ms=… errors=…`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line, run_or_pretrain, setup_threads  # noqa: E402

QUESTIONS = ["What is 48 + 27?", "Sort from smallest to largest: 7 2 9 4", "把 305 写成中文数字。",
             "Reverse the letters: a b c d", "Tell me about Verona.", "写一首关于春天的诗。"]
PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "KING HENRY:\n", "春风", "明月", "HAMLET:\nTo be"]
ENDPOINT = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def one_request(port: int, i: int, max_tokens: int, endpoint: str = "completions",
                timeout: float = 120) -> tuple[float, float, int]:
    """(ttft_s, latency_s, completion_tokens) of one streamed request. `completions` continues text
    (replies run to max_tokens, so decoding dominates); `chat` asks short questions."""
    body = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    else:
        body["prompt"] = PROMPTS[i % len(PROMPTS)]
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", ENDPOINT[endpoint], body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        choice = chunk["choices"][0] if chunk["choices"] else {}
        if ttft is None and (choice.get("text") or choice.get("delta", {}).get("content")):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    lat = time.perf_counter() - t0
    return (ttft if ttft is not None else lat), lat, tokens


def load(port: int, clients: int, seconds: float, max_tokens: int, endpoint: str) -> dict:
    stats, errors, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(c: int) -> None:
        i = c
        while time.perf_counter() < deadline:
            try:
                r = one_request(port, i, max_tokens, endpoint)
                with lock:
                    stats.append(r)
            except Exception:
                with lock:
                    errors[0] += 1
            i += clients
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts, lats = sorted(s[0] for s in stats), sorted(s[1] for s in stats)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(stats), "tokens": sum(s[2] for s in stats), "wall": wall,
            "tok_s": sum(s[2] for s in stats) / wall, "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "lat_p50": pct(lats, 0.5), "lat_p95": pct(lats, 0.95), "errors": errors[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--train-seconds", type=float, default=30)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compiled decode step, as `ownllm serve` by default (compiled in the warm-up request)")
    args = ap.parse_args()
    setup_threads()
    with run_or_pretrain(args.run, args.train_seconds) as run:
        serve_and_load(str(run), args)


def serve_and_load(run: str, args) -> None:
    import uvicorn

    from ownllm.serve.app import build_state
    from ownllm.serve.app import create_app

    ns = argparse.Namespace(run=run, api_key=None, kb=None, tools=None, db=None, embedder="none", quantize=None,
                            slots=8, threads=None)
    from ownllm.inference.engine import compiled_by_default

    with compiled_by_default(args.compile):
        state = build_state(ns)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    for c in sorted({int(c) for c in args.clients.split(",")}):
        # warm-up at each load level: a compiled server builds a graph per batch width on first use
        warm = [threading.Thread(target=one_request, args=(port, i, 8, "completions", 1800)) for i in range(c)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
    rows = [load(port, int(c), args.seconds, args.max_tokens, args.endpoint) for c in args.clients.split(",")]
    print(f"run {run}, /v1/{args.endpoint}, {args.seconds:.0f}s per load level, max_tokens {args.max_tokens}, 8 decode slots")
    print(f"{'clients':>8}{'requests':>10}{'tokens':>8}{'tok/s':>9}{'TTFT p50 ms':>13}{'lat p50 s':>11}{'lat p95 s':>11}{'errors':>8}")
    for r in rows:
        print(f"{r['clients']:>8}{r['requests']:>10}{r['tokens']:>8}{r['tok_s']:>9.1f}{r['ttft_p50'] * 1000:>13.1f}"
              f"{r['lat_p50']:>11.2f}{r['lat_p95']:>11.2f}{r['errors']:>8}")
    base, top = rows[0], rows[-1]
    server.should_exit = True
    state.batcher.close()
    print(result_line(**{f"speedup_{top['clients']}_clients": top["tok_s"] / base["tok_s"],
                         "ttft_p50_ms": top["ttft_p50"] * 1000, "latency_p95_s": top["lat_p95"],
                         "errors": sum(r["errors"] for r in rows)}))


if __name__ == "__main__":
    main()
