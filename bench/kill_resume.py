"""kill -9 a training run at random moments, resume it each time, and compare the end with an
uninterrupted run of the same seed: every resume must load, the final weights be bit-identical.

    python bench/kill_resume.py [--kills 12] [--steps 600] [--max-delay 8] [--seed 0]

Each attempt is `ownllm pretrain … --set checkpoint_steps=3` in its own process, SIGKILLed after
a random delay (so kills land in steps, in evaluations, in checkpoint commits and in start-up);
the next attempt passes --resume when a checkpoint exists. Ends with
`RESULT kills=… resumes=… failed_resumes=… identical=… max_abs_diff=…`.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result_line  # noqa: E402

# compile off and float32: the run must be reproducible to the bit on one machine
TINY = ["--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
        "--set", "model.ffn_dim=64", "--set", "model.max_seq_len=64", "--set", "seq_len=32", "--set", "batch_size=4",
        "--set", "dtype=float32", "--set", "threads=1", "--set", "eval_interval=5", "--set", "eval_batches=2",
        "--vocab-size", "300", "--no-progress", "--no-compile"]


def pretrain_argv(data: Path, out: Path, steps: int, seed: int, every: int = 3) -> list[str]:
    return [sys.executable, "-m", "ownllm", "pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--seed", str(seed), "--set", f"checkpoint_steps={every}", *TINY]


def attempt(argv: list[str], resume: bool, kill_after: float | None, env=None) -> tuple[int, str]:
    """Run one attempt; SIGKILL it after `kill_after` seconds (None: let it finish). (returncode, stderr)."""
    p = subprocess.Popen(argv + (["--resume"] if resume else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        if kill_after is not None:
            try:
                p.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def compare(a: Path, b: Path) -> tuple[bool, float]:
    wa, wb = final_weights(a), final_weights(b)
    same = wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa) if wa.keys() == wb.keys() else float("inf")
    return same, diff


def killed_until_done(data: Path, out: Path, steps: int, seed: int, kills: int, rng: random.Random,
                      delays=(0.5, 6.0)) -> dict:
    """Kill attempts at random moments until `kills` kills landed, then let the last one finish."""
    from ownllm.checkpoint import saved_step

    argv = pretrain_argv(data, out, steps, seed)
    landed, resumes, failed, steps_seen = 0, 0, [], []
    while True:
        done = (out / "model.safetensors").exists() and saved_step(out) == steps
        if done:
            break
        resume = saved_step(out) is not None
        resumes += resume
        kill_after = rng.uniform(*delays) if landed < kills else None
        rc, err = attempt(argv, resume, kill_after)
        if rc == -signal.SIGKILL:
            landed += 1
            steps_seen.append(saved_step(out))
        elif rc != 0:
            failed.append(err.strip().splitlines()[-1] if err.strip() else f"exit {rc}")
            if len(failed) > 3:
                break
    return {"kills": landed, "resumes": resumes, "failed": failed, "checkpoints_seen": steps_seen}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--max-delay", type=float, default=8.0, help="seconds an attempt may live before its kill")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from ownllm.data.corpora import bundled_text

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "plays.txt"
        data.write_text(bundled_text("shakespeare")[:60_000], encoding="utf-8")
        t0 = time.perf_counter()
        rc, err = attempt(pretrain_argv(data, tmp / "whole", args.steps, args.seed), False, None)
        assert rc == 0, err
        once = time.perf_counter() - t0
        print(f"uninterrupted: {args.steps} steps in {once:.1f}s")
        res = killed_until_done(data, tmp / "killed", args.steps, args.seed, args.kills, random.Random(args.seed),
                                delays=(0.3, args.max_delay))
        same, diff = compare(tmp / "whole", tmp / "killed")
    print(f"killed {res['kills']} times (checkpoint step at each kill: {res['checkpoints_seen']}), "
          f"{res['resumes']} resumes, {len(res['failed'])} failed; final weights identical: {same} (max |diff| {diff:g})")
    for f in res["failed"]:
        print("  failed:", f)
    print(result_line(kills=res["kills"], resumes=res["resumes"], failed_resumes=len(res["failed"]), identical=int(same),
                      max_abs_diff=diff))


if __name__ == "__main__":
    main()
