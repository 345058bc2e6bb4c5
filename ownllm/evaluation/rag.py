"""`ownllm eval rag`: retrieval quality, grounded vs closed-book answers, hallucination, citations.

Where it sits: scores a run and a knowledge base on the held-out questions of the demo world
(data/world.py), whose gold answers and gold source documents are known.

Definitions (all over the sampled questions):
- recall@5 / MRR: the gold document has a chunk among the top 5 / 1 ÷ rank of its first chunk,
  over questions about towns in the KB; for bm25, dense and hybrid where available.
- exact match: the answer (citations stripped) equals the gold answer, or the article's sentence
  that states it (the form the SFT suite teaches), over answerable questions.
- hallucination: an answer that asserts something the KB does not support — any non-refusal to
  a question the KB cannot answer, or a non-refusal that is not the gold answer — over all.
- citation accuracy: among non-refusal RAG answers that cite, the share whose first cited
  source contains the gold answer (answerable questions).
- attribution accuracy: among non-refusal RAG answers to answerable questions, the share where
  a source sentence found to support the answer (rag/attribute.py, by matching) holds the gold
  answer.
- unanswerable accuracy: the share of questions the KB cannot answer that get the refusal.
- verified: the same RAG replies after `ask --verify`'s citation check (grounded.checked:
  unsupported answers withheld, wrong citations corrected to the source that holds the answer),
  reported beside the model's own, never instead of them.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from ownllm.inference.generate import greedy_texts, load_run
from ownllm.config import MIN_RELEVANCE
from ownllm.rag.answer import prompt_ids, retrieve
from ownllm.rag.attribute import attribute
from ownllm.data.world import Question, make_world, slug
from ownllm.data.grounded import REFUSAL, checked, is_refusal, parse_answer
from ownllm.rag.store import KnowledgeBase


def sample_questions(n: int, seed: int = 0) -> list[Question]:
    """n questions of the demo world: ~70% answerable, the rest split between missing facts and
    unknown towns; both languages."""
    qs = make_world("demo").questions()
    by = defaultdict(list)
    for q in qs:
        by[q.kind].append(q)
    r = random.Random(seed)
    want = {"answerable": int(n * 0.7), "missing_fact": n - int(n * 0.7) - int(n * 0.15), "unknown_town": int(n * 0.15)}
    out = []
    for kind, m in want.items():
        out += r.sample(by[kind], min(m, len(by[kind])))
    r.shuffle(out)
    return out


def retrieval_metrics(kb: KnowledgeBase, questions: list[Question], mode: str, k: int = 5) -> dict:
    recall, rr, n = 0, 0.0, 0
    for q in questions:
        if q.kind == "unknown_town":
            continue
        n += 1
        hits = kb.search(q.question, k=k, mode=mode)
        ranks = [h.rank for h in hits if Path(h.path).stem == slug(q.town)]
        if ranks:
            recall += ranks[0] <= k
            rr += 1.0 / ranks[0]
    return {"recall_at_5": recall / max(n, 1), "mrr": rr / max(n, 1), "n": n}


def evaluate_rag(run: str | Path, kb: KnowledgeBase, n: int = 200, k: int = 3, min_relevance: float = MIN_RELEVANCE,
                 max_new_tokens: int = 32, seed: int = 0, mode: str = "bm25", log=print) -> dict:
    """Retrieval is measured for every mode available; answers use `mode` (what `ask` uses)."""
    model, tok = load_run(run)
    questions = sample_questions(n, seed)
    modes = ["bm25"] + (["dense", "hybrid"] if kb.embedder is not None and kb.has_vectors else [])
    retrieval = {m: retrieval_metrics(kb, questions, m) for m in modes}
    main_mode = mode

    budget = model.config.max_seq_len - max_new_tokens
    rag_text: list[str | None] = []
    rag_hits, prompts, slots = [], [], []
    for i, q in enumerate(questions):
        hits = retrieve(kb, q.question, k, min_relevance, main_mode)
        if not hits:
            rag_text.append(REFUSAL[q.lang])
            rag_hits.append([])
            continue
        ids, shown = prompt_ids(tok, q.question, hits, budget)
        rag_text.append(None)
        rag_hits.append(shown)
        prompts.append(ids)
        slots.append(i)
    for i, text in zip(slots, greedy_texts(model, tok, prompts, max_new_tokens)):
        rag_text[i] = text.strip()
    closed = [t.strip() for t in greedy_texts(model, tok, [tok.user_turn(q.question) for q in questions],
                                              max_new_tokens)]

    def score(texts: list[str], hits_list=None) -> dict:
        em = hall = unans_ok = cited = cite_ok = attributed = attrib_ok = 0
        n_ans = n_unans = 0
        for j, (q, t) in enumerate(zip(questions, texts)):
            ans, cites = parse_answer(t)
            refused = is_refusal(ans) or is_refusal(t)
            if q.answer is None:
                n_unans += 1
                unans_ok += refused
                hall += not refused
                continue
            n_ans += 1
            exact = ans in q.exact_answers
            em += exact
            hall += (not refused) and not exact
            if hits_list is not None and not refused and cites:
                shown = hits_list[j]
                cited += 1
                c = cites[0]
                cite_ok += 0 < c <= len(shown) and q.answer in shown[c - 1].text
            if hits_list is not None and not refused:   # the sentence found to support the answer holds it
                attributed += 1
                attrib_ok += any(sp.sentence and q.answer in sp.sentence
                                 for sp in attribute(t, [h.text for h in hits_list[j]]))
        return {"exact_match": em / max(n_ans, 1), "hallucination": hall / max(len(questions), 1),
                "unanswerable_accuracy": unans_ok / max(n_unans, 1),
                "citation_accuracy": cite_ok / max(cited, 1) if hits_list is not None else None, "cited": cited,
                "attribution_accuracy": attrib_ok / max(attributed, 1) if hits_list is not None else None,
                "attributed": attributed,
                "answerable": n_ans, "unanswerable": n_unans}

    rag = score(rag_text, rag_hits)
    # what `ask --verify` would say: answers no shown source contains become the refusal, wrong citations corrected
    passed = [checked(t, [h.text for h in hits]) for t, hits in zip(rag_text, rag_hits)]
    verified = score([REFUSAL[q.lang] if p is None else p for q, p in zip(questions, passed)], rag_hits)
    verified["recited"] = sum(p is not None and p != t for p, t in zip(passed, rag_text))
    cb = score(closed)
    samples = [{"question": q.question, "kind": q.kind, "gold": q.answer, "rag": t, "closed_book": c}
               for q, t, c in zip(questions, rag_text, closed)]
    return {"retrieval": retrieval, "mode": main_mode, "rag": rag, "rag_verified": verified, "closed_book": cb,
            "n": len(questions), "samples": samples}


def print_rag_report(res: dict, out=print) -> None:
    out(f"retrieval over {next(iter(res['retrieval'].values()))['n']} questions about towns in the KB")
    out(f"{'mode':<8}{'recall@5':>10}{'MRR':>8}")
    for m, r in res["retrieval"].items():
        out(f"{m:<8}{r['recall_at_5']:>10.3f}{r['mrr']:>8.3f}")
    rag, cb = res["rag"], res["closed_book"]
    out(f"answers: {res['n']} questions ({rag['answerable']} answerable, {rag['unanswerable']} not), greedy, "
        f"RAG retrieval: {res['mode']}")
    ver = res["rag_verified"]
    out(f"{'':<24}{'closed-book':>12}{'RAG':>8}{'RAG --verify':>14}")
    for key in ("exact_match", "hallucination", "unanswerable_accuracy"):
        out(f"{key:<24}{cb[key]:>12.3f}{rag[key]:>8.3f}{ver[key]:>14.3f}")
    cite = {k: f"{r['citation_accuracy']:.3f}" if r["cited"] else "-" for k, r in (("rag", rag), ("ver", ver))}
    out(f"{'citation_accuracy':<24}{'-':>12}{cite['rag']:>8}{cite['ver']:>14}   (answers that cite: "
        f"{rag['cited']}, {ver['cited']})")
    attrib = {k: f"{r['attribution_accuracy']:.3f}" if r["attributed"] else "-" for k, r in (("rag", rag), ("ver", ver))}
    out(f"{'attribution_accuracy':<24}{'-':>12}{attrib['rag']:>8}{attrib['ver']:>14}   (answers attributed: "
        f"{rag['attributed']}, {ver['attributed']}; the supporting source sentence holds the gold answer)")
    out(f"(RAG --verify: the same replies after the citation check of `ask --verify`, which withholds an "
        f"answer that no shown source contains and re-cites one cited to the wrong source: {ver['recited']} re-cited)")
    best = res["retrieval"][res["mode"]]
    out(f"RESULT recall_at_5={best['recall_at_5']:.4f} mrr={best['mrr']:.4f} rag_exact_match={rag['exact_match']:.4f} "
        f"closed_book_exact_match={cb['exact_match']:.4f} hallucination_rag={rag['hallucination']:.4f} "
        f"hallucination_closed_book={cb['hallucination']:.4f} citation_accuracy={rag['citation_accuracy']:.4f} "
        f"attribution_accuracy={rag['attribution_accuracy']:.4f} unanswerable_accuracy={rag['unanswerable_accuracy']:.4f} "
        f"rag_exact_match_verified={ver['exact_match']:.4f} hallucination_rag_verified={ver['hallucination']:.4f} "
        f"unanswerable_accuracy_verified={ver['unanswerable_accuracy']:.4f} "
        + " ".join(f"recall_at_5_{m}={r['recall_at_5']:.4f} mrr_{m}={r['mrr']:.4f}" for m, r in res["retrieval"].items()))
