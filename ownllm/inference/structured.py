"""Constrained decoding: output that always parses, under a JSON Schema, any JSON object or a regex.

Where it sits: `SamplingParams(json_schema=…)` / `regex=…` (engine.py) give each request a
`Constraint`; the Engine and the server's batcher call `mask_` on a row's logits before sampling
and `advance` with the token sampled, so only tokens that keep the output valid can be drawn, and
a finished grammar ends the reply. The grammar work is llguidance's (Rust, the library behind
Guidance and llama.cpp's `%llguidance` grammars): it compiles the schema, walks the tokenizer's
byte-level vocabulary and answers a token bitmask per step; nothing here interprets a schema.
JSON is generated compact (`{"a": 1, "b": [2, 3]}`): a model that may add whitespace anywhere can
spend its whole budget on it.
"""
from __future__ import annotations

import json
from functools import lru_cache

import torch

from ownllm.errors import OwnLLMError

# compact separators and no free whitespace: the output has one spelling per value
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def compile_grammar(json_schema: dict | bool | None = None, regex: str | None = None,
                    lark: str | None = None) -> str:
    """The llguidance grammar for a JSON Schema (True: any JSON object), a regex or a Lark grammar
    (tool_call_grammar's); an invalid one, or a feature llguidance does not support, is an
    OwnLLMError naming it."""
    try:
        # not sort_keys: the grammar writes properties in the order the schema lists them
        key = json.dumps(json_schema) if json_schema not in (None, True) else json_schema
    except (TypeError, ValueError) as e:
        raise OwnLLMError(f"the JSON schema is not JSON ({e})") from None
    return _compile(key, regex, lark)


@lru_cache(maxsize=64)
def _compile(key, regex: str | None, lark: str | None) -> str:
    import llguidance

    json_schema = json.loads(key) if isinstance(key, str) else key
    if sum(x is not None for x in (json_schema, regex, lark)) != 1:
        raise OwnLLMError("give exactly one of a JSON schema, a regex or a grammar to constrain the output")
    try:
        if lark is not None:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        elif regex is not None:
            if not isinstance(regex, str) or not regex:
                raise OwnLLMError("the regex must be a non-empty string")
            grammar = llguidance.LLMatcher.grammar_from_regex(regex)
        else:
            schema = {"type": "object"} if json_schema is True else json_schema
            if not isinstance(schema, dict):
                raise OwnLLMError("the JSON schema must be an object")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise OwnLLMError(f"the output constraint is not valid: {str(e)[:200]}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise OwnLLMError(f"the output constraint is not supported: {error.strip()[:300]}")
    return grammar


def call_format(tok) -> tuple[str, str, str] | None:
    """How the chat template spells a tool call between its markers: (before the name, between the
    name and the arguments, after the arguments), read off a rendered sample call; None when the
    template has no call format we read, or spells calls some other way."""
    from ownllm.tokenizer import tool_call_text

    if tok.call_markers is None:
        return None
    if not tok.template:
        inside = tool_call_text({"name": "NAME", "arguments": "ARGS"})
    else:
        open_, close = tok.call_markers
        tools = [{"type": "function", "function": {"name": "fn_q7", "description": "",
                                                   "parameters": {"type": "object", "properties": {"a_q7": {"type": "integer"}}}}}]
        messages = [{"role": "user", "content": "u_q7"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "fn_q7", "arguments": {"a_q7": 1}}}]}]
        if not tok.template.writes_tools:
            from ownllm.chat_template import hermes_messages

            messages, tools = hermes_messages(messages, tools), None
        try:
            text = tok.template.text(messages, False, tools)
        except OwnLLMError:
            return None
        start = text.find(open_, text.find("u_q7"))
        end = text.find(close, start + 1)
        inside = text[start + len(open_): end] if 0 <= start < end else ""
        inside = inside.replace("fn_q7", "NAME", 1).replace('{"a_q7": 1}', "ARGS", 1)
    before, _, rest = inside.partition("NAME")
    middle, _, after = rest.partition("ARGS")
    if not rest or "NAME" in rest or "ARGS" not in rest or "ARGS" in after:
        return None
    return before, middle, after


