"""Tool-use traces for SFT: when to call the calculator, search, or the database, and when not.

Where it sits: the task family `tool_use` (data/tasks.py) draws from `tool_trace`; `ownllm eval
agent` (evaluation/agent.py) asks held-out questions of the same kinds through the real agent
loop. Every trace is a whole conversation: the tool list (system turn, exactly as the agent
renders it), the question, the assistant's call, the tool's result — computed by the real tool:
the calculator, the demo shop database, or the search output format over articles of the
*train* world (data/world.py) — and the final answer.

Kinds: `mul` (4-digit × 4-digit), `multi` (two operations with parentheses), `sql` (questions
over the demo shop), `search` (facts of towns), `direct` (2-digit sums: answered without a tool).
"""
from __future__ import annotations

import json
import random
from functools import lru_cache

KINDS = ("mul", "multi", "sql", "search", "direct")
# sql twice as often as each other kind: writing the query (a customer's or product's name copied
# into the right clause) takes the most practice (see TASK_WEIGHTS in config.py)
KIND_WEIGHTS = (1, 1, 2, 1, 1)


@lru_cache(maxsize=1)
def _shop():
    from ownllm.agent.sql import ReadOnlyDB, demo_shop_path

    db = ReadOnlyDB(demo_shop_path(), max_rows=10_000)
    customers = [r.split(" | ") for r in db.query("SELECT name, city FROM customers").splitlines()[1:]]
    products = [r.split(" | ")[0] for r in db.query("SELECT name FROM products").splitlines()[1:]]
    cities = sorted({c for _, c in customers})
    return db, [n for n, _ in customers], products, cities


@lru_cache(maxsize=1)
def tool_schemas() -> list[dict]:
    """The three built-in tools as the agent lists them (schema of the demo shop for sql)."""
    from ownllm.agent.tools import builtin_tools

    return builtin_tools(["calculator", "search", "sql"], kb=object(), db=_shop()[0]).schemas()


SQL_QUESTIONS = [
    ("How many orders did {x} place?", "{x}下了多少个订单？",
     "SELECT COUNT(*) FROM orders JOIN customers ON customers.id = orders.customer_id WHERE customers.name = '{x}'"),
    ("Which city does {x} live in?", "{x}住在哪个城市？", "SELECT city FROM customers WHERE name = '{x}'"),
    ("What is the price of a {p}?", "{p}的价格是多少？", "SELECT price FROM products WHERE name = '{p}'"),
    ("How many {p} items were sold in total?", "{p}一共卖出了多少件？",
     "SELECT SUM(quantity) FROM orders JOIN products ON products.id = orders.product_id WHERE products.name = '{p}'"),
    ("How many customers live in {c}?", "有多少顾客住在{c}？", "SELECT COUNT(*) FROM customers WHERE city = '{c}'"),
]


def sql_question(r: random.Random, lang: str) -> tuple[str, str, str]:
    """(question, gold SQL, gold answer) over the demo shop."""
    db, names, products, cities = _shop()
    en, zh, sql = r.choice(SQL_QUESTIONS)
    fill = {"x": r.choice(names), "p": r.choice(products), "c": r.choice(cities)}
    q = (en if lang == "en" else zh).format(**fill)
    query = sql.format(**fill)
    rows = db.query(query).splitlines()
    return q, query, rows[1] if len(rows) > 1 and rows[1] != "(no rows)" else "0"


def arithmetic_question(r: random.Random, lang: str, kind: str) -> tuple[str, str, str]:
    """(question, expression, exact answer) for `mul` or `multi`."""
    if kind == "mul":
        a, b = r.randint(1000, 9999), r.randint(1000, 9999)
        expr, shown = f"{a} * {b}", f"{a} × {b}"
    else:
        a, b, c = r.randint(100, 999), r.randint(100, 999), r.randint(10, 99)
        op = r.choice("+-")
        shown = f"({a} {op} {b}) × {c}" if r.random() < 0.5 else f"{c} × ({a} {op} {b})"
        expr = shown.replace("×", "*")
    from ownllm.agent.calculator import calculate

    q = f"What is {shown}?" if lang == "en" else f"计算 {shown}。"
    return q, expr, calculate(expr)


def _call(name: str, args: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]}


def _search_result(r: random.Random, lang: str) -> tuple[str, str, str]:
    """(question, search output as the search tool prints it, cited answer) from the train world."""
    from ownllm.data.world import ATTRIBUTES, QUESTIONS, make_world
    from ownllm.data.grounded import cited_answer, numbered_sources

    towns = [t for t in make_world("train").towns if t.lang == lang]
    target, other = r.sample(towns, 2)
    attr = r.choice([a for a in ATTRIBUTES if a in target.facts])
    first = r.random() < 0.8  # usually the best hit is the town asked about
    shown = [target, other] if first else [other, target]
    out = numbered_sources([t.article() for t in shown])
    return QUESTIONS[lang][attr].format(n=target.name), out, cited_answer(target.sentence(attr), shown.index(target) + 1, lang)


def tool_trace(r: random.Random, lang: str) -> tuple[str, str, tuple]:
    """(question, final answer, whole conversation) of one trace; the kind is drawn at random."""
    from ownllm.tokenizer import tools_text

    system = {"role": "system", "content": tools_text(tool_schemas())}
    kind = r.choices(KINDS, KIND_WEIGHTS)[0]
    if kind in ("mul", "multi"):
        q, expr, ans = arithmetic_question(r, lang, kind)
        turns = [_call("calculator", {"expression": expr}), {"role": "tool", "content": ans}]
    elif kind == "sql":
        q, query, ans = sql_question(r, lang)
        result = _shop()[0].query(query)
        turns = [_call("sql", {"query": query}), {"role": "tool", "content": result}]
    elif kind == "search":
        q, result, ans = _search_result(r, lang)
        turns = [_call("search", {"query": q}), {"role": "tool", "content": result}]
    else:
        a, b = r.randint(10, 99), r.randint(10, 99)
        q = f"What is {a} + {b}?" if lang == "en" else f"计算：{a} + {b} 等于多少？"
        ans, turns = str(a + b), []
    conv = (system, {"role": "user", "content": q}, *turns, {"role": "assistant", "content": ans})
    return q, ans, conv
