"""Tools the model can call: a registry in the OpenAI tool schema, built from typed functions.

Where it sits: the agent loop (agent/loop.py), `ownllm agent|chat --tools …` and the server list
tools with `schemas()` (rendered into the chat template's tool list) and run a call with
`call(name, arguments)`. Register any typed function:

    @registry.tool
    def area(width: float, height: float) -> str:
        \"\"\"Area of a rectangle.

        Args:
            width: in metres
            height: in metres
        \"\"\"

The JSON schema comes from the type hints (str/int/float/bool/list/dict, Optional) and the
docstring (first paragraph = description, `Args:` lines = parameter descriptions). Arguments
are validated against it before the function runs; every failure is a `ToolError` whose text
goes back to the model as the observation.
"""
from __future__ import annotations

import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


class ToolError(ValueError):
    pass


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _json_type(hint) -> tuple[str, bool]:
    """(JSON type, optional?) for a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _json_type(args[0])[0], True
        raise TypeError(f"unsupported union {hint}")
    base = origin or hint
    if base not in _JSON_TYPES:
        raise TypeError(f"unsupported parameter type {hint}")
    return _JSON_TYPES[base], False


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    doc = inspect.cleandoc(doc or "")
    summary = doc.split("\n\n")[0].replace("\n", " ").strip()
    params = {}
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?)+)", doc, flags=re.M)
    if m:
        for line in m.group(1).splitlines():
            pm = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
            if pm:
                params[pm.group(1)] = pm.group(2).strip()
    return summary, params


def tool_from_function(fn: Callable, name: str | None = None, description: str | None = None) -> Tool:
    hints = typing.get_type_hints(fn)
    summary, param_docs = _doc_parts(fn.__doc__ or "")
    props, required = {}, []
    for pname, p in inspect.signature(fn).parameters.items():
        if pname not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {pname!r} needs a type hint")
        jtype, optional = _json_type(hints[pname])
        props[pname] = {"type": jtype}
        if pname in param_docs:
            props[pname]["description"] = param_docs[pname]
        if p.default is inspect.Parameter.empty and not optional:
            required.append(pname)
    return Tool(name or fn.__name__, description or summary, {"type": "object", "properties": props, "required": required}, fn)


def _check_type(value, jtype: str) -> bool:
    if jtype == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if jtype == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "array": list, "object": dict}[jtype])


class ToolRegistry:
    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def tool(self, fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
        """Decorator (bare or with name=/description=) registering a typed function as a tool."""
        def register(f: Callable) -> Callable:
            t = tool_from_function(f, name, description)
            self.tools[t.name] = t
            return f
        return register(fn) if fn is not None else register

    def add(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self.tools.values()]

    def validate(self, name: str, arguments: Any) -> dict:
        if name not in self.tools:
            raise ToolError(f"unknown tool {name!r} (available: {', '.join(self.tools) or 'none'})")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                raise ToolError(f"arguments are not valid JSON ({e.msg} at position {e.pos})") from None
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        spec = self.tools[name].parameters
        unknown = set(arguments) - set(spec["properties"])
        if unknown:
            raise ToolError(f"unknown argument(s) {sorted(unknown)} for {name}")
        for req in spec.get("required", []):
            if req not in arguments:
                raise ToolError(f"missing argument {req!r} for {name}")
        for k, v in arguments.items():
            jtype = spec["properties"][k]["type"]
            if v is not None and not _check_type(v, jtype):
                raise ToolError(f"argument {k!r} of {name} must be {jtype}, got {type(v).__name__}")
        return arguments

    def call(self, name: str, arguments: Any) -> str:
        """Run a tool; any failure becomes a ToolError with a message meant for the model."""
        args = self.validate(name, arguments)
        try:
            out = self.tools[name].fn(**args)
        except ToolError:
            raise
        except (ValueError, ArithmeticError) as e:  # the tools' own, clear errors
            raise ToolError(f"{name}: {e}") from None
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)


def builtin_tools(names: list[str], kb=None, db=None) -> ToolRegistry:
    """A registry with the built-in tools `names` (calculator, search, sql)."""
    from ownllm.errors import OwnLLMError

    reg = ToolRegistry()
    for n in names:
        if n == "calculator":
            from ownllm.agent.calculator import calculate

            def calculator(expression: str) -> str:
                """Exact arithmetic (+ - * / ** %, parentheses).

                Args:
                    expression: for example (1234 + 5) * 678
                """
                return calculate(expression)
            reg.tool(calculator)
        elif n == "search":
            if kb is None:
                raise OwnLLMError("--tools search needs a knowledge base (--kb FILE or --kb demo)")
            def search(query: str) -> str:
                """Search the knowledge base.

                Args:
                    query: what to look for
                """
                return kb.search_text(query, k=2)
            reg.tool(search)
        elif n == "sql":
            if db is None:
                raise OwnLLMError("--tools sql needs a database (--db FILE or --db demo)")

            def sql(query: str) -> str:
                """Read-only SQLite query.

                Args:
                    query: one SELECT statement
                """
                return db.query(query)
            reg.add(tool_from_function(sql, description="Read-only SQLite query. Tables: "
                                       + "; ".join(db.schema_text().splitlines())))
        else:
            raise OwnLLMError(f"--tools: unknown tool {n!r} (built in: calculator, search, sql)")
    return reg
