"""Which source sentence supports each span of a grounded answer.

Where it sits: after rag/answer.py. `ask` prints it under the answer, the server returns it as
`support` beside `sources`, and `eval rag` scores it (attribution accuracy: the sentence found
holds the gold answer).

Method: matching, not the model's internals. The answer (citations stripped) is cut into
sentences; each is scored against every sentence of every source shown to the model by the share
of its search terms (rag/text.py: words, Chinese characters and bigrams, stopwords dropped) that
the source sentence also holds, terms with a digit weighing 3 (a number is what a wrong answer
most often gets wrong); a span found verbatim (case and spacing aside) scores 1. Ties go to a
source the answer cites, then to the earlier source. A best score under MIN_SUPPORT leaves the
span unsupported: nothing shown says it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ownllm.data.grounded import is_refusal, parse_answer, sentences
from ownllm.rag.text import terms

MIN_SUPPORT = 0.5


@dataclass
class Support:
    span: str                   # a sentence of the answer
    source: int | None          # the supporting source's number as shown (1-based), None: unsupported
    sentence: str | None        # the supporting sentence of that source
    score: float                # weighted share of the span's terms the sentence holds

    def to_dict(self) -> dict:
        return asdict(self)


def _weights(text: str) -> dict[str, float]:
    return {t: 3.0 if any(c.isdigit() for c in t) else 1.0 for t in terms(text, query=True)}


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def attribute(reply: str, passages: list[str], min_support: float = MIN_SUPPORT) -> list[Support]:
    """A Support per sentence of `reply` (a model's grounded answer, citations allowed) over the
    `passages` shown to it, numbered from 1. A refusal has no spans."""
    answer, cited = parse_answer(reply)
    if not answer or is_refusal(answer) or is_refusal(reply):
        return []
    candidates = [(i, s, set(terms(s))) for i, p in enumerate(passages, 1) for s in sentences(p) if s.strip()]
    out = []
    for span in sentences(answer) or [answer]:
        w = _weights(span)
        total = sum(w.values())
        best = (-1.0, 0, 0, None, None)
        for i, s, held in candidates:
            score = 1.0 if _norm(span) in _norm(s) else (sum(v for t, v in w.items() if t in held) / total if total else 0.0)
            key = (score, i in cited, -i, i, s)
            if key[:3] > best[:3]:
                best = key
        score, _, _, i, s = best
        out.append(Support(span.strip(), i if score >= min_support else None,
                           s.strip() if score >= min_support and s else None, round(max(score, 0.0), 4)))
    return out
