"""Grammar libraries side by side: the per-token cost of a JSON-schema mask with a ~150k vocabulary.

    python bench/grammar_libs.py [--vocab 151936] [--docs 20]

The structured-output constraint needs a library that turns a JSON Schema into a token mask per
step. This measures the candidates on the same byte-level vocabulary (151,936 tokens, the size of
Qwen2.5's; built as bench/structured_speed.py builds it), the same schemas and the same token
sequences: each library computes the mask and takes the next token of valid JSON documents, one
token at a time, as a decode loop does. Figures: schema compile time (the first request's wait),
mean and p99 microseconds per token (mask + advance), on one thread. llguidance is ownllm's
runtime dependency; xgrammar and outlines-core are measured when installed (opt-in:
`pip install --no-deps xgrammar apache-tvm-ffi outlines-core`) and printed as skipped otherwise.
Ends with `RESULT llguidance_us=… xgrammar_us=… outlines_core_us=…` (mean per token).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import result_line  # noqa: E402
from bench.structured_speed import synthetic_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "tags", "note"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "city": {"enum": ["Paris", "Tokyo", "Lima", "Nairobi"]},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                         "note": {"type": "string"}}}
WORDS = "the quick brown fox jumps over a lazy dog while seven old wizards quietly pack boxes".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """Valid, compact documents under SCHEMA (the spelling every library here generates)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        doc = {"name": " ".join(r.sample(WORDS, 3))[:40], "age": r.randrange(151),
               "city": r.choice(SCHEMA["properties"]["city"]["enum"]),
               "tags": [r.choice(WORDS) for _ in range(r.randrange(6))],
               "note": " ".join(r.choice(WORDS) for _ in range(r.randrange(5, 40)))}
        out.append(json.dumps(doc))
    return out


def run(name: str, make, docs: list[list[int]]) -> tuple[float, list[float]]:
    """(compile seconds, per-token microseconds) for `make()` -> (step(token), fresh()) factories."""
    t0 = time.perf_counter()
    fresh = make()
    compile_s = time.perf_counter() - t0
    per_token = []
    for ids in docs:
        step = fresh()
        for t in ids:
            t1 = time.perf_counter()
            step(t)
            per_token.append((time.perf_counter() - t1) * 1e6)
    return compile_s, per_token


def llguidance_factory(tok, vocab: int):
    import llguidance
    import torch

    from ownllm.inference.structured import compile_grammar, ll_tokenizer

    def make():
        lt = ll_tokenizer(tok, vocab)
        proto = llguidance.LLMatcher(lt, compile_grammar(SCHEMA), log_level=0)
        bitmask = torch.full(((vocab + 31) // 32,), -1, dtype=torch.int32)

        def fresh():
            m = proto.deep_copy()

            def step(t):
                m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
                assert bitmask[t // 32] >> (t % 32) & 1, "llguidance refused a valid token"
                assert m.consume_token(t)
            return step
        fresh()(docs_probe[0])
        return fresh
    return make


def xgrammar_factory(tok, vocab: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    def make():
        hf = PreTrainedTokenizerFast(tokenizer_object=tok.hf)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=list(tok.stop_ids))
        compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        def fresh():
            m = xgr.GrammarMatcher(compiled)

            def step(t):
                m.fill_next_token_bitmask(bitmask)
                assert bitmask[0, t // 32] >> (t % 32) & 1, "xgrammar refused a valid token"
                assert m.accept_token(t)
            return step
        fresh()(docs_probe[0])
        return fresh
    return make


def outlines_factory(tok, vocab: int):
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def make():
        stop = set(tok.stop_ids)
        table: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i not in stop and tok.hf.id_to_token(i) not in tok.special:
                table.setdefault(tok.decode([i]).encode("utf-8", "surrogatepass"), []).append(i)
        regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")   # admits the ", " / ": " spelling
        index = Index(regex, Vocabulary(tok.stop_ids[0], table))
        bitmask = torch.full(((vocab + 31) // 32,), -1, dtype=torch.int32)

        def fresh():
            g = Guide(index)

            def step(t):
                g.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
                assert bitmask[t // 32] >> (t % 32) & 1, "outlines-core refused a valid token"
                g.advance(t)
            return step
        fresh()(docs_probe[0])
        return fresh
    return make


docs_probe: list[int] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--docs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)   # the mask runs on the decode thread
    tok = synthetic_tokenizer(args.vocab)
    texts = documents(args.docs)
    docs = [tok.encode(t) for t in texts]
    docs_probe.extend(docs[0])
    print(f"{args.vocab:,}-token byte-level vocabulary; {len(docs)} documents, {sum(map(len, docs)):,} tokens")
    results = {}
    for name, factory in (("llguidance", llguidance_factory), ("xgrammar", xgrammar_factory),
                          ("outlines_core", outlines_factory)):
        try:
            make = factory(tok, args.vocab)
            compile_s, us = run(name, make, docs)
        except ImportError as e:
            print(f"  {name:14s} skipped: {e}")
            results[f"{name}_us"] = "skipped"
            continue
        us.sort()
        mean, p99 = statistics.fmean(us), us[int(0.99 * (len(us) - 1))]
        print(f"  {name:14s} compile {compile_s:6.2f} s   per token: mean {mean:8.1f} µs, p99 {p99:8.1f} µs")
        results[f"{name}_us"] = round(mean, 1)
        results[f"{name}_compile_s"] = round(compile_s, 2)
    print(result_line(**results))


if __name__ == "__main__":
    main()
