"""Decode speed with vs without a JSON-schema constraint, side by side.

    python bench/structured_speed.py [--tokens 48] [--reps 3]

Two shapes: the `tiny` preset with its own 4k tokenizer, and Qwen2.5-0.5B's shape (random weights)
with a synthetic 151,936-token byte-level BPE vocabulary (what the per-step mask costs grows with
the vocabulary). Batch 1 and 8, greedy, eager Engine; each measurement interleaves the two modes
(A/B/A/B) and keeps the median (three times as many runs on `tiny`, whose runs take
milliseconds). The constrained rows decode under a schema whose strings are long enough that no
row finishes early, so both modes decode the same number of tokens. Ends with
`RESULT overhead_b1=… overhead_b8=… overhead_b1_150k=… overhead_b8_150k=…` (constrained time /
free time − 1).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result_line, setup_threads  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "minLength": 1000, "maxLength": 1200},
                                           "n": {"type": "integer"}}, "required": ["title", "n"]}


def synthetic_tokenizer(vocab: int, seed: int = 0):
    """A byte-level BPE of `vocab` tokens whose merges join random earlier tokens (with ownllm's
    special tokens): the size of a real large vocabulary, for the mask's cost."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from ownllm.tokenizer import SPECIAL_TOKENS, Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    r = random.Random(seed)
    tokens, merges, seen = list(alphabet), [], set(alphabet)
    while len(tokens) < vocab - len(SPECIAL_TOKENS):
        a, b = r.choice(tokens[: max(256, len(tokens) // 2)]), r.choice(alphabet)
        if a + b not in seen and len(a + b) <= 16:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append((a, b))
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(hf)


def timed(engine, prompts, params) -> float:
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert all(len(o) == params.max_new_tokens for o in outs), [len(o) for o in outs]
    return dt


def measure(model, tok, tokens: int, reps: int) -> dict:
    import torch

    from ownllm.inference import Engine, SamplingParams

    engine = Engine(model, tok.pad_id, tokenizer=tok)
    out = {}
    for batch in (1, 8):
        prompts = [tok.encode(f"Record {i}: ") for i in range(batch)]
        free = SamplingParams(max_new_tokens=tokens, temperature=0, stop_ids=())
        bound = SamplingParams(max_new_tokens=tokens, temperature=0, stop_ids=(), json_schema=SCHEMA)
        with torch.inference_mode():
            timed(engine, prompts, SamplingParams(max_new_tokens=4, temperature=0))   # warm-up
            timed(engine, prompts, SamplingParams(max_new_tokens=4, temperature=0, json_schema=SCHEMA))
            a, b = [], []
            for _ in range(reps):
                a.append(timed(engine, prompts, free))
                b.append(timed(engine, prompts, bound))
        ta, tb = statistics.median(a), statistics.median(b)
        out[batch] = (ta, tb)
        print(f"  batch {batch}: free {batch * tokens / ta:7.1f} tok/s, constrained {batch * tokens / tb:7.1f} tok/s, "
              f"overhead {tb / ta - 1:+.1%}")
    return out


def main() -> None:
    import torch

    from ownllm.config import ModelConfig, model_config
    from ownllm.data.corpora import bundled_text
    from ownllm.model import GPT
    from ownllm.tokenizer import train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    setup_threads()
    torch.manual_seed(0)
    results = {}
    print("tiny preset, 4,096-token tokenizer")
    tok = train_tokenizer([bundled_text("shakespeare")[:400_000]], 4096)
    model = GPT(model_config("tiny", {"vocab_size": tok.vocab_size})).eval()
    res = measure(model, tok, args.tokens, 3 * args.reps)   # milliseconds a run: more of them, less noise
    results.update(overhead_b1=res[1][1] / res[1][0] - 1, overhead_b8=res[8][1] / res[8][0] - 1)
    print("Qwen2.5-0.5B shape, 151,936-token synthetic byte-level vocabulary (random weights)")
    tok = synthetic_tokenizer(151_936)
    cfg = ModelConfig(vocab_size=151_936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                      max_seq_len=512, tie_embeddings=True, attention_bias=True, rope_theta=1e6)
    model = GPT(cfg).eval()
    res = measure(model, tok, args.tokens, args.reps)
    results.update(overhead_b1_150k=res[1][1] / res[1][0] - 1, overhead_b8_150k=res[8][1] / res[8][0] - 1)
    print(result_line(**results))


if __name__ == "__main__":
    main()
