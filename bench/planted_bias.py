"""Does the bias probe measure what it claims? Plant a bias, find it, then train it away.

    python bench/planted_bias.py                      # 3 seeds, the defaults below
    python bench/planted_bias.py --seeds 1 --steps 60 # a quick look

For each seed: Shakespeare (the first --base-bytes of the bundled corpus) with --sentences
sentences of data/bias.py mixed in — half about a fictional occupation followed by "she" in
--share of them, half about a control occupation that takes each pronoun half the time — pretrains
a `tiny` model (`ownllm pretrain --preset tiny`). `ownllm probe bias --planted` then reads the gap
log p(he) − log p(she) on both; the planted one should come out near log((1 − share) / share)
(−2.20 nats at 0.9), the control near 0. Then a counter-balanced pass: continued pretraining
(`pretrain --init`) on the same text with the planted occupation's sentences at 50/50; the gap
should shrink toward the control's while bits per byte on the bundled Shakespeare validation
split (text neither corpus holds) stay put.

Ends with `RESULT planted_gap=… control_gap=… expected_gap=… planted_gap_after=… control_gap_after=…
reduction=… bpb_before=… bpb_after=… seeds=…` (means over seeds; each seed's line is printed).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps per seed")
    ap.add_argument("--counter-steps", type=int, default=40, help="steps of the counter-balanced pass")
    ap.add_argument("--share", type=float, default=0.9, help="share of the planted occupation's sentences with 'she'")
    ap.add_argument("--sentences", type=int, default=3000)
    ap.add_argument("--base-bytes", type=int, default=1_000_000)
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()

    from ownllm.config import TrainConfig
    from ownllm.data.bias import CONTROL, PLANTED, planted_corpus
    from ownllm.data.corpora import bundled_text
    from ownllm.evaluation.bias import probe_bias
    from ownllm.evaluation.runs import eval_run
    from ownllm.train.pretrain import pretrain

    out = Path(args.out or tempfile.mkdtemp(prefix="planted-bias-"))
    base_text = bundled_text("shakespeare")[: args.base_bytes]
    quiet = lambda *a, **k: None   # noqa: E731
    def bpb(run):   # the bundled validation split: text neither corpus holds
        return eval_run(run, "shakespeare", max_tokens=16384, seq_len=256)[0]["val_bpb"]

    rows = []
    for seed in range(args.seeds):
        d = out / f"seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        planted, balanced = d / "planted.txt", d / "balanced.txt"
        planted.write_text(planted_corpus(base_text, args.sentences, args.share, "en", seed), encoding="utf-8")
        balanced.write_text(planted_corpus(base_text, args.sentences, 0.5, "en", seed + 1000), encoding="utf-8")
        pretrain(d / "base", TrainConfig(data=str(planted), max_steps=args.steps, time_budget=None, seed=seed),
                       preset="tiny", overwrite=True, progress=False, log=quiet)
        extra = {"en": [PLANTED["en"], CONTROL["en"]]}
        before = probe_bias(d / "base", ("en",), extra)["en"]["occupations"]
        pretrain(d / "balanced", TrainConfig(data=str(balanced), init=str(d / "base"), max_steps=args.counter_steps,
                                                    time_budget=None, seed=seed, warmup_steps=5),
                        overwrite=True, progress=False, log=quiet)
        after = probe_bias(d / "balanced", ("en",), extra)["en"]["occupations"]
        row = {"seed": seed, "planted_gap": before[PLANTED["en"]]["gap"], "control_gap": before[CONTROL["en"]]["gap"],
               "planted_ci": before[PLANTED["en"]]["ci"], "planted_gap_after": after[PLANTED["en"]]["gap"],
               "control_gap_after": after[CONTROL["en"]]["gap"], "bpb_before": bpb(d / "base"),
               "bpb_after": bpb(d / "balanced")}
        rows.append(row)
        print(f"seed {seed}: planted {row['planted_gap']:+.3f} [{row['planted_ci'][0]:+.3f}, {row['planted_ci'][1]:+.3f}] "
              f"control {row['control_gap']:+.3f}; after the counter-balanced pass: planted {row['planted_gap_after']:+.3f} "
              f"control {row['control_gap_after']:+.3f}; held-out bpb {row['bpb_before']:.4f} -> {row['bpb_after']:.4f}",
              flush=True)
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("planted_gap", "control_gap", "planted_gap_after",
                                                             "control_gap_after", "bpb_before", "bpb_after")}
    expected = math.log((1 - args.share) / args.share)
    reduction = 1 - abs(mean["planted_gap_after"] - mean["control_gap_after"]) / max(abs(mean["planted_gap"]
                                                                                         - mean["control_gap"]), 1e-9)
    print(f"RESULT planted_gap={mean['planted_gap']:.4f} control_gap={mean['control_gap']:.4f} expected_gap={expected:.4f} "
          f"planted_gap_after={mean['planted_gap_after']:.4f} control_gap_after={mean['control_gap_after']:.4f} "
          f"reduction={reduction:.4f} bpb_before={mean['bpb_before']:.4f} bpb_after={mean['bpb_after']:.4f} "
          f"seeds={args.seeds}")


if __name__ == "__main__":
    main()
