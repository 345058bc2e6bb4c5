"""`ownllm quickstart`: every stage that exists, on bundled data, on a laptop CPU, then a report card.

Where it sits: the main job. For now the pipeline is tokenizer → pretrain (tiny preset) →
held-out bits per byte → a sample in each language; later stages (SFT, RLHF, RAG, agent, serving)
join here as they land. Writes `<out>/report.md` and PNG plots beside it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ownllm.config import TrainConfig
from ownllm.metrics import MetricsLog, plot_curves


def quickstart(out: str | Path = "runs/quickstart", time_budget: float = 180.0, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from ownllm.train.pretrain import pretrain
    from ownllm.inference.generate import generate_text

    data = "shakespeare,chinese-poetry"
    log(f"== 1/2 tokenizer + pretrain: tiny preset on {data}, {time_budget:.0f}s of training ==")
    tcfg = TrainConfig(data=data, vocab_size=4096, time_budget=time_budget, seed=1337)
    base = out / "base"
    result = pretrain(base, tcfg, preset="tiny", overwrite=True, log=log)
    log("== 2/2 evaluation and samples ==")
    rows = result["sources"]
    for r in rows:
        log(f"  {r['source']:<16} val_loss {r['val_loss']:.4f}  val_bpb {r['val_bpb']:.4f}")
    samples = {p: p + generate_text(base, p, max_new_tokens=100, temperature=0.8, seed=1)
               for p in ("ROMEO:\n", "春风")}
    for s in samples.values():
        log("--- sample ---\n" + s)
    plot_curves(MetricsLog.read(base / "metrics.jsonl"), out / "plots" / "pretrain_loss.png",
                title="pretraining loss (nats/token)")
    plot_curves(MetricsLog.read(base / "metrics.jsonl"), out / "plots" / "pretrain_bpb.png", keys=("val_bpb",),
                title="held-out bits per byte")
    report = _report(result, samples, time.perf_counter() - t0)
    (out / "report.md").write_text(report, encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"pretrain": rows}, indent=2))
    log(f"report card: {out / 'report.md'} (plots in {out / 'plots'})")
    mean = sum(r["val_bpb"] for r in rows) / len(rows)
    log(f"RESULT val_bpb={mean:.4f} " + " ".join(f"val_bpb_{r['source'].replace('-', '_')}={r['val_bpb']:.4f}" for r in rows))
    return {"pretrain": result}


def _report(result: dict, samples: dict, wall: float) -> str:
    lines = ["# ownllm quickstart report card", "",
             f"Whole pipeline in {wall:.0f}s wall time. Each stage's run directory holds its metrics and plots.", "",
             "## Pretraining (runs: `base/`)", "",
             f"{result['step']} steps in {result['elapsed_s']:.0f}s of training ({result['dtype']}).", "",
             "| held-out source | tokens | val loss (nats/token) | bits per byte |", "|---|---:|---:|---:|"]
    lines += [f"| {r['source']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |" for r in result["sources"]]
    lines += ["", "![pretraining loss](plots/pretrain_loss.png)", "", "![bits per byte](plots/pretrain_bpb.png)", "",
              "## Samples (temperature 0.8, seed 1)", ""]
    for s in samples.values():
        lines += ["```", s, "```", ""]
    return "\n".join(lines)