def tool_call_grammar(tok, tools: list[dict], choice: str = "auto") -> str:
    """A Lark grammar for a reply that may call the offered tools: free text, and calls in the
    template's own format whose name is an offered one and whose arguments conform to the tool's
    parameters schema (any JSON object for a tool not marked `strict`). `choice`: "auto", "required"
    (the reply is calls and nothing else) or a tool's name (the reply is one call to it)."""
    fmt = call_format(tok)
    if fmt is None:
        raise OwnLLMError("this model's chat template has no tool-call format that can be constrained")
    before, middle, after = fmt
    open_, close = tok.call_markers

    def marker(s: str) -> str:
        # a marker that is one added token (ours, Qwen's <tool_call>) is that token, by id: the
        # grammar library keeps added tokens apart from text; any other marker is text
        tid = tok.hf.token_to_id(s)
        return f"<[{tid}]>" if tid is not None and ll_tokenizer(tok, tok.vocab_size).is_special_token(tid) else json.dumps(s)

    rules, first = [], []   # one rule per tool: its call, arguments under its schema
    for i, t in enumerate(tools):
        f = t.get("function", t)
        schema = (f.get("parameters") or {"type": "object"}) if f.get("strict") else {"type": "object"}
        schema = {**schema, "x-guidance": JSON_OPTIONS}
        rules.append(f"body_{i}: {json.dumps(before + f['name'] + middle)} %json {json.dumps(schema)} "
                     f"{json.dumps(after)} {marker(close)}")
        if choice in ("auto", "required", f["name"]):
            first.append(f"body_{i}")
    if not first:
        raise OwnLLMError(f"tool_choice names {choice!r}, which is not among the tools")
    lines = ["%llguidance {}", "TAG_TEXT: /(.|\\n)*/", f"body: {' | '.join(f'body_{i}' for i in range(len(rules)))}",
             *rules]
    if marker(open_).startswith("<["):
        lines.append(f"call: TAG_TEXT {marker(open_)} body")
    else:  # text markers: the call starts where the text first spells the marker
        lines += [f"call_open[lazy]: TAG_TEXT {marker(open_)}", "call: call_open body"]
    if choice == "auto":
        lines.append("start: call* TAG_TEXT")
    elif choice == "required":   # calls only, as many as the model makes, spaces between
        lines += ["SEP: /[ \\n]*/", f"start: {marker(open_)} body (SEP {marker(open_)} body)*"]
    else:                        # exactly one call, to that tool
        lines.append(f"start: {marker(open_)} ({' | '.join(first)})")
    return "\n".join(lines) + "\n"


def load_schema(path, flag: str, check=None) -> dict:
    """A JSON Schema file, for `flag` (named in the one-line error a missing, broken or, by
    `check(schema)`, unusable file gets)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise OwnLLMError(f"{flag} {p}: no such file")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OwnLLMError(f"{flag} {p}: not JSON ({str(e)[:120]})") from None
    if check is not None:
        try:
            check(schema)
        except OwnLLMError as e:
            raise OwnLLMError(f"{flag} {p}: {e}") from None
    return schema


def ll_tokenizer(tok, n_vocab: int):
    """llguidance's view of our tokenizer (built once per tokenizer and vocabulary size: ~0.2 s
    for 50k tokens)."""
    import llguidance

    cache = tok.__dict__.setdefault("_llguidance", {})
    if n_vocab not in cache:
        cache[n_vocab] = llguidance.LLTokenizer(tok.hf.to_str(), n_vocab=n_vocab, eos_token=list(tok.stop_ids))
    return cache[n_vocab]


def _fresh_matcher(tok, grammar: str, n_vocab: int):
    """A matcher at the grammar's start: a copy of one kept per tokenizer and grammar (building
    one takes ~1 ms and its first mask ~2 ms; a copy ~2 µs, and copies share the mask caches)."""
    import llguidance

    kept = tok.__dict__.setdefault("_llguidance_matchers", {})
    key = (n_vocab, grammar)
    if key not in kept:
        m = llguidance.LLMatcher(ll_tokenizer(tok, n_vocab), grammar, log_level=0)
        if m.is_error():
            raise OwnLLMError(f"the output constraint is not supported: {m.get_error()[:300]}")
        if len(kept) >= 32:
            kept.pop(next(iter(kept)))
        kept[key] = m
    return kept[key].deep_copy()


class Constraint:
    """One request's grammar state: which tokens may come next, and whether the output is complete."""

    def __init__(self, tok, grammar: str, n_vocab: int):
        self.matcher = _fresh_matcher(tok, grammar, n_vocab)
        self.n_vocab = n_vocab

    def fill_mask(self, bitmask: torch.Tensor) -> None:
        """Write the allowed tokens now (stop tokens once the output is complete) into an int32
        bitmask row of (n_vocab + 31) // 32 words."""
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        if self.matcher.is_error():
            raise OwnLLMError(f"constrained decoding failed: {self.matcher.get_error()[:300]}")

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits (1, V) or (V,) of every token the grammar forbids to -inf, in place."""
        return mask_rows_(logits.view(1, -1), [self])

    def try_take(self, token: int, stops) -> bool:
        """Take `token` if the grammar allows it now (a stop token: if the output is complete)."""
        if token in stops:
            return self.complete
        return self.matcher.try_consume_tokens([int(token)]) == 1

    def take(self, token: int, stops=()) -> None:
        """Take a token drawn under this grammar's mask (a stop token ends the reply; nothing to take)."""
        if token not in stops and not self.matcher.consume_token(int(token)):
            raise OwnLLMError(f"constrained decoding failed: {self.matcher.get_error()[:300]}")

    @property
    def finished(self) -> bool:
        """Nothing may follow: the reply ends here (a stop token would be the only choice)."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The output so far satisfies the grammar."""
        return self.matcher.is_accepting()


