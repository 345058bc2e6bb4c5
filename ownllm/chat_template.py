"""A model's own chat template, for models brought in with `ownllm import`.

Where it sits: ownllm's runs speak one chat format (tokenizer.py: `render`). A Qwen or Llama
instruct model imported from a Hugging Face directory was trained on *its* template (a Jinja
program in its tokenizer_config.json), so `import` keeps that template and the tokens that end a
reply; `Tokenizer.render` then renders with it — for chat, serve, ask and eval, and for SFT with
a loss mask on the assistant turns — instead of ours, and a later export writes it back.

The template runs the way transformers' `apply_chat_template` runs it (a sandboxed Jinja
environment with trim_blocks/lstrip_blocks, `raise_exception`, a non-escaping `tojson`,
`strftime_now`), so the same messages give the same text; a template is untrusted code from a
downloaded directory, hence the sandbox, and bounds on what one rendering may do: `range` items
in all (nested loops), the size of `*`/`**` results, recursion — past them it is an error. The loss mask comes from `{% generation %}` blocks where
a template has them (as transformers reads them), otherwise from the text each assistant message
adds: the difference between rendering the conversation up to it (with the generation prompt) and
up to and including it (`ChatTemplate.assistant_spans`).
"""
from __future__ import annotations

import contextvars
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from ownllm.errors import OwnLLMError


