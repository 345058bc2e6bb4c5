"""`--kb demo`: the demo world's encyclopedia (data/world.py) as a knowledge base, built on first
use under $OWNLLM_HOME (default ~/.cache/ownllm) and rebuilt when the generator changes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ownllm.data.world import make_world
from ownllm.files import home


def demo_kb_path(embedder=None, log=print) -> Path:
    """The demo knowledge base, built on first use: its articles as .md files, indexed."""
    from ownllm.rag.store import SCHEMA_VERSION, KnowledgeBase

    root = home() / "demo-kb"
    docs = root / "docs"
    documents = make_world("demo").documents()
    # named by a digest of the articles: a KB built from an older version of the generator is
    # never used for this one (its questions would ask about sentences it does not hold)
    digest = hashlib.sha256("\0".join([SCHEMA_VERSION] + [f"{rel}\0{text}" for rel, text in documents]).encode()).hexdigest()[:12]
    kind = "kb-dense" if embedder is not None else "kb-bm25"
    kb_path = root / f"{kind}-{digest}.sqlite"
    if kb_path.is_file():
        return kb_path
    for stale in [*root.glob(f"{kind}-*.sqlite"), root / ("kb-dense.sqlite" if embedder is not None else "kb.sqlite")]:
        stale.unlink(missing_ok=True)
    for rel, text in documents:
        p = docs / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
    tmp = kb_path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with KnowledgeBase(tmp, embedder=embedder, create=True) as kb:
        rep = kb.index([docs])
    os.replace(tmp, kb_path)
    log(f"built the demo knowledge base {kb_path}: {rep}")
    return kb_path


def resolve_kb(kb: str, embedder=None, log=print) -> Path:
    """`--kb` value → file path ('demo' builds the bundled demo knowledge base)."""
    return demo_kb_path(embedder, log) if kb == "demo" else Path(kb)


def open_kb(kb: str, embedder: str | None = None, create: bool = False):
    """A KnowledgeBase for `--kb` ('demo' = the bundled demo, built on first use)."""
    from ownllm.rag.embed import find_embedder
    from ownllm.rag.store import KnowledgeBase

    emb = find_embedder(embedder)
    return KnowledgeBase(resolve_kb(kb, emb), embedder=emb, create=create)
