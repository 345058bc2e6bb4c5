"""Per-process memory of DDP vs FSDP training, side by side: what sharding buys.

    python bench/fsdp_memory.py [--dim 1024] [--layers 8] [--steps 3] [--nproc 2]

Starts `torchrun --nproc_per_node N` twice on the CPU (Gloo) with the same model (random tokens,
AdamW, batch 2 × 128, fp32, eager) — once with `parallel=ddp` (a whole replica, its gradients and
AdamW moments in every process) and once with `parallel=fsdp` (1/N of each) — and reports each
rank's peak resident memory (ru_maxrss) and its growth over the process before the model was
built. Ends with `RESULT ddp_peak_mb=… fsdp_peak_mb=… fsdp_over_ddp=…` (rank 0's peaks; rank 0
also holds the whole copy that checkpoints are gathered into, so the other ranks save more).
Run it alone: two processes on two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(out: str, parallel: str, dim: int, layers: int, steps: int) -> None:
    """One rank: train `steps` steps, then gather every rank's (baseline, peak) RSS to rank 0."""
    import torch

    from ownllm.config import ModelConfig, TrainConfig
    from ownllm.model import GPT
    from ownllm.train import distributed as D
    from ownllm.train.objectives import lm_step
    from ownllm.train.trainer import Trainer

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = ModelConfig(vocab_size=4096, dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 64,
                      ffn_dim=dim * 8 // 3 // 64 * 64, max_seq_len=128)
    tcfg = TrainConfig(max_steps=steps, time_budget=None, compile=False, dtype="float32", parallel=parallel,
                       batch_size=2, seq_len=128, eval_interval=0, checkpoint_interval=1e9, log_interval=1, threads=1)

    def batch(gen):
        x = torch.randint(0, cfg.vocab_size, (2, 128), generator=gen)
        return x, torch.roll(x, -1, 1)

    try:
        Trainer(GPT(cfg), tcfg, out, batch, lm_step, progress=False).run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = D.gather_objects({"rank": D.current().rank, "baseline_mb": base, "peak_mb": peak})
        if D.current().is_main:
            (Path(out) / "memory.json").write_text(json.dumps({"params": cfg.num_params(), "ranks": rows}))
    finally:
        D.finish()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("OUT", "PARALLEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.dim, args.layers, args.steps)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for parallel in ("ddp", "fsdp"):
            out = Path(tmp) / parallel
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                   __file__, "--worker", str(out), parallel, "--dim", str(args.dim), "--layers", str(args.layers),
                   "--steps", str(args.steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{parallel} run failed:\n{proc.stderr[-3000:]}")
            report = json.loads((out / "memory.json").read_text())
            print(f"{parallel}: {report['params'] / 1e6:.1f}M parameters")
            for r in report["ranks"]:
                print(f"  rank {r['rank']}: peak {r['peak_mb']:7.0f} MB  (+{r['peak_mb'] - r['baseline_mb']:.0f} MB over "
                      f"the process before the model)")
            peaks[parallel] = report["ranks"]
    d0, f0 = peaks["ddp"][0]["peak_mb"], peaks["fsdp"][0]["peak_mb"]
    others = {f"fsdp_over_ddp_rank{r['rank']}": r["peak_mb"] / d["peak_mb"]
              for r, d in zip(peaks["fsdp"][1:], peaks["ddp"][1:])}
    from bench.common import result_line

    print(result_line(ddp_peak_mb=round(d0), fsdp_peak_mb=round(f0), fsdp_over_ddp=f0 / d0, **others))


if __name__ == "__main__":
    main()
