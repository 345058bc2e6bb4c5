"""What more SFT steps buy: held-out accuracy of one SFT run, measured at several steps.

    python bench/sft_curve.py --base runs/quickstart/base [--steps 3000] [--marks 1000,2000,3000]
                              [--out DIR [--overwrite]] [--agent] [--set KEY=VALUE ...]
    python bench/sft_curve.py --model-track --base runs/quickstart-smollm2/base --steps 200 --marks 50,100,200

One run of the default SFT recipe, its schedule set for `--steps`, stopped (checkpoint and resume,
as a kill would) at each mark and scored there: exact match per task family (50 held-out prompts
each), and with --agent the agent's accuracy with tools and RAG exact match/hallucination on the
demo knowledge base. Counts steps, not seconds, so the curve does not depend on how busy the
machine is; one line per mark (with the seconds trained so far), then `RESULT` for the last. The
quickstart runs 1,200 steps (config.QUICKSTART_STEPS); this shows what fewer or more would buy.
`--model-track`: the real-model quickstart's SFT instead (LoRA, its data, language and families,
config.MODEL_QUICKSTART) on an imported model.
The run goes to a temporary directory unless --out names one to keep.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import result_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a pretrained run (e.g. runs/quickstart/base)")
    ap.add_argument("--out", help="keep the SFT run here (default: a temporary directory)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--marks", default="1000,2000,3000")
    ap.add_argument("--agent", action="store_true", help="also score the agent and RAG at each mark")
    ap.add_argument("--model-track", action="store_true",
                    help="the real-model quickstart's LoRA SFT, language and task families")
    ap.add_argument("--lora-layers", type=int, help="with --model-track: adapters in the top N blocks only")
    ap.add_argument("--set", action="append", default=[], help="TrainConfig overrides KEY=VALUE")
    args = ap.parse_args()

    from ownllm.cli import _parse_sets
    from ownllm.config import MODEL_QUICKSTART, apply_overrides
    from ownllm.errors import OwnLLMError
    from ownllm.train.sft import sft_config

    marks = sorted(int(m) for m in args.marks.split(","))
    if not marks or marks[-1] > args.steps:
        sys.exit(f"--marks must be steps up to --steps {args.steps}")
    q = MODEL_QUICKSTART
    track = ({"lora": True, **q["sft"], "task_examples": max(q["sft"]["task_examples"], 16 * args.steps)}
             if args.model_track else {"task_examples": 60000})
    tcfg = apply_overrides(sft_config(time_budget=None, max_steps=args.steps, **track), _parse_sets(args.set),
                           source="--set")
    args.lora = ({"lora_rank": q["lora_rank"], "lora_alpha": q["lora_alpha"],
                  "lora_layers": q["lora_layers"] if args.lora_layers is None else args.lora_layers}
                 if args.model_track else {})
    args.tasks = ({"lang": q["lang"], "families": q["families"], "n_per_family": q["n_eval"] * 3} if args.model_track
                  else {"n_per_family": 50})
    kb = db = None
    if args.agent:
        from ownllm.agent.sql import ReadOnlyDB, demo_shop_path
        from ownllm.rag.demo import demo_kb_path
        from ownllm.rag.embed import find_embedder
        from ownllm.rag.store import KnowledgeBase
        emb = find_embedder()
        kb, db = KnowledgeBase(demo_kb_path(emb), embedder=emb), ReadOnlyDB(demo_shop_path())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            curve(args, tcfg, marks, args.out or str(Path(tmp) / "sft"), kb, db)
        except OwnLLMError as e:  # e.g. --out exists without --overwrite
            sys.exit(f"error: {e}")


def curve(args, tcfg, marks: list[int], out: str, kb, db) -> None:
    from ownllm.evaluation.tasks import evaluate_tasks
    from ownllm.train.sft import sft

    t0 = time.time()
    fields: dict = {}
    for i, mark in enumerate(marks):
        r = sft(args.base, out, tcfg, resume=i > 0, overwrite=i == 0 and args.overwrite, progress=False,
                stop_at_step=mark, log=lambda *a: None, **args.lora)
        res = evaluate_tasks(out, **args.tasks)
        fields = {"step": r["step"], "train_s": round(r["elapsed_s"]), "mean_exact_match": round(res["mean_exact_match"], 4),
                  **{k: round(v, 2) for k, v in res["per_family"].items()}}
        if args.agent:
            from ownllm.evaluation.agent import evaluate_agent
            from ownllm.evaluation.rag import evaluate_rag
            a = evaluate_agent(out, kb=kb, db=db, n_arith=20, n_sql=26, n_search=20)
            g = evaluate_rag(out, kb, n=60, log=lambda *a: None)["rag"]
            fields.update(arithmetic_with_tools=round(a["with_tools"]["arithmetic"], 3),
                          sql_accuracy=round(a["with_tools"]["sql"], 3),
                          rag_exact_match=round(g["exact_match"], 3), hallucination_rag=round(g["hallucination"], 3))
        print(" ".join(f"{k}={v}" for k, v in fields.items()), f"wall_s={time.time() - t0:.0f}", flush=True)
    print(result_line(**fields))


if __name__ == "__main__":
    main()
