"""Training speed of the `small` preset: tokens/s and achieved FLOP/s as a fraction of this
machine's matmul peak, measured in the same run.

    python bench/train_speed.py [--preset small] [--batch 8] [--seq-len 512] [--steps 6]

FLOPs per token = 6·(non-embedding params + lm_head) + 6·n_layers·dim·seq_len (causal attention,
forward + backward). Ends with `RESULT tokens_per_s=… frac_of_fp32_peak=… frac_of_bf16_peak=…`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from bench.common import matmul_peak, result_line, setup_threads  # noqa: E402
from ownllm.config import TrainConfig, model_config  # noqa: E402
from ownllm.model import GPT  # noqa: E402
from ownllm.train.objectives import lm_step  # noqa: E402
from ownllm.train.trainer import autocast, make_optimizer, measure_dtype  # noqa: E402


def train_flops_per_token(cfg, seq_len: int) -> float:
    dense = cfg.num_params(embeddings=False) + cfg.dim * cfg.vocab_size
    return 6 * dense + 6 * cfg.n_layers * cfg.dim * seq_len


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="eager (default: torch.compile each block, as training does)")
    args = ap.parse_args()
    threads = setup_threads()
    cfg = model_config(args.preset)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    if not args.no_compile:
        model.compile_blocks()  # compiled during the dtype measurement / first step, before timing
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    dtype = args.dtype
    if dtype == "auto":
        dtype, timings = measure_dtype(model, lm_step, (x, y), reps=2)
        print("dtype measured: " + ", ".join(f"{k} {v * 1000:.0f} ms/fwd+bwd" for k, v in timings.items()))

    def step():
        with autocast(dtype):
            loss, n = lm_step(model, (x, y))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq_len
    achieved = train_flops_per_token(cfg, args.seq_len) * tokens / dt
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"preset {args.preset}: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch}×{args.seq_len}, "
          f"{threads} threads, {dtype}, {'eager' if args.no_compile else 'compiled blocks'}")
    print(f"{'':24}{'value':>14}")
    print(f"{'step time (median)':24}{dt * 1000:>11.0f} ms")
    print(f"{'tokens/s':24}{tokens / dt:>14,.0f}")
    print(f"{'achieved GFLOP/s':24}{achieved / 1e9:>14.1f}")
    print(f"{'fp32 matmul peak GFLOP/s':24}{peak32 / 1e9:>14.1f}")
    print(f"{'bf16 matmul peak GFLOP/s':24}{peak16 / 1e9:>14.1f}")
    print(result_line(tokens_per_s=tokens / dt, achieved_gflops=achieved / 1e9, frac_of_fp32_peak=achieved / peak32,
                      frac_of_bf16_peak=achieved / peak16, dtype=dtype))


if __name__ == "__main__":
    main()
