"""`ownllm extract`: documents → one JSON record each, under the user's JSON Schema, with the
source span of every field.

Where it sits: beside `ask` (answer.py), reading documents as `rag index` does (documents.py) and
generating with the output constrained to the schema (inference/structured.py), so every record
parses. A document longer than the model's context is cut into chunks; each chunk gives a partial
record in which a field the text does not state is null, and the partial records merge by one rule:
- a scalar or object field takes its first non-null value, in document order;
- an array field takes the distinct items of every chunk, in document order.
A field's source span is where its value stands in the document (start/end characters and line;
verbatim, else ignoring case; within the passage for a retrieved one); null where the model did
not copy it from the text. The merged record is checked against the
schema as the user wrote it (`valid`; a required field nobody found leaves it false).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from ownllm.data.extraction import INSTRUCTION, field_list
from ownllm.errors import OwnLLMError

@dataclass
class Extracted:
    source: str                     # the document (path), or path:line of a retrieved passage
    record: dict
    valid: bool                     # the merged record satisfies the user's schema
    spans: dict = field(default_factory=dict)   # field -> {"start", "end", "line"} or None
    chunks: int = 1

    def to_json(self) -> dict:
        return {"source": self.source, "record": self.record, "valid": self.valid, "spans": self.spans,
                "chunks": self.chunks}


def nullable_schema(schema: dict) -> dict:
    """The schema a chunk is read under: an object with every top-level property present and
    allowed to be null, so a chunk that lacks a field says so instead of inventing it."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) \
            or not schema["properties"]:
        raise OwnLLMError("extraction needs a schema of {\"type\": \"object\", \"properties\": {...}}")
    out = copy.deepcopy(schema)
    out["properties"] = {k: {"anyOf": [v, {"type": "null"}]} for k, v in schema["properties"].items()}
    out["required"] = list(schema["properties"])
    out["additionalProperties"] = False
    return out


def merge(partials: list[dict], schema: dict) -> dict:
    """Partial records (document order) → one: first non-null scalar/object, distinct array items."""
    out = {}
    for key, spec in schema["properties"].items():
        is_array = isinstance(spec, dict) and spec.get("type") == "array"
        values = [p.get(key) for p in partials if p.get(key) is not None]
        if is_array:
            items = []
            for v in values:
                for item in v if isinstance(v, list) else [v]:
                    if item not in items:
                        items.append(item)
            out[key] = items if values else None
        else:
            out[key] = values[0] if values else None
    return out


def find_spans(record: dict, text: str) -> dict:
    """Where each field's value stands verbatim in `text`: {"start", "end", "line"}, or None."""
    spans = {}
    for key, value in record.items():
        needles = [value] if not isinstance(value, list) else value
        found = None
        for v in needles:
            if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                continue
            s = str(v)
            i = text.find(s) if s else -1
            if i < 0 and s:   # copied with other capitals ("Chief engineer" for "chief engineer")
                i = text.lower().find(s.lower())
            if i >= 0:
                found = {"start": i, "end": i + len(s), "line": text.count("\n", 0, i) + 1}
                break
        spans[key] = found
    return spans


def satisfies(record: dict, schema: dict, tok, grammar_cache: dict) -> bool:
    """The record, written as the constrained decoder writes JSON, is accepted by the user's
    schema's own grammar (the same grammar engine checks it: no second validator to disagree)."""
    from ownllm.inference.structured import JSON_OPTIONS, Constraint, compile_grammar

    clean = {k: v for k, v in record.items() if v is not None}
    text = json.dumps(clean, ensure_ascii=False, separators=(JSON_OPTIONS["item_separator"],
                                                             JSON_OPTIONS["key_separator"]))
    if "g" not in grammar_cache:
        grammar_cache["g"] = compile_grammar(schema)
    c = Constraint(tok, grammar_cache["g"], tok.vocab_size)
    ids = tok.encode_text(text)
    return c.matcher.try_consume_tokens(ids) == len(ids) and c.complete


class Extractor:
    """Extract records with a run's model; `schema` is the user's JSON Schema (an object)."""

    def __init__(self, model, tok, schema: dict, max_new_tokens: int = 256, template_kwargs: dict | None = None,
                 constrained: bool = True):
        """constrained=False: the model writes freely and its first JSON object is taken (the
        baseline `eval extract` compares the constraint with)."""
        from ownllm.inference import Engine
        from ownllm.inference.structured import compile_grammar

        self.model, self.tok, self.schema = model, tok, schema
        self.chunk_schema = nullable_schema(schema)
        compile_grammar(self.chunk_schema)   # an unsupported feature fails here, before any document is read
        self.engine = Engine(model, tok.pad_id, tokenizer=tok)
        self.max_new_tokens = max_new_tokens
        self.template_kwargs = template_kwargs or {}
        self._grammar: dict = {}
        self.constrained = constrained
        self.replies = self.parsed = 0   # chunks read, and how many replies held a JSON object
        self.fields = field_list(schema)

    def _prompt(self, text: str) -> list[int]:
        msg = INSTRUCTION.format(fields=self.fields, text=text)
        return self.tok.user_turn(msg, self.template_kwargs)

    def chunk_chars(self) -> int:
        """How much text fits one prompt beside the instruction, the schema and the reply."""
        room = self.model.config.max_seq_len - len(self._prompt("")) - self.max_new_tokens
        if room < 32:
            raise OwnLLMError(f"the schema and the reply ({self.max_new_tokens} tokens) leave no room for text in this "
                              f"model's context of {self.model.config.max_seq_len} tokens")
        return max(50, int(room * 2.5))   # ~2.5 characters a token; a chunk that is still too long is cut below

    def partial(self, text: str) -> dict:
        """One chunk's record under the nullable schema."""
        from ownllm.inference import SamplingParams

        ids = self._prompt(text)
        budget = self.model.config.max_seq_len - self.max_new_tokens
        if len(ids) > budget:   # the character estimate ran long: keep the instruction, cut the text
            ids = self._prompt(text[: max(1, len(text) * budget // len(ids) - 20)])[:budget]
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0, stop_ids=self.tok.stop_ids,
                                json_schema=self.chunk_schema if self.constrained else None)
        out = self.engine.generate([ids], params)[0]
        rec = first_json_object(self.tok.decode([t for t in out if t not in self.tok.stop_ids]))
        self.replies, self.parsed = self.replies + 1, self.parsed + (rec is not None)
        return {k: rec.get(k) for k in self.schema["properties"]} if rec is not None else {}

    def extract_text(self, text: str, source: str) -> Extracted:
        from ownllm.rag.documents import split_chunks

        size = self.chunk_chars()
        chunks = split_chunks(text, max_chars=size, overlap=min(size // 4, 200)) if len(text) > size else None
        pieces = [c.text for c in chunks] if chunks else [text]
        record = merge([self.partial(p) for p in pieces], self.schema)
        return Extracted(source, record, satisfies(record, self.schema, self.tok, self._grammar),
                         find_spans(record, text), len(pieces))

    def extract_file(self, path: Path) -> Extracted:
        from ownllm.rag.documents import read_document

        return self.extract_text(read_document(path), str(path))


def first_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (a constrained reply is one; a free one may wrap it in words),
    or None (cut by max_new_tokens, or none written)."""
    decoder = json.JSONDecoder()
    at = text.find("{")
    while at >= 0:
        try:
            obj, _ = decoder.raw_decode(text, at)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
        at = text.find("{", at + 1)
    return None


def read_schema_file(path: str | Path) -> dict:
    from ownllm.inference.structured import load_schema

    return load_schema(path, "--schema", check=nullable_schema)