# While _TRACK is set, `{% generation %}` blocks come out between these two characters (which a
# rendered template never holds otherwise), so their spans can be read off the text.
GEN_OPEN, GEN_CLOSE = "\x02", "\x03"
_TRACK: contextvars.ContextVar[bool] = contextvars.ContextVar("ownllm_track_generation", default=False)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
# What one rendering may spend: items handed out by `range` in all, and elements in a `*` / `**` result.
MAX_RANGE_ITEMS = 1_000_000
MAX_PRODUCT = 1_000_000
_RANGE_LEFT: contextvars.ContextVar[list | None] = contextvars.ContextVar("ownllm_template_range", default=None)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` (marks assistant text in some templates): rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            text = caller()
            return f"{GEN_OPEN}{text}{GEN_CLOSE}" if _TRACK.get() else text

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names (as transformers does: no reaching CPython internals)."""
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            for name in dict(*args, **kwargs):
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, *args, **kwargs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def bounded_range(*args):
        r = range(*args)
        left = _RANGE_LEFT.get()
        if left is not None:
            left[0] -= len(r)
            if left[0] < 0:
                raise jinja2.exceptions.SecurityError(f"the template asked for over {MAX_RANGE_ITEMS} loop items")
        return r

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and abs(left) > 1:
                raise jinja2.exceptions.SecurityError("the template raised a number to too large a power")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_PRODUCT:
                        raise jinja2.exceptions.SecurityError(f"the template built a sequence over {MAX_PRODUCT} long")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace, range=bounded_range,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def token_text(value) -> str | None:
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class ChatTemplate:
    """An imported model's Jinja chat template, the special-token strings it refers to
    (bos_token, eos_token, ...) and the tokens that end an assistant reply."""
    source: str
    stop_tokens: list[str]
    variables: dict[str, str] = field(default_factory=dict)
    origin: str = "chat template"   # where it came from, for error messages

    def __post_init__(self):
        import jinja2

        try:
            _compile(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise OwnLLMError(f"{self.origin}: chat template line {e.lineno}: {e.message}") from None

    @classmethod
    def from_tokenizer_config(cls, cfg: dict, stop_tokens: list[str], origin: str) -> "ChatTemplate | None":
        """The template of a transformers tokenizer_config.json (the default one of a named list), or None."""
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if not isinstance(source, str) or not source.strip():
            return None
        variables = {k: t for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                     if (t := token_text(cfg.get(k))) is not None}
        return cls(source, stop_tokens, variables, origin)

    @property
    def writes_tools(self) -> bool:
        """Whether the template renders a tool list itself (it reads the `tools` variable)."""
        return re.search(r"\btools\b", self.source) is not None

    def text(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
             extra: dict | None = None) -> str:
        """The conversation as the template renders it; `extra`: more template variables."""
        import jinja2

        kwargs = extra or {}
        template = _compile(self.source)
        reserved = {"messages", "tools", "add_generation_prompt", *self.variables, *template.environment.globals}
        if reserved & kwargs.keys():
            raise OwnLLMError(f"template arguments {sorted(reserved & kwargs.keys())} are set by ownllm, not by the caller")
        budget = _RANGE_LEFT.set([MAX_RANGE_ITEMS])
        try:
            return template.render(messages=[plain_message(m) for m in messages], tools=tools or None,
                                   add_generation_prompt=add_generation_prompt, **self.variables, **kwargs)
        except jinja2.TemplateError as e:
            raise OwnLLMError(f"{self.origin}: the chat template refused this conversation: {e}") from None
        except RecursionError:
            raise OwnLLMError(f"{self.origin}: the chat template recursed too deeply") from None
        except Exception as e:  # untrusted code: whatever it raises is a refusal, not a crash
            raise OwnLLMError(f"{self.origin}: the chat template failed on this conversation "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        finally:
            _RANGE_LEFT.reset(budget)

    def assistant_spans(self, messages: list[dict], full: str, tools: list[dict] | None = None,
                        extra: dict | None = None) -> list[tuple[int, int]]:
        """Character spans of `full` (the whole conversation rendered) that assistant messages
        produced. A template with `{% generation %}` blocks says so itself (as transformers reads
        them); otherwise each message's span is the text it adds to the conversation before it
        (with the generation prompt), up to and including its last stop token, found in `full`;
        where a template renders earlier turns differently (Qwen3 drops their empty think blocks),
        the span runs from the message's content to the stop token after it."""
        if _GENERATION_TAG.search(self.source):
            return self._generation_spans(messages, full, tools, extra)
        spans, pos = [], 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.text(messages[:i], add_generation_prompt=True, tools=tools, extra=extra)
            upto = self.text(messages[: i + 1], tools=tools, extra=extra)
            added = upto[len(before):] if upto.startswith(before) else ""
            cut = max((added.rfind(s) + len(s) for s in self.stop_tokens if s in added), default=len(added))
            added = added[:cut]
            start = full.find(added, pos) if added else -1
            if start >= 0:
                end = start + len(added)
            else:
                content = (m.get("content") or "").strip()
                start = full.find(content, pos) if content else -1
                stops = [j + len(s) for s in self.stop_tokens if (j := full.find(s, start + len(content))) >= 0]
                if start < 0 or not stops:
                    raise OwnLLMError(f"{self.origin}: message {i}: cannot find this assistant turn in the rendered "
                                      "conversation, so its tokens cannot be marked for training")
                end = min(stops)
            spans.append((start, end))
            pos = end
        return spans

    def _generation_spans(self, messages, full, tools, extra) -> list[tuple[int, int]]:
        token = _TRACK.set(True)
        try:
            marked = self.text(messages, tools=tools, extra=extra)
        finally:
            _TRACK.reset(token)
        spans, out, depth, start = [], [], 0, 0
        for ch in marked:
            if ch == GEN_OPEN:
                start, depth = len(out), depth + 1
            elif ch == GEN_CLOSE:
                depth -= 1
                spans.append((start, len(out)))
            else:
                out.append(ch)
        if "".join(out) != full:
            raise OwnLLMError(f"{self.origin}: the conversation renders differently on a second pass")
        return [(s, e) for s, e in spans if e > s]


def plain_message(m: dict) -> dict:
    """A message as templates expect it: tool-call arguments as an object, not a JSON string."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        f = dict(c.get("function", c))
        if isinstance(f.get("arguments"), str):
            try:
                f["arguments"] = json.loads(f["arguments"])
            except ValueError:
                pass
        calls.append({**c, "function": f} if "function" in c else f)
    return {**m, "tool_calls": calls}


# Tools for a template that has none: the Hermes format (Qwen2.5 and Hermes models write it natively),
# as text in the turns the template does render.
HERMES_CALL = ("<tool_call>", "</tool_call>")
HERMES_INSTRUCTIONS = ("You can call tools. To call one, write <tool_call>\n{{\"name\": NAME, \"arguments\": {{…}}}}\n"
                       "</tool_call> and wait for its result, which comes back as <tool_response>…</tool_response>. "
                       "The tools:\n<tools>\n{tools}\n</tools>")


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with its tools written into it, for a template that renders none: the tool
    list in the system turn, each call a <tool_call> block after the assistant's text, each result a
    <tool_response> block in a user turn."""
    out, rest = [], list(messages)
    if tools:
        listed = HERMES_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if rest and rest[0].get("role") == "system":
            out.append({"role": "system", "content": f"{rest.pop(0).get('content') or ''}\n\n{listed}".lstrip()})
        else:
            out.append({"role": "system", "content": listed})
    for m in rest:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = ""
            for c in plain_message(m)["tool_calls"]:
                f = c.get("function", c)
                body = json.dumps({"name": f["name"], "arguments": f.get("arguments", {})}, ensure_ascii=False)
                calls += f"\n{HERMES_CALL[0]}\n{body}\n{HERMES_CALL[1]}"
            out.append({"role": "assistant", "content": ((m.get("content") or "") + calls).lstrip("\n")})
        elif m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append(m)
    return out


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    """A thinking model's reply (Qwen3, DeepSeek-R1 style), streamed piece by piece, split into its
    reasoning — the text inside `<think>`…`</think>`; the reply may start inside the block when the
    prompt opened it — and its answer, the rest, without the blank lines after the closing tag.
    `push` returns [(kind, text)] with kind 'reasoning' or 'content'; a tag split across pieces is
    held back until it is whole, so the joined pieces are the same however the reply was cut."""

    def __init__(self, in_think: bool = False):
        self.mode = "reasoning" if in_think else "start"
        self.buf = ""

    def push(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.mode == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buf, self.mode = head[len(THINK_OPEN):], "reasoning"
                elif THINK_OPEN.startswith(head):   # blank so far, or a tag still arriving
                    return out
                else:
                    self.mode = "content"
            elif self.mode == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    if i:
                        out.append(("reasoning", self.buf[:i]))
                    self.buf, self.mode = self.buf[i + len(THINK_CLOSE):], "after"
                    continue
                keep = next((k for k in range(len(THINK_CLOSE) - 1, 0, -1) if self.buf.endswith(THINK_CLOSE[:k])), 0)
                if len(self.buf) > keep:
                    out.append(("reasoning", self.buf[: len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            elif self.mode == "after":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.mode = "content"
            else:
                if self.buf:
                    out.append(("content", self.buf))
                self.buf = ""
                return out

    def flush(self) -> list[tuple[str, str]]:
        """What is still held back at the end of the reply."""
        kind = "reasoning" if self.mode == "reasoning" else "content"
        rest, self.buf = ("" if self.mode == "after" else self.buf), ""
        return [(kind, rest)] if rest else []

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of a whole reply."""
        parts = self.push(text) + self.flush()
        return ("".join(t for k, t in parts if k == "reasoning"),
                "".join(t for k, t in parts if k == "content"))


def parse_template_args(items: list[str]) -> dict:
    """--template-arg KEY=VALUE items → {KEY: VALUE}, VALUE as JSON when it parses (false, 3, "x")."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise OwnLLMError(f"--template-arg {item!r}: expected KEY=VALUE with KEY a name")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out
