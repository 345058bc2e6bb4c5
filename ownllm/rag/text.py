"""Search terms for English and Chinese alike: the analyzer behind BM25 and relevance.

Where it sits: store.py indexes `terms(chunk)` in an SQLite FTS5 column and queries with
`terms(question)`. English (and any Latin/digit text) becomes lowercased words; Chinese has no
spaces, so each run of CJK characters becomes its single characters plus adjacent bigrams
(北京大学 → 北 京 大 学 北京 京大 大学), the usual trick that lets BM25 match Chinese words
without a segmenter; traditional characters are folded to simplified ones first, so a question in
one script finds documents in the other. Stopwords are dropped from queries only.
"""
from __future__ import annotations

import re

from ownllm.data.grounded import to_simplified

_TOKEN = re.compile(r"[0-9a-z]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+", re.I)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

STOPWORDS = set("""a an and are as at be by can did do does for from had has have he her his how in is it its
of on or she that the their them they this to was were what when where which who whom whose why will
with you your tell me please about know""".split())
_ZH_STOP = set("的了是在和吗呢吧么哪里儿谁几多少请问")   # simplified: terms() folds traditional text first
STOPWORDS |= _ZH_STOP


def terms(text: str, query: bool = False) -> list[str]:
    out = []
    for tok in _TOKEN.findall(to_simplified(text)):
        if _CJK.match(tok):
            # in a query, stopword characters split the run: 镇长是谁 → 镇长 (no 长是, 是谁)
            runs = re.split("[" + "".join(sorted(_ZH_STOP)) + "]+", tok) if query else [tok]
            for run in runs:
                out += list(run) + [run[i: i + 2] for i in range(len(run) - 1)]
        else:
            w = tok.lower()
            if not (query and w in STOPWORDS):
                out.append(w)
    return out


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression: any of the query terms (quoted, so no operator injection)."""
    ts = list(dict.fromkeys(terms(text, query=True)))
    return " OR ".join(f'"{t}"' for t in ts) if ts else None
