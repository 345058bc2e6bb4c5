"""RAG on documents nobody tuned it for: the Debian Reference in English, simplified and traditional Chinese.

    bash bench/debian_reference.sh                       # the manual, from Debian's packages
    python bench/rag_real_docs.py                        # how many answerable questions reach the model
    python bench/rag_real_docs.py --run runs/quickstart-smollm2/sft    # and what the model answers

The same manual in three scripts, each indexed as its own knowledge base (BM25), and the questions
of bench/data/debian_reference_questions.jsonl in each: answerable ones (the answer is a file or a
command, spelled the same in every translation) and ones the manual cannot answer. For each
script: the share of answerable questions that pass the relevance gate and reach the model, the
share whose shown sources hold the answer, the share of unanswerable ones refused before the
model; with `--run`, the share of answers that contain the reference and the refusals' language.
Across scripts too: the traditional questions over the simplified manual and the other way round
(a reader of one script with documents in the other).

Ends with `RESULT reach=… reach_en=… reach_zh=… reach_zh_hant=… holds=… refused_unanswerable=…
cross_reach=…` (and `contains_*`, `refusal_script_ok` with --run).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTIONS = ROOT / "bench" / "data" / "debian_reference_questions.jsonl"
LANGS = ("en", "zh", "zh-hant")


def default_docs() -> Path:
    from ownllm.files import home

    return home() / "debian-reference"


def measure(docs: Path, run: str | None = None, log=print) -> dict:
    from ownllm.data.grounded import REFUSAL, is_refusal, language, parse_answer
    from ownllm.rag.answer import ask, retrieve
    from ownllm.rag.store import KnowledgeBase

    qs = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = tok = None
    if run:
        from ownllm.inference.generate import load_run

        model, tok = load_run(run)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lang in LANGS:
            kb = KnowledgeBase(Path(tmp) / f"{lang}.sqlite", create=True)
            kb.index([docs / lang], log=lambda *a: None)
            mine = [q for q in qs if q["lang"] == lang]
            answerable = [q for q in mine if q["answer"]]
            reach = holds = refused = contains = script_ok = 0
            for q in mine:
                hits = retrieve(kb, q["question"])
                if q["answer"]:
                    reach += bool(hits)
                    holds += any(q["answer"] in h.text for h in hits)
                else:
                    refused += not hits
                if model is not None:
                    reply = ask(model, tok, kb, q["question"], max_new_tokens=32)
                    text = parse_answer(reply.text)[0]
                    if q["answer"]:
                        contains += q["answer"] in text
                    elif is_refusal(reply.text):
                        script_ok += reply.text == REFUSAL[language(q["question"])]
                    log(f"  [{lang}] {q['question']}\n      -> {reply.text!r}"
                        f"{'' if reply.retrieved else ' (refused before the model)'}")
            n, u = len(answerable), len(mine) - len(answerable)
            res[lang] = {"reach": reach / n, "holds": holds / n, "refused_unanswerable": refused / max(u, 1),
                         "n": n, "n_unanswerable": u}
            if model is not None:
                res[lang]["contains"] = contains / n
                res[lang]["refusal_script_ok"] = script_ok
            kb.close()
            log(f"{lang:8} answerable {n}: reach the model {reach}/{n}, sources hold the answer {holds}/{n}; "
                f"unanswerable {u}: refused before the model {refused}/{u}"
                + (f"; answers containing the reference {contains}/{n}" if model is not None else ""))
        reach = n = 0
        for q_lang, doc_lang in (("zh-hant", "zh"), ("zh", "zh-hant")):
            with KnowledgeBase(Path(tmp) / f"{doc_lang}.sqlite") as kb:
                answerable = [q for q in qs if q["lang"] == q_lang and q["answer"]]
                hits = sum(any(q["answer"] in h.text for h in retrieve(kb, q["question"])) for q in answerable)
                log(f"{q_lang} questions over the {doc_lang} manual: sources hold the answer {hits}/{len(answerable)}")
                reach, n = reach + hits, n + len(answerable)
        res["cross"] = {"reach": reach / n, "n": n}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, help="the manual as bench/debian_reference.sh lays it out "
                    "(default: ~/.cache/ownllm/debian-reference)")
    ap.add_argument("--run", help="also answer with this run's model")
    args = ap.parse_args()
    docs = args.docs or default_docs()
    if not (docs / "zh-hant").is_dir():
        print(f"{docs}: no manual here; fetch it with: bash bench/debian_reference.sh {docs}", file=sys.stderr)
        return 2
    res = measure(docs, args.run)
    cross = res.pop("cross")
    n = sum(r["n"] for r in res.values())
    keys = {"reach": sum(r["reach"] * r["n"] for r in res.values()) / n,
            **{f"reach_{k.replace('-', '_')}": r["reach"] for k, r in res.items()},
            "holds": sum(r["holds"] * r["n"] for r in res.values()) / n,
            "refused_unanswerable": sum(r["refused_unanswerable"] * r["n_unanswerable"] for r in res.values())
            / max(sum(r["n_unanswerable"] for r in res.values()), 1), "cross_reach": cross["reach"]}
    if args.run:
        keys.update({f"contains_{k.replace('-', '_')}": r["contains"] for k, r in res.items()})
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in keys.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
