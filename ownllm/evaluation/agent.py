"""`ownllm eval agent`: held-out questions through the real agent loop, with and without tools.

Where it sits: scores a fine-tuned run on questions of the kinds in data/traces.py whose
prompts fall in the test bucket (never trained on): 4-digit × 4-digit products and two-step
arithmetic (calculator), questions over the demo shop (sql), and facts of the demo knowledge
base (search; its towns are not the train world's). "Without tools" asks the same arithmetic
as a plain chat turn. Call validity = calls that parse, name a known tool and match its schema,
over all calls made.
"""
from __future__ import annotations

import random
from collections import defaultdict

from ownllm.agent.loop import Agent
from ownllm.data.traces import arithmetic_question, sql_question
from ownllm.data.tasks import prompt_bucket
from ownllm.data.grounded import parse_answer


def held_out(kind: str, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n distinct test-bucket (question, gold answer, lang) of a kind: mul, multi or sql."""
    r = random.Random(f"agent-eval:{kind}:{seed}")
    out, seen = [], set()
    if n <= 0:
        return out
    for _ in range(200 * n + 1000):
        lang = "en" if r.random() < 0.5 else "zh"
        if kind == "sql":
            q, _, ans = sql_question(r, lang)
        else:
            q, _, ans = arithmetic_question(r, lang, kind)
        if prompt_bucket(q) == 0 and q not in seen:
            seen.add(q)
            out.append((q, ans, lang))
            if len(out) == n:
                break
    return out


def evaluate_agent(run, kb=None, db=None, n_arith: int = 40, n_sql: int = 40, n_search: int = 20, seed: int = 0,
                   log=None) -> dict:
    from ownllm.agent.tools import builtin_tools
    from ownllm.inference.generate import greedy_texts, load_run

    model, tok = load_run(run)
    names = ["calculator"] + (["search"] if kb is not None else []) + (["sql"] if db is not None else [])
    agent = Agent(model, tok, builtin_tools(names, kb=kb, db=db))
    questions = [("arithmetic", q, (a,)) for kind in ("mul", "multi") for q, a, _ in held_out(kind, n_arith // 2, seed)]
    if db is not None:
        questions += [("sql", q, (a,)) for q, a, _ in held_out("sql", n_sql, seed)]
    if kb is not None and n_search:
        from ownllm.data.world import make_world

        r = random.Random(seed)
        qs = [q for q in make_world("demo").questions() if q.kind == "answerable"]
        questions += [("search", q.question, q.exact_answers) for q in r.sample(qs, n_search)]
    per = defaultdict(lambda: [0, 0])
    calls = valid = 0
    samples = []
    for fam, q, golds in questions:
        res = agent.run(q)
        ans = parse_answer(res.answer)[0] if fam == "search" else res.answer.strip()
        ok = ans in golds
        gold = golds[0]
        per[fam][0] += ok
        per[fam][1] += 1
        calls += len(res.calls)
        valid += sum(c.valid for c in res.calls)
        samples.append({"family": fam, "question": q, "gold": gold, "answer": res.answer, "correct": ok,
                        "calls": [{"raw": c.raw, "valid": c.valid, "result": c.result} for c in res.calls]})
        if log:
            log(f"{'ok ' if ok else 'bad'} {fam:<10} {q[:50]:<50} -> {res.answer[:40]}")
    # the same arithmetic as one plain chat turn, no tools
    arith = [(q, a) for f, q, a in questions if f == "arithmetic"]
    outs = greedy_texts(model, tok, [tok.user_turn(q)
                                     for q, _ in arith], max_new_tokens=24)
    no_tools = sum(o.strip() == a for (_, a), o in zip(arith, outs))
    acc = {f: c / n for f, (c, n) in per.items()}
    return {"with_tools": acc, "arithmetic_without_tools": no_tools / max(len(arith), 1),
            "call_validity": valid / max(calls, 1), "calls": calls, "n": len(questions),
            "counts": {f: n for f, (_, n) in per.items()}, "samples": samples}


def print_agent_report(res: dict, out=print) -> None:
    out(f"agent: {res['n']} held-out questions, greedy, {res['calls']} tool calls")
    out(f"{'family':<12}{'questions':>10}{'accuracy':>10}")
    for f, a in res["with_tools"].items():
        out(f"{f:<12}{res['counts'][f]:>10}{a:>10.3f}")
    out(f"{'arithmetic without tools':<32}{res['arithmetic_without_tools']:>10.3f}")
    out(f"{'tool-call validity':<32}{res['call_validity']:>10.3f}")
    w = res["with_tools"]
    extra = f" search_accuracy={w['search']:.4f}" if "search" in w else ""
    out(f"RESULT arithmetic_with_tools={w['arithmetic']:.4f} arithmetic_without_tools={res['arithmetic_without_tools']:.4f} "
        f"sql_accuracy={w.get('sql', 0.0):.4f} call_validity={res['call_validity']:.4f}{extra}")
