"""`ownllm eval extract`: field-level exact match and schema validity on the held-out extraction set.

Where it sits: reads the bundled notes (data/extraction.py) with `ownllm extract`'s Extractor
(rag/extract.py), once with the output constrained to the schema and once without (the model's
first JSON object taken from whatever it writes), so the two figures show what the constraint adds.
A field counts as right when its value equals the gold one exactly (a year as a number, names and
cities as written). `json_parsed`: the model's replies that held a JSON object (every one, under
the constraint, unless cut by the token budget); `schema_valid`: records the schema as written
accepts — every required field found, which the constraint cannot promise, since a note may not
state a field and the model may say null.
"""
from __future__ import annotations

from pathlib import Path


MAX_REPLY_TOKENS = 300


def evaluate_extraction(run: str | Path, n: int = 50, seed: int = 0, both: bool = True) -> dict:
    """`n` held-out notes per language; with `both`, the unconstrained baseline too."""
    from ownllm.data.extraction import SCHEMA, notes
    from ownllm.inference.generate import load_run
    from ownllm.rag.extract import Extractor

    model, tok = load_run(run)
    held_out = notes(n, "test", seed)
    res: dict = {"n": len(held_out), "samples": []}
    for constrained in ((True, False) if both else (True,)):
        # room for the longest record the schema allows even spelled byte by byte (75 characters of
        # text, 3 bytes each): under the constraint every reply then completes and parses
        ex = Extractor(model, tok, SCHEMA, max_new_tokens=MAX_REPLY_TOKENS, constrained=constrained)
        right = fields = valid = 0
        per_lang: dict[str, list[int]] = {}
        for note in held_out:
            got = ex.extract_text(note.text, note.lang)
            hits = sum(got.record.get(k) == v for k, v in note.gold.items())
            right, fields, valid = right + hits, fields + len(note.gold), valid + got.valid
            lang = per_lang.setdefault(note.lang, [0, 0])
            lang[0], lang[1] = lang[0] + hits, lang[1] + len(note.gold)
            res["samples"].append({"constrained": constrained, "lang": note.lang, "text": note.text,
                                   "gold": note.gold, "record": got.record, "valid": got.valid, "fields_right": hits})
        key = "" if constrained else "unconstrained_"
        res[key + "field_exact_match"] = right / fields
        res[key + "schema_valid"] = valid / len(held_out)
        res[key + "json_parsed"] = ex.parsed / max(1, ex.replies)
        for lang, (h, t) in per_lang.items():
            res[f"{key}field_exact_match_{lang}"] = h / t
    return res


def print_extraction_report(res: dict, out=print) -> None:
    out(f"held-out notes: {res['n']} (English and Chinese), greedy")
    out(f"{'':16}{'field exact match':>20}{'schema valid':>14}{'JSON parsed':>13}")
    for key, label in (("", "constrained"), ("unconstrained_", "unconstrained")):
        if key + "field_exact_match" in res:
            out(f"{label:16}{res[key + 'field_exact_match']:>20.3f}{res[key + 'schema_valid']:>14.3f}"
                f"{res[key + 'json_parsed']:>13.3f}")
    keys = " ".join(f"{k}={v:.4f}" for k, v in res.items() if k not in ("samples", "n", "field_exact_match",
                                                                        "schema_valid"))
    out(f"RESULT field_exact_match={res['field_exact_match']:.4f} schema_valid={res['schema_valid']:.4f} {keys}")
