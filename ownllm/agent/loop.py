"""The agent loop: generate → parse tool calls → run them → append results → generate again.

Where it sits: `ownllm agent`, `ownllm chat --tools`, `ownllm eval agent` and the server run an
`Agent`. The model writes calls in its turn as `<|tool_call|>{"name": …, "arguments": {…}}
<|/tool_call|>` (chat template, tokenizer.py); several calls in one turn run in order. A call
that does not parse, names an unknown tool or has bad arguments is not fatal: its error text
goes back as the tool result, so the model can correct itself. The loop ends when the model
answers without calling a tool, or after `max_steps` model turns.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from ownllm.agent.tools import ToolError, ToolRegistry
from ownllm.inference.engine import Engine, SamplingParams
from ownllm.errors import OwnLLMError

MAX_RESULT_CHARS = 600


@dataclass
class Call:
    name: str | None
    arguments: dict | str | None
    raw: str
    valid: bool = False          # parsed, known tool, arguments match its schema
    result: str = ""
    error: str | None = None


@dataclass
class AgentResult:
    answer: str
    messages: list[dict]
    calls: list[Call] = field(default_factory=list)
    turns: int = 0
    finished: bool = True        # False: max_steps reached before a final answer


def split_calls(tok, ids: list[int], names=None) -> tuple[str, list[str]]:
    """(plain text, [raw call texts]) of one generated assistant turn, split on the tokenizer's call
    markers (ours, or an imported template's `<tool_call>`…`</tool_call>`). With `names` (the tools
    offered), the other formats models write their calls in are read too (find_calls)."""
    text = tok.decode(ids)
    markers = tok.call_markers
    plain, calls, pos = [], [], 0
    if markers is not None:
        open_, close = markers
        while (start := text.find(open_, pos)) >= 0:
            plain.append(text[pos:start])
            end = text.find(close, start + len(open_))
            calls.append(text[start + len(open_): len(text) if end < 0 else end].strip())  # unterminated: still a call
            pos = len(text) if end < 0 else end + len(close)
    plain.append(text[pos:])
    rest = "".join(plain).strip()
    if calls or not names:
        return rest, calls
    return find_calls(rest, names)


_FENCED = re.compile(r"```(?:json|tool_call|tool)?\s*\n?(.*?)```", re.S)


def _as_call(obj, names) -> str | None:
    """A call object ({"name", "arguments"}, or Llama 3's {"name", "parameters"}) naming an offered
    tool, as our raw call text; None for anything else."""
    if not isinstance(obj, dict) or obj.get("name") not in names or not set(obj) <= {"name", "arguments", "parameters",
                                                                                   "type", "id"}:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return json.dumps({"name": obj["name"], "arguments": args}, ensure_ascii=False)


def find_calls(text: str, names) -> tuple[str, list[str]]:
    """Calls written in the formats of other model families, read only when they name an offered
    tool: Mistral's `[TOOL_CALLS][{…}, …]`, Llama 3's `<|python_tag|>{…}` or a bare
    `{"name": …, "parameters": …}` reply, and a JSON object in a fenced block. (plain text, calls);
    text that only looks like a call (an unknown name, other keys) stays text."""
    names = set(names)
    for tag in ("[TOOL_CALLS]", "<|python_tag|>"):
        if tag in text:
            head, _, body = text.partition(tag)
            try:
                obj = json.JSONDecoder().raw_decode(body.strip())[0]
            except ValueError:
                continue
            calls = [_as_call(o, names) for o in (obj if isinstance(obj, list) else [obj])]
            if calls and all(calls):
                return head.strip(), calls
    fenced = [(m, _as_call(_json_or_none(m.group(1)), names)) for m in _FENCED.finditer(text)]
    if fenced and all(c for _, c in fenced):
        plain = _FENCED.sub("", text).strip()
        return plain, [c for _, c in fenced]
    whole = _as_call(_json_or_none(text), names)
    return ("", [whole]) if whole else (text, [])


def _json_or_none(text: str):
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def parse_call(raw: str, registry: ToolRegistry) -> Call:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return Call(None, None, raw, error=f"error: the tool call is not valid JSON ({e.msg} at position {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return Call(None, None, raw, error='error: a tool call must be {"name": ..., "arguments": {...}}')
    try:
        args = registry.validate(obj["name"], obj.get("arguments", {}))
    except ToolError as e:
        return Call(obj["name"], obj.get("arguments"), raw, error=f"error: {e}")
    return Call(obj["name"], args, raw, valid=True)


def require_tool_calls(tok) -> None:
    """Tools need a chat template whose tool calls we can read; an error saying so otherwise."""
    if tok.call_markers is None:
        raise OwnLLMError("this run's chat template (imported with the model) has no tool-call format ownllm "
                          "can read (ownllm's own, or <tool_call>…</tool_call>), so it cannot use tools")


class Agent:
    def __init__(self, model, tok, registry: ToolRegistry, max_steps: int = 4, max_new_tokens: int = 160,
                 temperature: float = 0.0, seed: int | None = None, template_kwargs: dict | None = None,
                 generate=None):
        """`generate(ids, params) -> ids`: how a turn is decoded (the server passes its batcher's,
        so an agent request shares decode steps instead of holding the model); default an Engine."""
        require_tool_calls(tok)
        self.model, self.tok, self.registry = model, tok, registry
        self.template_kwargs = template_kwargs or {}
        self.max_steps, self.max_new_tokens = max_steps, max_new_tokens
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                     stop_ids=tok.stop_ids)
        self.engine = Engine(model, tok.pad_id)
        self.generate = generate or self._engine_generate

    def _engine_generate(self, ids: list[int], params: SamplingParams) -> list[int]:
        with torch.inference_mode():
            return self.engine.generate([ids], params)[0]

    def _generate(self, messages: list[dict]) -> list[int] | None:
        ids = self.tok.render(messages, add_generation_prompt=True, tools=self.registry.schemas(),
                              template_kwargs=self.template_kwargs).ids
        if len(ids) + self.max_new_tokens > self.model.config.max_seq_len:
            return None
        return [t for t in self.generate(ids, self.params) if t not in self.tok.stop_ids]

    def run(self, question: str | list[dict], on_event=None) -> AgentResult:
        """Answer `question` (a user message, or a whole conversation so far). `on_event(kind, data)`
        sees each 'call', 'result' and 'answer' as it happens (for printing a live trace)."""
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        res = AgentResult("", messages)
        for turn in range(self.max_steps):
            out = self._generate(messages)
            res.turns = turn + 1
            if out is None:
                res.answer, res.finished = "(the conversation no longer fits the model's context)", False
                break
            text, raws = split_calls(self.tok, out, list(self.registry.tools))
            if not raws:
                res.answer = text
                messages.append({"role": "assistant", "content": text})
                if on_event:
                    on_event("answer", text)
                return res
            calls = [parse_call(r, self.registry) for r in raws]
            messages.append({"role": "assistant", "content": text, "tool_calls": [
                {"id": f"call_{len(res.calls) + i}", "type": "function",
                 "function": {"name": c.name or "?", "arguments": c.raw if not c.valid else json.dumps(c.arguments, ensure_ascii=False)}}
                for i, c in enumerate(calls)]})
            for i, c in enumerate(calls):
                if on_event:
                    on_event("call", c)
                if c.valid:
                    try:
                        c.result = self.registry.call(c.name, c.arguments)
                    except ToolError as e:
                        c.error = f"error: {e}"
                c.result = (c.error or c.result)[:MAX_RESULT_CHARS]
                messages.append({"role": "tool", "tool_call_id": f"call_{len(res.calls) + i}", "content": c.result})
                if on_event:
                    on_event("result", c)
            res.calls += calls
        else:
            res.finished = False
            res.answer = "(no final answer within the step limit)"
        return res


def open_tools(tools: str, kb: str | None, db: str | None, embedder: str | None = None):
    """(ToolRegistry, [things to close]) for `--tools a,b` with the --kb / --db they need."""
    from ownllm.agent.sql import ReadOnlyDB, resolve_db
    from ownllm.agent.tools import builtin_tools
    from ownllm.rag.demo import open_kb

    names = [t.strip() for t in tools.split(",") if t.strip()]
    kb_obj = open_kb(kb, embedder) if kb and "search" in names else None
    db_obj = ReadOnlyDB(resolve_db(db)) if db and "sql" in names else None
    return builtin_tools(names, kb=kb_obj, db=db_obj), [x for x in (kb_obj, db_obj) if x is not None]