_BITS = torch.arange(32, dtype=torch.int32)


def mask_rows_(logits: torch.Tensor, constraints: list) -> torch.Tensor:
    """Set the logits (B, V) of the tokens each row's constraint forbids to -inf, in place (rows
    whose constraint is None are left alone)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    n_vocab = next(c.n_vocab for c in constraints if c is not None)
    bitmask = torch.empty((len(rows), (n_vocab + 31) // 32), dtype=torch.int32)
    for j, i in enumerate(rows):
        constraints[i].fill_mask(bitmask[j])
    keep = ((bitmask.unsqueeze(-1) >> _BITS) & 1).reshape(len(rows), -1)[:, : logits.shape[-1]].bool()
    if len(rows) == len(logits):
        return logits.masked_fill_(~keep.to(logits.device), float("-inf"))
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~keep.to(logits.device), float("-inf"))
    return logits


def draws_first(params) -> bool:
    """Whether constrained rows may draw from their unmasked logits and check the token, computing
    the mask only when the grammar refuses it. Exact for greedy and for plain temperature
    sampling: a draw from p kept when allowed, else redrawn from p restricted to the allowed set,
    is a draw from p restricted to the allowed set. With top-k / top-p the cut would fall on the
    unmasked logits, so those rows mask first."""
    return params.temperature == 0 or (params.top_k is None and (params.top_p is None or params.top_p >= 1.0))


def draw_constrained(logits: torch.Tensor, constraints: list, params, draw) -> torch.Tensor:
    """One token per row (B,): a constrained row's token is allowed by its grammar and taken by it;
    `constraints[i]` None: a free row. `draw(logits, rows)` samples those rows (rows None: all)."""
    stops = params.stop_ids
    if not draws_first(params):
        tok = draw(mask_rows_(logits, constraints), None)
        for i, c in enumerate(constraints):
            if c is not None:
                c.take(int(tok[i]), stops)
        return tok
    tok = draw(logits, None)
    out = tok.tolist()
    refused = [i for i, c in enumerate(constraints) if c is not None and not c.try_take(out[i], stops)]
    if refused:
        mask_rows_(logits, [c if i in refused else None for i, c in enumerate(constraints)])
        idx = torch.tensor(refused, device=logits.device)
        tok[idx] = draw(logits[idx], idx)
        for i in refused:
            constraints[i].take(int(tok[i]), stops)
    return tok


def constraint_for(params, tok, n_vocab: int) -> Constraint:
    """A fresh Constraint for SamplingParams that ask for one (`params.constrained`)."""
    return Constraint(tok, compile_grammar(params.json_schema, params.regex, params.grammar), n_vocab)
