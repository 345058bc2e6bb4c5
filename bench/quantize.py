"""Weight-only int8 vs fp32 on one run, side by side: memory of the linear weights, decode speed,
held-out bits per byte.

    python bench/quantize.py [--run runs/quickstart/base]

Without --run, a tiny model is pretrained for --train-seconds on Shakespeare first (so the bpb
comparison is on a model that has learned something). Run alone: the machine has 2 cores.
Ends with `RESULT memory_ratio=… speed_ratio=… bpb_delta=…` (speed_ratio = int8 tok/s ÷ fp32).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line, run_or_pretrain, setup_threads  # noqa: E402


def decode_speed(model, pad_id: int, prompt: list[int], n: int, reps: int = 3) -> float:
    from ownllm.inference.engine import Engine, SamplingParams

    eng = Engine(model, pad_id)
    params = SamplingParams(max_new_tokens=n, temperature=0)
    eng.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        out = eng.generate([prompt], params)[0]
        best = max(best, len(out) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--train-seconds", type=float, default=120)
    ap.add_argument("--tokens", type=int, default=128, help="decode length for the speed test")
    ap.add_argument("--max-eval-tokens", type=int, default=60_000)
    args = ap.parse_args()
    setup_threads()
    with run_or_pretrain(args.run, args.train_seconds) as run:
        report(run, args)


def report(run: Path, args) -> None:
    from ownllm.checkpoint import load_model
    from ownllm.data.shards import Shards
    from ownllm.train.heldout import evaluate_sources
    from ownllm.inference.quantize import linear_weight_bytes, model_bytes, quantize_int8
    from ownllm.tokenizer import Tokenizer

    fp32 = load_model(run).float().eval()
    tok = Tokenizer.load(run)
    int8 = copy.deepcopy(fp32)
    n_q = quantize_int8(int8)
    mem32, mem8 = linear_weight_bytes(fp32), linear_weight_bytes(int8)
    prompt = tok.encode("ROMEO:\nWhat light through yonder window breaks?\n")
    s32 = decode_speed(fp32, tok.pad_id, prompt, args.tokens)
    s8 = decode_speed(int8, tok.pad_id, prompt, args.tokens)
    shards = Shards.open(run / "data")
    seq = min(fp32.config.max_seq_len, 256)
    with torch.inference_mode():
        b32 = evaluate_sources(fp32, shards, seq, args.max_eval_tokens)
        b8 = evaluate_sources(int8, shards, seq, args.max_eval_tokens)
    mean = lambda rows: sum(r["val_bpb"] for r in rows) / len(rows)  # noqa: E731
    print(f"run {run}: {n_q} linear layers quantised, the output head included (a tied head as its own int8 "
          "copy); the embedding lookup stays fp32")
    print(f"{'':<14}{'fp32':>12}{'int8':>12}")
    print(f"{'linear MB':<14}{mem32 / 2**20:>12.2f}{mem8 / 2**20:>12.2f}   (the blocks' linear layers)")
    print(f"{'model MB':<14}{model_bytes(fp32) / 2**20:>12.2f}{model_bytes(int8) / 2**20:>12.2f}   (everything)")
    print(f"{'decode tok/s':<14}{s32:>12.1f}{s8:>12.1f}")
    print(f"{'val bpb':<14}{mean(b32):>12.4f}{mean(b8):>12.4f}")
    print(result_line(memory_ratio=mem32 / mem8, speed_ratio=s8 / s32, bpb_delta=mean(b8) - mean(b32)))


if __name__ == "__main__":
    main()
