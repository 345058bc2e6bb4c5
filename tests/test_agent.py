"""Agent: calculator and sql tools are safe and exact, schemas come from type hints, the loop works."""
import hashlib
import json
import time

import pytest

from ownllm.agent.calculator import CalculatorError, calculate
from ownllm.agent.loop import Agent, parse_call, split_calls
from ownllm.agent.sql import ReadOnlyDB, SQLToolError, build_demo_shop
from ownllm.agent.tools import ToolError, ToolRegistry, builtin_tools
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import TOOL_CALL, TOOL_CALL_END


@pytest.mark.parametrize("expr,expected", [
    ("4821 * 3907", "18835647"), ("(123 + 456) × 78", "45162"), ("0.1 + 0.2", "0.3"), ("1/3", "1/3 (≈ 0.3333333333)"),
    ("7 / 8", "0.875"), ("-2 ** 10", "-1024"), ("2 ^ 10", "1024"), ("10 % 3", "1"), ("7 // 2", "3"),
    ("3 > 2 > 1", "true"), ("1 == 2", "false"), ("12 × 3 ÷ 4", "9"), ("1.5e-3 * 2", "0.003"),
    ("123456789012345678901234567890 * 987654321098765432109876543210",
     str(123456789012345678901234567890 * 987654321098765432109876543210)), ("2 ** -2", "0.25"),
])
def test_calculator_is_exact(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr,match", [
    ("__import__('os').system('echo hi')", "Call"), ("open('/etc/passwd').read()", "Call"), ("x + 1", "Name"),
    ("(1).__class__", "Attribute"), ("[1, 2][0]", "List|Subscript"), ("'a' * 3", "only numbers"),
    ("lambda: 1", "Lambda"), ("1 if 1 else 2", "IfExp"), ("2 ** 100000", "exponent"), ("9 ** 9 ** 9", "exponent"),
    ("(10 ** 5000) ** 100", "too large"), ("1 / 0", "division by zero"), ("2 ** 0.5", "whole-number"),
    ("1 +", "cannot parse"), ("", "non-empty"), ("1+" * 2000 + "1", "longer than"), ("True + 1", "only numbers"),
])
def test_calculator_rejects_code_and_runaway_input(expr, match):
    t0 = time.perf_counter()
    with pytest.raises(CalculatorError, match=match):
        calculate(expr)
    assert time.perf_counter() - t0 < 1.0


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    return build_demo_shop(tmp_path_factory.mktemp("db") / "shop.sqlite")


def test_sql_reads_and_refuses_everything_else(shop):
    before = hashlib.sha256(shop.read_bytes()).hexdigest()
    db = ReadOnlyDB(shop, max_rows=5, time_limit=0.5)
    assert db.schema_text().splitlines() == ["customers(id, name, city)",
                                             "orders(id, customer_id, product_id, quantity, day)",
                                             "products(id, name, price)"]
    assert db.query("SELECT COUNT(*) AS n FROM orders") == "n\n400"
    out = db.query("SELECT id FROM orders ORDER BY id").splitlines()
    assert out[:3] == ["id", "1", "2"] and out[-1] == "(more than 5 rows; showing 5)" and len(out) == 7
    assert db.query("SELECT name FROM customers WHERE 0") == "name\n(no rows)"
    for bad in ["DELETE FROM orders", "UPDATE products SET price = 0", "INSERT INTO products VALUES (99, 'x', 1)",
                "DROP TABLE orders", "CREATE TABLE t(x)", f"ATTACH DATABASE '{shop}' AS other", "PRAGMA query_only=0",
                "PRAGMA journal_mode=DELETE", "BEGIN", "VACUUM", "SELECT load_extension('x')"]:
        with pytest.raises(SQLToolError):
            db.query(bad)
    with pytest.raises(SQLToolError, match="one statement"):
        db.query("SELECT 1; DELETE FROM orders")
    t0 = time.perf_counter()
    with pytest.raises(SQLToolError, match="time limit"):
        db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    assert time.perf_counter() - t0 < 2.0
    assert db.query("SELECT price FROM products WHERE name = 'pen'") == "price\n3"  # still serving
    db.close()
    assert hashlib.sha256(shop.read_bytes()).hexdigest() == before


