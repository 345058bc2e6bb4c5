"""`ownllm ask`: retrieve, decide whether the sources are relevant, answer from them with citations.

Where it sits: the user-facing RAG step, shared by the CLI, the evaluation (evaluation/rag.py),
the agent's search tool and the server. Retrieval finds the top chunks; when even the best one
covers too little of the question (`min_relevance`, the IDF-weighted share of the question's
terms it contains) the answer is the refusal without asking the model at all. Otherwise the
chunks that fit the model's context become numbered sources (grounded.sources_prompt), the
model answers, and the citations it gives are mapped back to `path:line`. `verify` adds a
citation check: an answer that no shown source contains is withheld (the refusal instead), and
one that a source other than the cited one contains is re-cited to it (grounded.checked).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ownllm.config import MIN_RELEVANCE, RELATIVE_RELEVANCE
from ownllm.data.grounded import REFUSAL, checked, language, parse_answer, sources_prompt
from ownllm.rag.store import Hit, KnowledgeBase



@dataclass
class GroundedAnswer:
    question: str
    text: str = ""                              # the model's reply (or the refusal)
    hits: list[Hit] = field(default_factory=list)  # the sources shown to the model, in order
    retrieved: bool = True                      # False: nothing relevant, the model was not asked
    withheld: str | None = None                 # verify: the reply that failed the citation check
    recited: str | None = None                  # verify: the reply whose citation was corrected

    @property
    def answer(self) -> str:
        return parse_answer(self.text)[0]

    @property
    def cited(self) -> list[Hit]:
        return [self.hits[i - 1] for i in parse_answer(self.text)[1] if 0 < i <= len(self.hits)]


def retrieve(kb: KnowledgeBase, question: str, k: int = 3, min_relevance: float = MIN_RELEVANCE,
             mode: str | None = None, relative_relevance: float = RELATIVE_RELEVANCE) -> list[Hit]:
    """The top-k chunks, or none when even the best covers less than `min_relevance` of the question;
    of those, the ones that cover at least `relative_relevance` of what the best covers (0: all k)."""
    hits = kb.search(question, k=k, mode=mode)
    best = max((h.relevance for h in hits), default=0.0)
    return [h for h in hits if h.relevance >= relative_relevance * best] if best >= min_relevance else []


def prompt_ids(tok, question: str, hits: list[Hit], budget: int) -> tuple[list[int], list[Hit]]:
    """Chat prompt ids with as many of `hits` (best first) as fit `budget` tokens, and the hits as
    shown: numbered in reverse rank, so the best source is the last, next to the question. A small
    model copies most readily from the nearest source; with the best first, most wrong answers
    were the last source's value for the asked attribute (cited [3])."""
    kept = list(hits)
    while True:
        shown = kept[::-1]
        content = sources_prompt(question, [h.text for h in shown])
        ids = tok.user_turn(content)
        if len(ids) <= budget or len(kept) <= 1:
            return ids[-budget:], shown
        kept.pop()


def ask_stream(model, tok, kb: KnowledgeBase, question: str, k: int = 3, min_relevance: float = MIN_RELEVANCE,
               max_new_tokens: int = 48, temperature: float = 0.0, mode: str | None = None,
               engine=None, verify: bool = False,
               relative_relevance: float = RELATIVE_RELEVANCE) -> Iterator[str | GroundedAnswer]:
    """Yields text pieces as they stream, then the finished GroundedAnswer. With `verify` the
    reply comes whole, after the citation check (grounded.checked): an answer no shown source
    contains is withheld and the refusal given instead; one cited to the wrong source is re-cited."""
    from ownllm.inference.engine import Engine, SamplingParams
    from ownllm.inference.generate import stream_text

    result = GroundedAnswer(question)
    hits = retrieve(kb, question, k, min_relevance, mode, relative_relevance)
    if not hits:
        result.retrieved = False
        result.text = REFUSAL[language(question)]
        yield result.text
        yield result
        return
    ids, result.hits = prompt_ids(tok, question, hits, model.config.max_seq_len - max_new_tokens)
    pieces = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids)
    for piece in stream_text(engine or Engine(model, tok.pad_id), tok, ids, params):
        pieces.append(piece)
        if not verify:
            yield piece
    result.text = "".join(pieces).strip()
    if verify:
        passed = checked(result.text, [h.text for h in result.hits])
        if passed is None:
            result.withheld, result.text = result.text, REFUSAL[language(question)]
        elif passed != result.text:
            result.recited, result.text = result.text, passed
        yield result.text
    yield result


def ask(model, tok, kb: KnowledgeBase, question: str, **kw) -> GroundedAnswer:
    *_, result = ask_stream(model, tok, kb, question, **kw)
    return result
