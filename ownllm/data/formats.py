"""Chat datasets in the formats people have, read into one shape: a list of messages.

Where it sits: `ownllm sft --data …` (and later reward/DPO data) reads records through here.
Formats, auto-detected per file from its first record or named with `--format`:

    messages     {"messages": [{"role": "user", "content": "…"}, {"role": "assistant", …}]}  (OpenAI)
    sharegpt     {"conversations": [{"from": "human", "value": "…"}, {"from": "gpt", …}]}
    alpaca       {"instruction": "…", "input": "…", "output": "…"}
    completion   {"prompt": "…", "completion": "…"}

Files are JSONL (one record per line) or one JSON array of records (a `.json` file). A bad record
raises OwnLLMError naming file, line and field; with skip_bad it is counted instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ownllm.errors import OwnLLMError

FORMATS = ("messages", "sharegpt", "alpaca", "completion")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}


class BadRecord(ValueError):
    """A record that does not fit its format; the message names the field."""


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "completion"
    raise BadRecord(f"cannot tell the format from fields {sorted(rec)[:6]} (expected one of: "
                    "'messages', 'conversations', 'instruction'+'output', 'prompt'+'completion')")


def _text(rec: dict, key: str, where: str = "") -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise BadRecord(f"field '{where}{key}' must be a string, got {type(v).__name__}")
    return v


def _turns(rec: dict, list_key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """A list of turn objects (OpenAI `messages` or ShareGPT `conversations`) as our messages."""
    turns = rec.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field '{list_key}' must be a non-empty list")
    out = []
    for i, m in enumerate(turns):
        where = f"{list_key}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"field '{where}' must be an object")
        if not isinstance(m.get(role_key), str) or m[role_key] not in roles:
            raise BadRecord(f"field '{where}.{role_key}' must be one of {sorted(roles)}, got {m.get(role_key)!r}")
        calls = m.get("tool_calls")
        if calls is None:
            out.append({"role": roles[m[role_key]], "content": _text(m, text_key, f"{where}.")})
            continue
        if roles[m[role_key]] != "assistant" or not isinstance(calls, list):
            raise BadRecord(f"field '{where}.tool_calls' must be a list on an assistant turn")
        for j, c in enumerate(calls):
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                    not isinstance(f.get("arguments", "{}"), (str, dict)):
                raise BadRecord(f"field '{where}.tool_calls[{j}].function' must have a string 'name' and "
                                "'arguments' (a JSON string or object)")
        content = m.get(text_key)
        if content is not None and not isinstance(content, str):
            raise BadRecord(f"field '{where}.{text_key}' must be a string or null")
        out.append({"role": "assistant", "content": content or "", "tool_calls": calls})
    return out


def to_messages(rec: dict, fmt: str) -> list[dict]:
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    if fmt == "messages":
        out = _turns(rec, "messages", "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        out = _turns(rec, "conversations", "from", "value", SHAREGPT_ROLES)
        if isinstance(rec.get("system"), str) and rec["system"]:
            out.insert(0, {"role": "system", "content": rec["system"]})
    elif fmt == "alpaca":
        instruction, output = _text(rec, "instruction"), _text(rec, "output")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord("field 'input' must be a string")
        out = [{"role": "user", "content": instruction + ("\n\n" + extra if extra else "")},
               {"role": "assistant", "content": output}]
    elif fmt == "completion":
        out = [{"role": "user", "content": _text(rec, "prompt")}, {"role": "assistant", "content": _text(rec, "completion")}]
    else:
        raise OwnLLMError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not any(m["role"] == "assistant" for m in out):
        raise BadRecord("no assistant message to learn from")
    return out


@dataclass
class ChatData:
    conversations: list[list[dict]]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skipped records' reasons


def jsonl_records(p: Path):
    """(line number, text of one record) for each record of a JSONL file — one JSON value per line —
    or of a JSON file holding one array of records (as ShareGPT and Alpaca sets are often shared).
    A UTF-8 BOM is dropped; lines end at '\\n' only, since U+2028 and friends may sit inside a JSON
    string. Not UTF-8, or a broken array, is an OwnLLMError; invalid JSON on a line raises
    BadRecord from `parse_line` (the caller adds file and line)."""
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OwnLLMError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith("["):
        yield from _array_records(p, text)
        return
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield lineno, line


def _array_records(p: Path, text: str):
    """Each element of a top-level JSON array, with the line it starts on."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)

    def skip(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i
    i = skip(i)
    if i < n and text[i] == "]":
        return
    while True:
        lineno = text.count("\n", 0, i) + 1
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise OwnLLMError(f"{p}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise OwnLLMError(f"{p}:{lineno}: invalid JSON ({_short(e)})") from None
        yield lineno, text[i:end]
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]" and not text[i + 1:].strip():
            return
        raise OwnLLMError(f"{p}:{text.count(chr(10), 0, i) + 1}: expected ',' or the array's closing ']' "
                          "(a .json file holds one array of records)")


def _short(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]


def parse_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting past the recursion limit
        raise BadRecord(f"invalid JSON ({_short(e)})") from None


def read_chat_jsonl(path: str | Path, fmt: str | None = None, skip_bad: bool = False) -> ChatData:
    p = Path(path)
    if not p.is_file():
        raise OwnLLMError(f"{p}: no such file")
    if fmt is not None and fmt not in FORMATS:
        raise OwnLLMError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    data = ChatData([])
    for lineno, line in jsonl_records(p):
        try:
            rec = parse_line(line)
            if fmt is None and isinstance(rec, dict):
                fmt = detect_format(rec)
            data.conversations.append(to_messages(rec, fmt or "messages"))
        except BadRecord as e:
            if not skip_bad:
                raise OwnLLMError(f"{p}:{lineno}: {e} (use --skip-bad to skip such records)") from None
            data.skipped += 1
            if len(data.errors) < 5:
                data.errors.append(f"{p}:{lineno}: {e}")
    if not data.conversations:
        raise OwnLLMError(f"{p}: no usable records")
    return data
