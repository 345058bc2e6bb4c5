"""`ownllm quickstart --model smollm2`: own a real model end to end, every stage measured before and after.

Where it sits: the real-model track, beside ownllm.quickstart (the from-scratch one). Pipeline:
import (the GGUF file installed from PyPI, or any source `ownllm import` reads) → the model as it
is: held-out task suite in its own chat template (0- and 4-shot, English; Chinese in simplified
and in traditional characters), Shakespeare
bits per byte, RAG closed-book vs grounded, the agent with and without tools → LoRA SFT on the
suite in the model's language → the same measures → preference pairs from its own samples ranked
by the rule that judges both tracks (data/judge.py) → a reward model (the model with a head) → DPO
(LoRA) and PPO against the reward model → each judged against SFT → export (Hugging Face and
GGUF) → one request through `ownllm serve`. Writes `<out>/report.md`, `report.json` and plots.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ownllm.config import MODEL_QUICKSTART, MODEL_QUICKSTART_STEPS
from ownllm.cost import Stages, cost_table, result_keys
from ownllm.evaluation.bias import bias_section, bias_summary
from ownllm.metrics import MetricsLog, plot_curves


def quickstart_model(model: str = "smollm2", out: str | Path = "runs/quickstart-smollm2", steps: dict | None = None,
                     n_eval: int | None = None, settings: dict | None = None, log=print) -> dict:
    """`model`: what `ownllm import` reads (`smollm2`: the GGUF file from PyPI). `steps`: steps per
    stage (MODEL_QUICKSTART_STEPS, any subset overridden); `n_eval`: held-out prompts per task family;
    `settings`: MODEL_QUICKSTART's keys overridden (sample sizes, stage settings)."""
    from ownllm.agent.sql import ReadOnlyDB, demo_shop_path
    from ownllm.config import DPO_DEFAULTS, PPO_DEFAULTS, REWARD_DEFAULTS, DPOConfig, PPOConfig, RewardConfig
    from ownllm.data.preferences import write_preferences
    from ownllm.evaluation.agent import evaluate_agent, print_agent_report
    from ownllm.evaluation.bias import probe_runs
    from ownllm.evaluation.prefs import evaluate_prefs, evaluate_reward, print_prefs_report, print_reward_report
    from ownllm.evaluation.rag import evaluate_rag, print_rag_report
    from ownllm.evaluation.runs import eval_run
    from ownllm.evaluation.tasks import evaluate_tasks, print_task_report
    from ownllm.interop.gguf import export_gguf
    from ownllm.interop.hf import export_hf
    from ownllm.interop.hub import import_model
    from ownllm.quickstart import _plot_tasks, limit
    from ownllm.rag.demo import demo_kb_path
    from ownllm.rag.embed import find_embedder
    from ownllm.rag.store import KnowledgeBase
    from ownllm.train.pairs import preference_pairs
    from ownllm.train.preference import stage_train_config, train_dpo, train_reward
    from ownllm.train.rl import train_ppo
    from ownllm.train.sft import sft, sft_config

    steps = {**MODEL_QUICKSTART_STEPS, **(steps or {})}
    q = {**MODEL_QUICKSTART, **(settings or {})}
    n_eval = n_eval or q["n_eval"]
    lang = q["lang"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = Stages()
    stages.start("import")
    log(f"== 1/7 import {model} ==")
    base = out / "base"
    imp = import_model(model, base, overwrite=True)
    log(f"{base}: {imp['parameters'] / 1e6:.1f}M parameters, {imp['layers']} layers, "
        f"{'its own chat template' if imp['chat_template'] else 'no chat template'}")
    stages.start("measure before")

    embedder = find_embedder()
    kb = KnowledgeBase(demo_kb_path(embedder, log=log), embedder=embedder)
    db = ReadOnlyDB(demo_shop_path())

    def measure(run: Path, label: str, shots: tuple[int, ...]) -> dict:
        m: dict = {"tasks": {}}
        for k in shots:
            m["tasks"][f"{lang}_{k}"] = evaluate_tasks(run, shots=k, n_per_family=n_eval, lang=lang,
                                                       families=q["families"])
            print_task_report(m["tasks"][f"{lang}_{k}"], out=log)
        for zh in ("zh", "zh-hant"):
            m["tasks"][f"{zh}_0"] = evaluate_tasks(run, n_per_family=max(2, n_eval // 2), lang=zh, families=q["families"])
            print_task_report(m["tasks"][f"{zh}_0"], out=log)
        m["bpb"] = eval_run(run, "shakespeare", max_tokens=q["bpb_tokens"], seq_len=q["bpb_window"])[0]["val_bpb"]
        log(f"Shakespeare validation (first {q['bpb_tokens']:,} tokens): {m['bpb']:.4f} bits per byte")
        m["rag"] = evaluate_rag(run, kb, n=q["n_rag"], log=log)
        print_rag_report(m["rag"], out=log)
        m["agent"] = evaluate_agent(run, kb=None, db=db, n_arith=q["n_agent"], n_sql=q["n_agent"], n_search=0)
        print_agent_report(m["agent"], out=log)
        return m

    log(f"== 2/7 the model as it is: {n_eval} held-out prompts per family, 0- and 4-shot, in {lang}; "
        "Shakespeare bits per byte; RAG; agent ==")
    before = measure(base, "base", (0, 4))
    stages.start("sft")

    log(f"== 3/7 LoRA SFT on the task suite in {lang}, {steps['sft_steps']} steps ==")
    sft_run = out / "sft"
    ft = sft(base, sft_run, sft_config(lora=True, **limit(steps["sft_steps"], None), **q["sft"]),
             lora_rank=q["lora_rank"], lora_alpha=q["lora_alpha"], lora_layers=q["lora_layers"], overwrite=True, log=log)
    stages.start("measure after")

    log("== 4/7 after SFT: the same measures ==")
    after = measure(sft_run, "sft", (0,))
    bias = probe_runs({"as imported": base, "LoRA SFT": sft_run}, log=log)
    stages.start("alignment")

    log(f"== 5/7 alignment: pairs from its own samples, reward model, DPO, PPO "
        f"({steps['reward_steps']}, {steps['dpo_steps']}, {steps['ppo_steps']} steps) ==")
    prefs = out / "prefs.jsonl"
    write_preferences(preference_pairs(q["n_prompts"], "train", run=sft_run, seed=0), prefs)
    train_reward(sft_run, out / "rm", stage_train_config(REWARD_DEFAULTS, data=str(prefs), **q["reward"],
                                                         **limit(steps["reward_steps"], None)),
                 RewardConfig(**q["pair_config"]), overwrite=True, log=log)
    reward = evaluate_reward(out / "rm", n=q["n_judge"])
    print_reward_report(reward, out=log)
    train_dpo(sft_run, out / "dpo", stage_train_config(DPO_DEFAULTS, data=str(prefs), **q["dpo"],
                                                      **limit(steps["dpo_steps"], None)),
              DPOConfig(**q["pair_config"]), lora_rank=q["lora_rank"], lora_alpha=q["lora_alpha"],
              lora_layers=q["lora_layers"], overwrite=True, log=log)
    train_ppo(sft_run, out / "ppo", str(out / "rm"), stage_train_config(PPO_DEFAULTS, **q["ppo"],
                                                                        **limit(steps["ppo_steps"], None)),
              PPOConfig(**q["ppo_config"]), overwrite=True, log=log)
    sft_accuracy = after["tasks"][f"{lang}_0"]["mean_exact_match"]
    aligned = {}
    for name in ("dpo", "ppo"):
        r = evaluate_prefs(out / name, sft_run, n=q["n_judge"], reward=out / "rm", n_task=n_eval,
                           against_task_accuracy=sft_accuracy, lang=lang, families=q["families"])
        print_prefs_report(r, name, "sft", out=log)
        aligned[name] = {k: v for k, v in r.items() if k != "samples"}
    stages.start("export")

    log("== 6/7 export: Hugging Face directory and GGUF ==")
    exported = {"hf": export_hf(sft_run, out / "hf", overwrite=True),
                "gguf": export_gguf(sft_run, out / "sft.gguf", dtype="q8_0", overwrite=True)}
    log(f"{exported['hf']['out']} ({exported['hf']['architecture']}, {exported['hf']['bytes'] / 1e6:.0f} MB); "
        f"{exported['gguf']['out']} ({exported['gguf']['dtype']}, {exported['gguf']['bytes'] / 1e6:.0f} MB)")
    stages.start("serve")

    log("== 7/7 served: one chat request through `ownllm serve` ==")
    served = serve_smoke(sft_run, "What is 48 + 27?")
    log(f"POST /v1/chat/completions -> {served['status']} in {served['seconds']:.2f}s: {served['content']!r}")
    stages.stop()
    kb.close(), db.close()

    plots = out / "plots"
    plot_curves(MetricsLog.read(sft_run / "metrics.jsonl"), plots / "sft_loss.png", title="LoRA SFT loss on answer tokens")
    _plot_tasks({"as imported 0-shot": before["tasks"][f"{lang}_0"], "as imported 4-shot": before["tasks"][f"{lang}_4"],
                 "LoRA SFT 0-shot": after["tasks"][f"{lang}_0"]}, plots / "task_accuracy.png")
    wall = time.perf_counter() - t0
    summary = {"model": model, "steps": steps, "n_eval": n_eval, "wall_s": wall, "cost": stages.costs,
               "before": _brief(before), "after": _brief(after), "sft": {k: ft[k] for k in ("step", "elapsed_s")},
               "reward": {k: reward[k] for k in ("pair_accuracy", "n_pairs", "by_rule", "by_kind")},
               "aligned": aligned, "exported": {k: str(v["out"]) for k, v in exported.items()}, "served": served,
               "bias": bias_summary(bias)}
    (out / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(_report(summary, lang), encoding="utf-8")
    log(f"report card: {out / 'report.md'} (plots in {plots})")
    b, a = summary["before"], summary["after"]
    log(f"RESULT {lang}_zero_shot={b['tasks'][f'{lang}_0']:.4f} {lang}_four_shot={b['tasks'][f'{lang}_4']:.4f} "
        f"sft_{lang}={a['tasks'][f'{lang}_0']:.4f} zh_before={b['tasks']['zh_0']:.4f} zh_after={a['tasks']['zh_0']:.4f} "
        f"zh_hant_before={b['tasks']['zh-hant_0']:.4f} zh_hant_after={a['tasks']['zh-hant_0']:.4f} "
        f"bpb_before={b['bpb']:.4f} bpb_after={a['bpb']:.4f} "
        f"rag_before={b['rag']:.4f} rag_after={a['rag']:.4f} closed_book_after={a['closed_book']:.4f} "
        f"hallucination_rag={a['hallucination_rag']:.4f} hallucination_closed_book={a['hallucination_closed_book']:.4f} "
        f"arithmetic_tools_before={b['arithmetic_with_tools']:.4f} arithmetic_tools_after={a['arithmetic_with_tools']:.4f} "
        f"arithmetic_without_tools={a['arithmetic_without_tools']:.4f} sql_after={a['sql']:.4f} "
        f"pair_accuracy={reward['pair_accuracy']:.4f} "
        + " ".join(f"{n}_win_rate={r['win_rate']:.4f} {n}_decided_win_rate={r['decisive_win_rate']:.4f} "
                   f"{n}_decided_share={(r['wins'] + r['losses']) / r['n']:.4f} {n}_task_accuracy={r['task_accuracy']:.4f} "
                   f"{n}_kl={r['kl']:.4f}" for n, r in aligned.items())
        + f" served={int(served['status'] == 200)} {result_keys(stages.costs)} wall_s={wall:.0f}")
    return summary


def serve_smoke(run: Path, question: str) -> dict:
    """One chat request through the server `ownllm serve` builds, on a loopback port."""
    import argparse
    import urllib.request

    from ownllm.serve.app import build_state, serving

    state = build_state(argparse.Namespace(run=str(run), api_key=None, slots=2))
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 24,
                       "temperature": 0}).encode()
    with serving(state) as url:
        t = time.perf_counter()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            status, reply = r.status, json.loads(r.read())
    return {"status": status, "seconds": time.perf_counter() - t,
            "content": reply["choices"][0]["message"]["content"], "usage": reply.get("usage")}


def _brief(m: dict) -> dict:
    rag, agent = m["rag"], m["agent"]
    return {"tasks": {k: v["mean_exact_match"] for k, v in m["tasks"].items()},
            "per_family": {k: v["per_family"] for k, v in m["tasks"].items()}, "bpb": m["bpb"],
            "rag": rag["rag"]["exact_match"], "closed_book": rag["closed_book"]["exact_match"],
            "attribution": rag["rag"]["attribution_accuracy"], "hallucination_rag": rag["rag"]["hallucination"], "hallucination_closed_book": rag["closed_book"]["hallucination"],
            "arithmetic_with_tools": agent["with_tools"].get("arithmetic", 0.0), "sql": agent["with_tools"].get("sql", 0.0),
            "arithmetic_without_tools": agent["arithmetic_without_tools"], "call_validity": agent["call_validity"]}


def _report(s: dict, lang: str) -> str:
    b, a = s["before"], s["after"]
    fams = list(a["per_family"][f"{lang}_0"])
    L = [f"# ownllm quickstart report card: {s['model']}", "",
         f"Import, measure, LoRA SFT, measure, align, export and serve in {s['wall_s'] / 60:.1f} minutes of wall time "
         "on this machine (" + ", ".join(f"{k} {v['wall_s'] / 60:.1f}" for k, v in s["cost"].items()) + " minutes).", "",
         f"## Held-out task suite in its own chat template ({s['n_eval']} prompts per family, exact match, greedy)", "",
         f"LoRA SFT: {s['sft']['step']} steps in {s['sft']['elapsed_s']:.0f}s.", "",
         f"| family ({lang}) | as imported 0-shot | 4-shot | LoRA SFT 0-shot |", "|---|---:|---:|---:|"]
    for f in fams:
        L.append(f"| {f} | {b['per_family'][f'{lang}_0'][f]:.2f} | {b['per_family'][f'{lang}_4'][f]:.2f} | "
                 f"{a['per_family'][f'{lang}_0'][f]:.2f} |")
    L += [f"| **mean** | {b['tasks'][f'{lang}_0']:.3f} | {b['tasks'][f'{lang}_4']:.3f} | **{a['tasks'][f'{lang}_0']:.3f}** |",
          f"| Chinese prompts, simplified (0-shot mean) | {b['tasks']['zh_0']:.3f} | | {a['tasks']['zh_0']:.3f} |",
          f"| Chinese prompts, traditional (0-shot mean) | {b['tasks']['zh-hant_0']:.3f} | | {a['tasks']['zh-hant_0']:.3f} |", "",
          "![task accuracy](plots/task_accuracy.png) ![SFT loss](plots/sft_loss.png)", "",
          "## Before and after", "", "| measure | as imported | after LoRA SFT |", "|---|---:|---:|",
          f"| Shakespeare validation bits per byte (forgetting) | {b['bpb']:.4f} | {a['bpb']:.4f} |",
          f"| demo KB closed-book exact match | {b['closed_book']:.3f} | {a['closed_book']:.3f} |",
          f"| demo KB with RAG exact match | {b['rag']:.3f} | {a['rag']:.3f} |",
          f"| RAG answers whose supporting source sentence holds the answer | {b['attribution']:.3f} | "
          f"{a['attribution']:.3f} |",
          f"| hallucination closed-book / with RAG | {b['hallucination_closed_book']:.2f} / {b['hallucination_rag']:.2f} | "
          f"{a['hallucination_closed_book']:.2f} / {a['hallucination_rag']:.2f} |",
          f"| agent arithmetic with the calculator | {b['arithmetic_with_tools']:.3f} | {a['arithmetic_with_tools']:.3f} |",
          f"| agent arithmetic without tools | {b['arithmetic_without_tools']:.3f} | {a['arithmetic_without_tools']:.3f} |",
          f"| agent SQL over the demo shop | {b['sql']:.3f} | {a['sql']:.3f} |",
          f"| tool-call validity | {b['call_validity']:.3f} | {a['call_validity']:.3f} |", "",
          "## Alignment (judged by the rule in data/judge.py on held-out prompts)", "",
          f"Reward model (the SFT model with a score head): pairwise accuracy **{s['reward']['pair_accuracy']:.3f}** on "
          f"{s['reward']['n_pairs']} held-out pairs.", "",
          "| policy vs SFT | win rate (ties ½) | of decided | decided share | KL to SFT | task accuracy (SFT) |",
          "|---|---:|---:|---:|---:|---:|"]
    for name, r in s["aligned"].items():
        L.append(f"| {name.upper()} | {r['win_rate']:.3f} | {r['decisive_win_rate']:.3f} | "
                 f"{(r['wins'] + r['losses']) / r['n']:.2f} | {r['kl']:.3f} | {r['task_accuracy']:.3f} "
                 f"({r['against_task_accuracy']:.3f}) |")
    sv = s["served"]
    L += ["", "## Export and serving", "", "`hf/` (for `transformers`) and `sft.gguf` (Q8_0, for llama.cpp-family "
          "runtimes), written from the SFT run with its adapters folded in.", "",
          f"`ownllm serve --run sft`: `POST /v1/chat/completions` → {sv['status']} in {sv['seconds']:.2f}s: "
          f"{sv['content']!r}", ""] + bias_section(s["bias"]) + ["", "## Cost", ""] + cost_table(s["cost"]) + [""]
    return "\n".join(L)
