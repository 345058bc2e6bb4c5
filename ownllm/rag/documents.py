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
import time
from dataclasses import dataclass
from pathlib import Path

from ownllm.data.grounded import sentence_spans
from ownllm.errors import OwnLLMError

SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}
# What one document may cost: bytes on disk, characters of text, PDF pages, seconds of reading.
MAX_FILE_BYTES = 100 * 10**6
MAX_TEXT_CHARS = 5_000_000
MAX_PDF_PAGES = 2_000
MAX_SECONDS = 60


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


class UnclosedHTML(ValueError):
    def __init__(self, line: int, what: str):
        super().__init__(f"{what} opened here is never closed, so the text after it would be lost")
        self.line = line


class _HTMLText(html.parser.HTMLParser):
    """Visible text of a page: no script/style/template, nothing inside an element marked
    `hidden`, `aria-hidden="true"` or styled `display:none` / `visibility:hidden`."""
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "pre", "blockquote", "title"}
    SKIP = {"script", "style", "noscript", "template"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    HIDDEN_STYLE = re.compile(r"(display\s*:\s*none|visibility\s*:\s*hidden)", re.I)

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.open: list[tuple[str, bool, int]] = []   # (tag, hides its text, line) of open elements
        self.hiding = 0

    def _hides(self, tag, attrs) -> bool:
        a = {k.lower(): (v or "") for k, v in attrs}
        return (tag in self.SKIP or "hidden" in a or a.get("aria-hidden", "").lower() == "true"
                or bool(self.HIDDEN_STYLE.search(a.get("style", ""))))

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append("\n\n")
        if tag in self.VOID:
            return
        hides = self._hides(tag, attrs)
        self.open.append((tag, hides, self.getpos()[0]))
        self.hiding += hides

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.BLOCK:
            self.parts.append("\n\n")
        if any(t == tag for t, _, _ in self.open):   # close it and whatever was left open inside it
            while self.open:
                t, hides, _ = self.open.pop()
                self.hiding -= hides
                if t == tag:
                    break

    def handle_data(self, data):
        # the parser hands an unclosed comment back as text; an escaped one (&lt;!-- x --&gt;) is text
        if data.startswith("<!--") and "-->" not in data:
            raise UnclosedHTML(self.getpos()[0], "<!-- (a comment)")
        if not self.hiding:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(source: str) -> str:
    p = _HTMLText()
    p.feed(source)
    p.close()
    if p.rawdata.strip():   # an unclosed <script>, <style>, ... holds the rest of the file
        tag, line = next(((t, ln) for t, _, ln in reversed(p.open) if t in p.SKIP), ("a tag", 0))
        raise UnclosedHTML(line or source[: len(source) - len(p.rawdata)].count("\n") + 1, f"<{tag}>")
    text = "".join(p.parts)
    return re.sub(r"\n[ \n]*\n", "\n\n", "\n".join(ln.strip() for ln in text.split("\n"))).strip()


def read_document(path: str | Path) -> str:
    """The text of one file, bounded: at most MAX_FILE_BYTES read, MAX_TEXT_CHARS of text (a
    small compressed PDF can expand to megabytes), MAX_PDF_PAGES pages and MAX_SECONDS spent."""
    path = Path(path)
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise OwnLLMError(f"{path}: {size / 1e6:.0f} MB is over the {MAX_FILE_BYTES // 10**6} MB a document may have; "
                          "split it first")
    if suffix == ".pdf":
        return _read_pdf(path)
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise OwnLLMError(f"{path}: looks binary (NUL bytes), expected text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise OwnLLMError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    text = text.replace("\r\n", "\n")
    if suffix in (".html", ".htm"):
        try:
            return _bounded(path, html_to_text(text))
        except UnclosedHTML as e:
            raise OwnLLMError(f"{path}:{e.line}: {e}") from None
    return _bounded(path, text)


def _bounded(path: Path, text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise OwnLLMError(f"{path}: over {MAX_TEXT_CHARS:,} characters of text; split it first")
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - pypdf is a declared dependency
        raise OwnLLMError(f"{path}: reading PDF needs the pypdf package") from None
    deadline = time.monotonic() + MAX_SECONDS
    pages, total = [], 0
    try:
        reader = PdfReader(str(path))
        if len(reader.pages) > MAX_PDF_PAGES:
            raise OwnLLMError(f"{path}: {len(reader.pages)} pages, over the {MAX_PDF_PAGES} a document may have")
        for i, page in enumerate(reader.pages, 1):
            text = (page.extract_text() or "").strip()
            total += len(text)
            if total > MAX_TEXT_CHARS:
                raise OwnLLMError(f"{path}: page {i}: over {MAX_TEXT_CHARS:,} characters of text "
                                  f"from a {path.stat().st_size:,}-byte file; refused")
            if time.monotonic() > deadline:
                raise OwnLLMError(f"{path}: page {i}: reading took over {MAX_SECONDS} s; refused")
            if text:
                pages.append(text)
    except OwnLLMError:
        raise
    except Exception as e:  # pypdf raises many types on damaged files
        raise OwnLLMError(f"{path}: not a readable PDF ({type(e).__name__}: {str(e)[:160]})") from None
    return "\n\n".join(pages)


def _hard_split(a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    return [(s, min(s + max_chars, b)) for s in range(a, b, max_chars)]


def split_chunks(text: str, max_chars: int = 600, overlap: int = 120) -> list[Chunk]:
    if max_chars < 50 or not 0 <= overlap < max_chars // 2:
        raise OwnLLMError(f"chunking: need max_chars >= 50 and 0 <= overlap < max_chars/2 (got {max_chars}, {overlap})")
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    paragraphs: list[list[tuple[int, int]]] = []
    for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*$)", text, flags=re.S):
        sents = []
        for a, b in sentence_spans(m.group(0), m.start()):
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
