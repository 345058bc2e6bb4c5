"""Documents → text → overlapping chunks on paragraph and sentence boundaries.

Where it sits: `ownllm rag index PATH...` reads .txt/.md/.html/.pdf files (directories
recursively) through `read_document`, and `split_chunks` cuts the text into chunks that the
knowledge base (store.py) indexes. Each chunk keeps the line it starts on, so a search hit can
be shown as `path:line`.

Chunks end at a paragraph break where they can, else at a sentence end (English . ! ? and
Chinese 。！？；), else at max_chars; consecutive chunks of one paragraph share `overlap` chars of
whole sentences so a fact cut at a boundary is still found whole in one of them.
"""
from __future__ import annotations

import bisect
import html.parser
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ownllm.errors import OwnLLMError

SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])")


@dataclass(frozen=True)
class Chunk:
    text: str
    position: int   # index of the chunk within its document
    line: int       # 1-based line of the document where the chunk starts


def iter_files(paths: list[str | Path]) -> list[Path]:
    """Files to index under `paths`, sorted. Symlinks that resolve outside the given roots are refused."""
    roots = [Path(p) for p in paths]
    for r in roots:
        if not r.exists():
            raise OwnLLMError(f"{r}: no such file or directory")
    allowed = [r.resolve() if r.is_dir() else r.resolve().parent for r in roots]
    out: set[Path] = set()
    for root in roots:
        if root.is_file():
            out.add(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in filenames:
                p = Path(dirpath) / name
                if p.suffix.lower() not in SUFFIXES:
                    continue
                if p.is_symlink() and not any(p.resolve().is_relative_to(a) for a in allowed):
                    raise OwnLLMError(f"{p}: symlink leaves the indexed directories (-> {p.resolve()}); refused")
                out.add(p)
    return sorted(out)


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "pre", "blockquote", "title"}
    SKIP = {"script", "style", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(source: str) -> str:
    p = _HTMLText()
    p.feed(source)
    p.close()
    text = "".join(p.parts)
    return re.sub(r"\n[ \n]*\n", "\n\n", "\n".join(ln.strip() for ln in text.split("\n"))).strip()


def read_document(path: str | Path) -> str:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:  # pragma: no cover - pypdf is a declared dependency
            raise OwnLLMError(f"{path}: reading PDF needs the pypdf package") from None
        try:
            pages = [page.extract_text() or "" for page in PdfReader(str(path)).pages]
        except Exception as e:  # pypdf raises many types on damaged files
            raise OwnLLMError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
        return "\n\n".join(p.strip() for p in pages if p.strip())
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise OwnLLMError(f"{path}: looks binary (NUL bytes), expected text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise OwnLLMError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    text = text.replace("\r\n", "\n")
    return html_to_text(text) if suffix in (".html", ".htm") else text


def _sentences(text: str, start: int) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of text[start:], ends included."""
    spans, at = [], 0
    for m in SENTENCE_END.finditer(text):
        if m.start() > at:
            spans.append((start + at, start + m.start()))
        at = m.end()
    if at < len(text):
        spans.append((start + at, start + len(text)))
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of `text` (ends included), as chunking splits them."""
    return [text[a:b] for a, b in _sentences(text, 0)]


def _hard_split(a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    return [(s, min(s + max_chars, b)) for s in range(a, b, max_chars)]


def split_chunks(text: str, max_chars: int = 600, overlap: int = 120) -> list[Chunk]:
    if max_chars < 50 or not 0 <= overlap < max_chars // 2:
        raise OwnLLMError(f"chunking: need max_chars >= 50 and 0 <= overlap < max_chars/2 (got {max_chars}, {overlap})")
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    paragraphs: list[list[tuple[int, int]]] = []
    for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*$)", text, flags=re.S):
        sents = []
        for a, b in _sentences(m.group(0), m.start()):
            sents += _hard_split(a, b, max_chars) if b - a > max_chars else [(a, b)]
        paragraphs.append(sents)
    chunks: list[tuple[int, int]] = []
    cur: list[tuple[int, int]] = []
    for para in paragraphs:
        for s in para:
            if cur and s[1] - cur[0][0] > max_chars:
                chunks.append((cur[0][0], cur[-1][1]))
                keep = []  # carry whole trailing sentences up to `overlap` chars into the next chunk
                for t in reversed(cur):
                    if cur[-1][1] - t[0] > overlap or s[1] - t[0] > max_chars:
                        break
                    keep.insert(0, t)
                cur = keep
            cur.append(s)
        # a paragraph break is a natural end when the chunk is already half full
        if cur and cur[-1][1] - cur[0][0] >= max_chars // 2:
            chunks.append((cur[0][0], cur[-1][1]))
            cur = []
    if cur:
        chunks.append((cur[0][0], cur[-1][1]))
    return [Chunk(text[a:b], i, bisect.bisect_left(newlines, a) + 1) for i, (a, b) in enumerate(chunks)]
