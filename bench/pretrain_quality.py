"""Quality per minute: held-out bits per byte after a fixed training time on 2 cores.

    python bench/pretrain_quality.py [--data ../shared/data/tinyshakespeare.txt] [--time-budget 120]

Runs exactly what a user gets from `ownllm pretrain --data FILE --time-budget 120` (the default
recipe, no preset named): first 90% of the file's bytes train, last 10% validate. Ends with
`RESULT val_bpb=… steps=… tokens=… train_s=…`. For reference, nanoGPT's documented CPU recipe
(char-level) sits at about 2.72 bpb after a similar time.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import result_line  # noqa: E402
from ownllm.metrics import MetricsLog  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--time-budget", type=float, default=120)
    ap.add_argument("--set", action="append", default=[], help="extra --set overrides to try a recipe")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "ownllm", "pretrain", "--data", args.data, "--out", str(out),
               "--time-budget", str(args.time_budget), "--no-progress"] + [x for s in args.set for x in ("--set", s)]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        print("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("RESULT")))
        rows = [r for r in MetricsLog.read(out / "metrics.jsonl") if "train_loss" in r]
        import json

        bpb = json.loads((out / "eval.json").read_text())[0]["val_bpb"]
        print(result_line(val_bpb=bpb, steps=rows[-1]["step"], tokens=rows[-1]["tokens"], train_s=rows[-1]["elapsed_s"]))


if __name__ == "__main__":
    main()