def test_sql_bad_files(tmp_path):
    with pytest.raises(OwnLLMError, match="no such database"):
        ReadOnlyDB(tmp_path / "none.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(OwnLLMError, match="not a SQLite database"):
        ReadOnlyDB(junk)


def test_tool_schema_from_type_hints_and_docstring():
    reg = ToolRegistry()

    @reg.tool
    def area(width: float, height: float, unit: str | None = None) -> str:
        """Area of a rectangle.

        Args:
            width: in metres
            height (float): in metres
            unit: optional unit name
        """
        return f"{width * height:g}{unit or ''}"

    assert reg.schemas() == [{"type": "function", "function": {
        "name": "area", "description": "Area of a rectangle.",
        "parameters": {"type": "object", "properties": {
            "width": {"type": "number", "description": "in metres"}, "height": {"type": "number", "description": "in metres"},
            "unit": {"type": "string", "description": "optional unit name"}}, "required": ["width", "height"]}}}]
    assert reg.call("area", '{"width": 2, "height": 3.5}') == "7"
    for args, match in [('{"width": 2}', "missing argument 'height'"), ('{"width": "2", "height": 1}', "must be number"),
                        ('{"width": 1, "height": 1, "depth": 1}', "unknown argument"), ("{width: 1}", "not valid JSON"),
                        ("[1, 2]", "JSON object")]:
        with pytest.raises(ToolError, match=match):
            reg.call("area", args)
    with pytest.raises(ToolError, match="unknown tool"):
        reg.call("volume", "{}")
    with pytest.raises(TypeError, match="type hint"):
        reg.tool(lambda x: x)


def test_split_and_parse_calls(small_tokenizer):
    tok = small_tokenizer
    reg = builtin_tools(["calculator"])
    o, c = tok.special[TOOL_CALL], tok.special[TOOL_CALL_END]
    ids = (tok.encode("Let me compute.") + [o] + tok.encode('{"name": "calculator", "arguments": {"expression": "2*3"}}')
           + [c, o] + tok.encode('{"name": "calculator", "arguments": {"expression": 5}}') + [c, o]
           + tok.encode('{"name": "calc'))
    text, raws = split_calls(tok, ids)
    assert text == "Let me compute." and len(raws) == 3
    calls = [parse_call(r, reg) for r in raws]
    assert calls[0].valid and calls[0].arguments == {"expression": "2*3"}
    assert not calls[1].valid and "must be string" in calls[1].error
    assert not calls[2].valid and "not valid JSON" in calls[2].error


class ScriptedAgent(Agent):
    """The real loop with the model's turns replaced by a script of texts (tool calls as markers)."""

    def __init__(self, tok, registry, script):
        self.tok, self.registry, self.max_steps, self.script, self.prompts = tok, registry, 4, list(script), []

    def _generate(self, messages):
        self.prompts.append(self.tok.render(messages, add_generation_prompt=True, tools=self.registry.schemas()).ids)
        text = self.script.pop(0)
        o, c = self.tok.special[TOOL_CALL], self.tok.special[TOOL_CALL_END]
        ids = []
        for i, part in enumerate(text.split("|CALL|")):
            ids += ([o] + self.tok.encode(part) + [c]) if i % 2 else self.tok.encode(part)
        return ids


def test_agent_loop_runs_calls_feeds_back_errors_and_answers(small_tokenizer, shop):
    db = ReadOnlyDB(shop)
    reg = builtin_tools(["calculator", "sql"], db=db)
    script = ['|CALL|{"name": "calculator", "arguments": {"expression": "4821 * 3907"}}|CALL||CALL|{"name": "sql", '
              '"arguments": {"query": "DELETE FROM orders"}}|CALL|', '|CALL|{"name": "sql", "arguments": '
              '{"query": "SELECT COUNT(*) FROM orders"}}|CALL|', "18835647 and 400"]
    agent = ScriptedAgent(small_tokenizer, reg, script)
    events = []
    res = agent.run("What is 4821 × 3907, and how many orders are there?", on_event=lambda k, d: events.append(k))
    assert res.answer == "18835647 and 400" and res.finished and res.turns == 3
    assert [c.valid for c in res.calls] == [True, True, True]
    assert res.calls[0].result == "18835647" and res.calls[2].result == "COUNT(*)\n400"
    assert res.calls[1].result == "error: sql: only read-only SELECT queries are allowed"
    assert [m["role"] for m in res.messages] == ["user", "assistant", "tool", "tool", "assistant", "tool", "assistant"]
    assert json.loads(res.messages[1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "4821 * 3907"}
    assert events == ["call", "result", "call", "result", "call", "result", "answer"]
    # the second model turn saw both results
    seen = small_tokenizer.decode(agent.prompts[1])
    assert "<|tool|>18835647<|end|>" in seen and "read-only" in seen
    looping = ScriptedAgent(small_tokenizer, reg, ['|CALL|{"name": "calculator", "arguments": {"expression": "1"}}|CALL|'] * 4)
    res = looping.run("loop forever")
    assert not res.finished and res.turns == 4 and len(res.calls) == 4
    db.close()


def test_traces_are_consistent_with_the_real_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    from ownllm.data import traces
    from ownllm.agent.sql import demo_shop_path
    from ownllm.data.tasks import generate
    from ownllm.evaluation.agent import held_out

    traces._shop.cache_clear(), traces.tool_schemas.cache_clear()
    db = ReadOnlyDB(demo_shop_path(), max_rows=10_000)
    reg = builtin_tools(["calculator", "sql"], db=db)
    kinds = set()
    for e in generate(150, "train", seed=1, families=["tool_use"]):
        msgs = e.messages()
        assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Tools:\ncalculator(expression: string)")
        assert msgs[-1] == {"role": "assistant", "content": e.answer}
        if len(msgs) == 3:
            kinds.add("direct")
            continue
        call = msgs[2]["tool_calls"][0]["function"]
        kinds.add(call["name"])
        if call["name"] in ("calculator", "sql"):
            result = reg.call(call["name"], call["arguments"])
            assert msgs[3]["content"] == result
            assert e.answer in result.splitlines()[-1]
    assert kinds == {"calculator", "sql", "search", "direct"}
    test_q = {q for kind in ("mul", "multi", "sql") for q, _, _ in held_out(kind, 20)}
    assert len(test_q) == 60
    assert not test_q & {e.prompt for e in generate(3000, "train", seed=0, families=["tool_use"])}
    db.close()
    traces._shop.cache_clear(), traces.tool_schemas.cache_clear()


def test_cli_agent_and_eval_agent_run_end_to_end(tmp_path, monkeypatch, capsys, text_file):
    """A tiny untrained run: the commands work and report; the answers are not expected to be right."""
    from ownllm.cli import main
    from tests.conftest import TINY

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(text_file), "--out", str(run), "--max-steps", "2",
                 "--set", "model.max_seq_len=1024", *TINY]) == 0
    capsys.readouterr()
    assert main(["agent", "What is 12 × 34?", "--run", str(run), "--tools", "calculator,sql", "--db", "demo",
                 "--max-steps", "2"]) == 0
    assert "answer:" in capsys.readouterr().out
    assert main(["eval", "agent", "--run", str(run), "--n", "2", "--embedder", "none"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT arithmetic_with_tools=") and "sql_accuracy=" in last and "call_validity=" in last
    from ownllm.chat import ChatSession

    chat = ChatSession(str(run), temperature=0, registry=builtin_tools(["calculator"]))  # `ownllm chat --tools`
    reply = "".join(chat.reply("What is 12 × 34?"))
    assert chat.history[0] == {"role": "user", "content": "What is 12 × 34?"}
    assert chat.history[-1]["role"] == "assistant" and reply.endswith(chat.history[-1]["content"])
    assert main(["agent", "x", "--run", str(run), "--tools", "sql"]) == 2
    assert "needs a database" in capsys.readouterr().err
    assert main(["agent", "x", "--run", str(run), "--tools", "shell"]) == 2


def test_tool_abuse_corpus_neither_crashes_nor_writes_nor_runs_away(tmp_path):
    """Every case of bench/hostile.py's tool corpus (≥ 200: fts3_tokenizer and other pointer or
    extension functions, size bombs, writes, runaway recursion, deep nesting) through the registry:
    a clean result or error, within the time limit, the database file unchanged."""
    from bench.hostile import run_tool_corpus, shop_with_fts

    res = run_tool_corpus(shop_with_fts(tmp_path / "shop.sqlite"), time_limit=0.5)
    assert res["cases"] >= 200
    assert res["crashes"] == [] and res["over_limit"] == [] and not res["db_changed"]
    assert res["longest_reply"] < 9000   # a 40 MB cell is cut, not returned whole


def test_sql_functions_are_allow_listed_and_values_bounded(tmp_path):
    db = ReadOnlyDB(build_demo_shop(tmp_path / "odd #name?.sqlite"), time_limit=0.5)
    assert db.query("SELECT COUNT(*) FROM orders") == "COUNT(*)\n400"   # '#' and '?' do not open another file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd #name?.sqlite"]
    for q, match in [("SELECT hex(fts3_tokenizer('simple'))", "fts3_tokenizer"),
                     ("SELECT load_extension('x')", "load_extension"),
                     ("SELECT length(hex(randomblob(300000000)))", "randomblob")]:
        with pytest.raises(SQLToolError, match=match):
            db.query(q)
    t0 = time.perf_counter()
    with pytest.raises(SQLToolError, match="size limit"):
        db.query("WITH RECURSIVE c(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM c) SELECT length(s) FROM c")
    assert time.perf_counter() - t0 < 1.0
    assert db.query("SELECT upper(name) FROM products ORDER BY id LIMIT 1") == "upper(name)\nPEN"
    big = db.query("SELECT substr(group_concat(a.name || b.name, ''), 1, 900000) FROM customers a, customers b")
    assert len(big) < 9000 and big.splitlines()[1].endswith("chars)")


@pytest.mark.parametrize("expr,match", [
    ("+".join(["1"] * 1000), "nested too deeply"), ("*".join(["2"] * 999), "nested too deeply"),
    ("-" * 1999 + "1", "nested too deeply"), ("1e999", "too large"),
])
def test_calculator_refuses_deep_and_infinite_input(expr, match):
    with pytest.raises(CalculatorError, match=match):
        calculate(expr)


def test_calculator_answers_huge_exact_values_without_overflow():
    assert calculate("1/2**6900").endswith("(≈ 7.816816528e-2078)")
    assert calculate("10**3000/3").endswith("(≈ 3.333333333e+2999)")
    assert calculate("2**-20") == "0.00000095367431640625"


@pytest.mark.parametrize("reply, text, calls", [
    ('[TOOL_CALLS][{"name": "calculator", "arguments": {"expression": "2+3"}}]', "",
     [{"name": "calculator", "arguments": {"expression": "2+3"}}]),                                   # Mistral
    ('Sure.[TOOL_CALLS] [{"name": "calculator", "arguments": "{\\"expression\\": \\"7*6\\"}"}, '
     '{"name": "sql", "arguments": {"query": "SELECT 1"}}]', "Sure.",
     [{"name": "calculator", "arguments": {"expression": "7*6"}}, {"name": "sql", "arguments": {"query": "SELECT 1"}}]),
    ('<|python_tag|>{"name": "calculator", "parameters": {"expression": "9-1"}}', "",
     [{"name": "calculator", "arguments": {"expression": "9-1"}}]),                                    # Llama 3.1
    ('{"name": "calculator", "parameters": {"expression": "1+1"}}', "",
     [{"name": "calculator", "arguments": {"expression": "1+1"}}]),                                    # Llama 3 bare JSON
    ('Let me compute.\n```json\n{"name": "calculator", "arguments": {"expression": "4821 * 3907"}}\n```', "Let me compute.",
     [{"name": "calculator", "arguments": {"expression": "4821 * 3907"}}]),                            # fenced
    ('```json\n{"name": "weather", "arguments": {"city": "Lima"}}\n```', None, []),                    # not offered: text
    ('{"name": "calculator", "arguments": {}, "note": "x"}', None, []),                                # other keys: text
    ('The answer is {"name": "calculator"}', None, []),                                                 # prose: text
])
def test_calls_in_other_families_formats_are_read_only_for_offered_tools(small_tokenizer, reply, text, calls):
    """Mistral's [TOOL_CALLS], Llama 3's <|python_tag|> and bare {"name", "parameters"}, a fenced
    JSON object: each read as calls when it names an offered tool; anything else stays text."""
    from ownllm.tokenizer import Tokenizer

    tok = Tokenizer(small_tokenizer.hf)   # ours: its own markers are absent from these replies
    got_text, raws = split_calls(tok, tok.encode(reply), ["calculator", "sql", "search"])
    assert [json.loads(r) for r in raws] == calls
    assert got_text == (reply.strip() if text is None else text)
    assert split_calls(tok, tok.encode(reply)) == (reply.strip(), [])   # no tools offered: never a call
