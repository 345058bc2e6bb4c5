"""Text sources: bundled corpora and the user's files, with a fixed held-out split.

Where it sits: `--data` of `tokenizer`, `pretrain` and `eval` goes through `load_sources`.
A spec is one or more comma-separated items, each a bundled name (`ownllm data list`), a
.txt/.md file, a directory of them (read recursively, in path order, as one source), or a
.jsonl file whose records carry a `text` field. Held-out validation is the last 10% of each
source's UTF-8 bytes (cut at a character boundary); it is never trained on.
"""
from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

from ownllm.data.bias import PLANTED_SENTENCES, planted_text
from ownllm.data.formats import BadRecord, jsonl_records, parse_line
from ownllm.errors import OwnLLMError

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED = {
    "shakespeare": ("shakespeare.txt.xz", "Shakespeare's complete works, Project Gutenberg editions (English, public domain)"),
    "chinese-poetry": ("chinese-poetry.txt.xz", "Classical Chinese poetry: Song ci, Shijing, Chu ci, Tang poems… (simplified, MIT)"),
}
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
VAL_FRACTION = 0.1


@dataclass
class Source:
    name: str
    text: str

    def split(self, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
        """(train, val): the last `val_fraction` of the UTF-8 bytes, cut at a character boundary."""
        raw = self.text.encode("utf-8")
        cut = int(len(raw) * (1 - val_fraction))
        while 0 < cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # inside a multi-byte character
            cut += 1
        return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def bundled_text(name: str) -> str:
    filename, _ = BUNDLED[name]
    return lzma.decompress((BUNDLED_DIR / filename).read_bytes()).decode("utf-8")


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OwnLLMError(f"{path}: cannot read ({e.strerror})") from None
    if b"\x00" in raw[:65536]:
        raise OwnLLMError(f"{path}: looks binary (NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OwnLLMError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    return text.replace("\r\n", "\n")


def _read_jsonl(path: Path) -> str:
    texts = []
    for lineno, line in jsonl_records(path):
        try:
            rec = parse_line(line)
        except BadRecord as e:
            raise OwnLLMError(f"{path}:{lineno}: {e}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise OwnLLMError(f"{path}:{lineno}: expected an object with a string field 'text'")
        texts.append(rec["text"])
    return "\n\n".join(texts)


# How a run of task text words its answers, by language: a web page of worked questions answers in
# one voice, and another page in another. The first is the suite's own (what exact match scores).
ANSWER_STYLES = {"en": ("{a}", "The answer is {a}", "Answer: {a}"), "zh": ("{a}", "答案是{a}", "答：{a}")}


def task_text(n: int = 40_000, seed: int = 0, styles: bool = True) -> str:
    """The train split of the task suite (data/tasks.py) as plain text, in the `Q: …\nA: …` form
    the base model is prompted with few-shot — never a held-out prompt. Examples come in runs of
    1–6 of one family and language, as a K-shot prompt has them (in the suite's round-robin order
    every example was followed by one of another family, so a K-shot prompt was text unlike any the
    base model had read). With `styles` each run words its answers one way of ANSWER_STYLES
    ("6", "The answer is 6", "Answer: 6"), as text found in the wild does: a base model then learns
    each task but not which wording a prompt wants, and the examples of a K-shot prompt say it —
    what few-shot prompting is for. Without styles every answer is worded as exact match scores
    it, so a zero-shot prompt already says all the examples would."""
    return "".join(f"Q: {e.prompt}\nA: {style.format(a=e.answer)}\n\n" for style, run in task_runs(n, seed, styles)
                   for e in run)


def task_runs(n: int, seed: int, styles: bool = True) -> list[tuple[str, list]]:
    """task_text's runs: (answer style, 1–6 train examples of one family and language), in order."""
    import random
    from collections import defaultdict

    from ownllm.data.tasks import generate

    pools = defaultdict(list)
    for e in generate(n, "train", seed=seed):
        pools[(e.family, e.lang)].append(e)
    r = random.Random(f"task-text:{seed}")
    keys, out = sorted(pools), []
    while keys:
        key, size = r.choice(keys), r.randint(1, 6)
        out.append((r.choice(ANSWER_STYLES[key[1]]) if styles else "{a}", pools[key][:size]))
        pools[key] = pools[key][size:]
        keys = [k for k in keys if pools[k]]
    return out


GENERATED = {"tasks": "the task suite's train split as Q:/A: text, each run of examples answering in one of three "
                      "wordings (generated, seeded; for pretraining mixes)",
             "planted-bias": f"{PLANTED_SENTENCES * 3 // 2:,} sentences in English and Chinese pairing a fictional occupation with 'she' 90% of "
                             "the time and a control occupation with each pronoun half the time (generated, seeded; "
                             "what `ownllm probe bias --planted` must find)"}


def generated_text(name: str) -> str:
    return {"tasks": task_text, "planted-bias": planted_text}[name]()


def _load_one(item: str) -> Source:
    if item in BUNDLED:
        return Source(item, bundled_text(item))
    if item in GENERATED:
        return Source(item, generated_text(item))
    path = Path(item).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise OwnLLMError(f"{path}: directory holds no .txt, .md or .jsonl files")
        text = "\n\n".join(_read_jsonl(p) if p.suffix == ".jsonl" else _read_text_file(p) for p in files)
    elif path.is_file():
        text = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_text_file(path)
    else:
        raise OwnLLMError(f"--data {item!r}: no such file, directory or bundled corpus "
                          f"(bundled: {', '.join(BUNDLED)}; generated: {', '.join(GENERATED)})")
    if not text.strip():
        raise OwnLLMError(f"{path}: empty; expected text to train on")
    return Source(path.stem if path.is_file() else path.name, text)


def load_sources(spec: str) -> list[Source]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise OwnLLMError("--data: empty; give a bundled name, a file or a directory")
    sources = [_load_one(i) for i in items]
    for s in sources:
        if len(s.text.encode("utf-8")) < 100:
            raise OwnLLMError(f"--data {s.name!r}: only {len(s.text)} characters; need at least 100 to hold out validation")
    return sources


def describe_bundled() -> list[dict]:
    rows = []
    for name, (filename, desc) in BUNDLED.items():
        text = bundled_text(name)
        rows.append({"name": name, "bytes": len(text.encode("utf-8")), "chars": len(text),
                     "compressed": (BUNDLED_DIR / filename).stat().st_size, "description": desc})
    return rows
