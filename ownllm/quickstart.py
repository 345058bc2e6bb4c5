"""`ownllm quickstart`: every stage that exists, on bundled data, on a laptop CPU, then a report card.

Where it sits: the main job. Pipeline: tokenizer + pretraining (the `lookup` recipe — tiny
preset, smear, q/k norms, a copy warm-up — or `llama`, config.RECIPES; Shakespeare + Chinese poetry + the
task suite's train split as text + the planted-bias sentences) → held-out bits per byte and samples → the base model prompted zero- and
few-shot on the task suite → supervised fine-tuning on the suite (with grounded-answer and
tool-use traces) → held-out exact match, a chat sample, Hugging Face and GGUF exports (`llama`
recipe only) → the bias probe, with the association planted in the pretraining mix, on the base,
a short counter-balanced continued pretraining of it (held-out bits per byte and 4-shot accuracy
beside) and the SFT model → RAG over the demo knowledge base
(retrieval, grounded vs closed-book answers, hallucination) → the agent with its tools →
alignment: preference pairs ranked by the hidden rule, a reward model, DPO, PPO against the reward
model and GRPO against the arithmetic verifier, each judged on held-out prompts.
Writes `<out>/report.md`, `<out>/report.json` and PNG plots.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ownllm.config import COUNTER_BALANCE, QUICKSTART_STEPS, TrainConfig, recipe as named_recipe
from ownllm.cost import Stages, cost_table, result_keys
from ownllm.data.bias import PLANTED_SHARE
from ownllm.evaluation.bias import bias_section, bias_summary, planted_gaps, planted_section
from ownllm.interop.hf import SMEAR_UNEXPORTABLE
from ownllm.metrics import MetricsLog, plot_curves


NOT_EXPORTED = (f"the model {SMEAR_UNEXPORTABLE}; `ownllm quickstart --recipe llama` trains a plain Llama and "
                "exports it")


def limit(steps: int, seconds: float | None) -> dict:
    """A stage's length: its step count, or seconds where given (the LR schedule ends with either)."""
    return {"max_steps": None, "time_budget": seconds} if seconds else {"max_steps": steps, "time_budget": None}


def quickstart(out: str | Path = "runs/quickstart", steps: dict | None = None, n_eval: int = 50,
               data: str | None = None, pretrain_budget: float | None = None,
               sft_budget: float | None = None, rlhf_budget: float | None = None, recipe: str = "lookup",
               log=print) -> dict:
    """`steps`: steps per stage (QUICKSTART_STEPS, any subset overridden), so the report card is
    the same on a fast host and a slow one; a `*_budget` in seconds replaces a stage's steps
    (`rlhf_budget`: the reward model, DPO, PPO and GRPO together, a quarter each). `recipe`: the
    pretraining recipe (config.RECIPES; `llama` exports). `data`: the pretraining mix, or None for
    the recipe's (`tasks`: the suite's train split as text)."""
    from ownllm.agent.sql import ReadOnlyDB, demo_shop_path
    from ownllm.evaluation.agent import evaluate_agent, print_agent_report
    from ownllm.evaluation.bias import probe_runs
    from ownllm.evaluation.extraction import evaluate_extraction, print_extraction_report
    from ownllm.evaluation.rag import evaluate_rag, print_rag_report
    from ownllm.evaluation.tasks import evaluate_tasks, print_task_report
    from ownllm.rag.demo import demo_kb_path
    from ownllm.rag.embed import find_embedder
    from ownllm.rag.store import KnowledgeBase
    from ownllm.chat import ChatSession
    from ownllm.inference.generate import generate_text
    from ownllm.interop.gguf import export_gguf
    from ownllm.interop.hf import export_hf
    from ownllm.train.pretrain import pretrain
    from ownllm.train.sft import sft, sft_config

    steps = {**QUICKSTART_STEPS, **(steps or {})}
    rec = named_recipe(recipe)   # an unknown name stops here, before anything is written
    data = data or rec["train"]["data"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = Stages()
    stages.start("pretrain")
    length = f"{pretrain_budget:.0f}s" if pretrain_budget else f"{steps['pretrain_steps']} steps"
    log(f"== 1/8 tokenizer + pretraining: the {recipe} recipe on {data}, {length} of training ==")
    base = out / "base"
    pre = pretrain(base, TrainConfig(**{**rec["train"], "data": data}, **limit(steps["pretrain_steps"], pretrain_budget)),
                   preset=rec["preset"], model_overrides=rec["model"], overwrite=True, log=log)
    for r in pre["sources"]:
        log(f"  {r['source']:<16} val_loss {r['val_loss']:.4f}  val_bpb {r['val_bpb']:.4f}")
    speed = pre["step"] / max(pre["elapsed_s"], 1e-9)
    samples = {p: p + generate_text(base, p, max_new_tokens=80, temperature=0.8, seed=1) for p in ("ROMEO:\n", "春风")}
    for s in samples.values():
        log("--- sample ---\n" + s)

    stages.start("prompting")
    log(f"== 2/8 prompting the base model: zero-shot vs 4-shot, {n_eval} held-out prompts per family ==")
    base_tasks = {k: evaluate_tasks(base, shots=k, n_per_family=n_eval) for k in (0, 4)}
    for res in base_tasks.values():
        print_task_report(res, out=log)

    length = f"{sft_budget:.0f}s" if sft_budget else f"{steps['sft_steps']} steps"
    stages.start("sft")
    log(f"== 3/8 supervised fine-tuning on the task suite, {length} ==")
    sft_run = out / "sft"
    ft = sft(base, sft_run, sft_config(**limit(steps["sft_steps"], sft_budget)), overwrite=True, log=log)

    stages.start("sft eval")
    log("== 4/8 held-out task accuracy after SFT ==")
    sft_tasks = evaluate_tasks(sft_run, shots=0, n_per_family=n_eval)
    print_task_report(sft_tasks, out=log)
    extract = evaluate_extraction(sft_run, n=n_eval // 2)
    print_extraction_report(extract, out=log)
    chat = ChatSession(str(sft_run), temperature=0)
    chat_demo = []
    for q in ("What is 48 + 27?", "把 305 写成中文数字。", "Sort from smallest to largest: 7 2 9 4"):
        chat_demo.append((q, "".join(chat.reply(q))))
        chat.command("/reset")
        log(f"you> {q}\nbot> {chat_demo[-1][1]}")
    exported = None
    if recipe == "llama":
        exported = {"hf": export_hf(sft_run, out / "hf", overwrite=True),
                    "gguf": export_gguf(sft_run, out / "sft.gguf", overwrite=True)}
        log(f"exported for transformers: {exported['hf']['out']} ({exported['hf']['architecture']}, "
            f"{exported['hf']['bytes'] / 1e6:.1f} MB); for llama.cpp: {exported['gguf']['out']} "
            f"({exported['gguf']['bytes'] / 1e6:.1f} MB, {exported['gguf']['dtype']})")
    else:
        log(f"export: {NOT_EXPORTED}")

    stages.start("bias")
    log(f"== 5/8 bias: the probe on the planted association, then {steps['balance_steps']} steps of counter-balanced "
        "continued pretraining of the base ==")
    balanced = out / "balanced"
    counter = balance(base, balanced, steps["balance_steps"], data, log=log)
    balanced_tasks = evaluate_tasks(balanced, shots=4, n_per_family=n_eval)
    bias = probe_runs({"base": base, "balanced": balanced, "sft": sft_run}, planted=True, log=log)
    planted = {name: planted_gaps(res) for name, res in bias.items()}
    kept = held_out_kept(pre["sources"], counter["sources"])
    measures = {"base": {"bpb": kept["before"], "exact_match": base_tasks[4]["mean_exact_match"], "shots": 4},
                "balanced": {"bpb": kept["after"], "exact_match": balanced_tasks["mean_exact_match"], "shots": 4},
                "sft": {"exact_match": sft_tasks["mean_exact_match"], "shots": 0}}
    log(f"after the counter-balanced pass: held-out bits per byte on {', '.join(kept['sources'])} {kept['after']:.4f} "
        f"(base {kept['before']:.4f}); 4-shot exact match {balanced_tasks['mean_exact_match']:.3f} "
        f"(base {base_tasks[4]['mean_exact_match']:.3f})")

    stages.start("rag")
    log("== 6/8 RAG: the demo knowledge base (fictional towns), retrieval and grounded answers ==")
    embedder = find_embedder()
    kb = KnowledgeBase(demo_kb_path(embedder, log=log), embedder=embedder)
    rag = evaluate_rag(sft_run, kb, n=100)
    print_rag_report(rag, out=log)

    stages.start("agent")
    log("== 7/8 agent: calculator, knowledge search and the demo shop database ==")
    db = ReadOnlyDB(demo_shop_path())
    agent = evaluate_agent(sft_run, kb=kb, db=db, n_arith=20, n_sql=20, n_search=10)
    print_agent_report(agent, out=log)
    kb.close(), db.close()

    length = f"{rlhf_budget:.0f}s" if rlhf_budget else ", ".join(
        f"{steps[k + '_steps']} {k}" for k in ("reward", "dpo", "ppo", "grpo")) + " steps"
    stages.start("alignment")
    log(f"== 8/8 alignment: preferences, reward model, DPO, PPO, GRPO ({length}) ==")
    rlhf = align(out, sft_run, steps, rlhf_budget, n_eval, sft_tasks["mean_exact_match"], log=log)
    stages.stop()

    plots = out / "plots"
    plot_curves(MetricsLog.read(base / "metrics.jsonl"), plots / "pretrain_loss.png", title="pretraining loss (nats/token)")
    plot_curves(MetricsLog.read(base / "metrics.jsonl"), plots / "pretrain_bpb.png", keys=("val_bpb",),
                title="held-out bits per byte")
    plot_curves(MetricsLog.read(sft_run / "metrics.jsonl"), plots / "sft_loss.png", title="SFT loss on answer tokens")
    _plot_tasks({"base 0-shot": base_tasks[0], "base 4-shot": base_tasks[4], "SFT 0-shot": sft_tasks},
                plots / "task_accuracy.png")
    wall = time.perf_counter() - t0
    summary = {"pretrain": {k: pre[k] for k in ("step", "elapsed_s", "dtype", "sources")},
               "base_tasks": {k: {"mean": v["mean_exact_match"], **v["per_family"]} for k, v in base_tasks.items()},
               "sft": {"step": ft["step"], "elapsed_s": ft["elapsed_s"], "mean": sft_tasks["mean_exact_match"],
                       **sft_tasks["per_family"]},
               "rag": {k: rag[k] for k in ("retrieval", "rag", "rag_verified", "closed_book")},
               "agent": {k: agent[k] for k in ("with_tools", "arithmetic_without_tools", "call_validity", "calls")},
               "extract": {k: v for k, v in extract.items() if k != "samples"},
               "rlhf": rlhf, "wall_s": wall, "pretrain_steps_per_s": speed, "cost": stages.costs,
               "bias": bias_summary(bias), "planted_bias": {"gaps": planted, "measures": measures,
                                                            "share": PLANTED_SHARE}}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_report(pre, samples, base_tasks, ft, sft_tasks, chat_demo, wall, rag, agent,
                                           exported, extract) + _rlhf_report(rlhf)
                                   + "\n".join(bias_section(bias) + [""] + planted_section(planted, measures, PLANTED_SHARE)
                                                + ["", "## Cost", ""] + cost_table(stages.costs) + [""]), encoding="utf-8")
    log(f"report card: {out / 'report.md'} (plots in {plots})")
    mean_bpb = sum(r["val_bpb"] for r in pre["sources"]) / len(pre["sources"])
    log(f"RESULT val_bpb={mean_bpb:.4f} base_zero_shot={base_tasks[0]['mean_exact_match']:.4f} "
        f"base_four_shot={base_tasks[4]['mean_exact_match']:.4f} sft_exact_match={sft_tasks['mean_exact_match']:.4f} "
        f"rag_exact_match={rag['rag']['exact_match']:.4f} closed_book_exact_match={rag['closed_book']['exact_match']:.4f} "
        f"hallucination_rag={rag['rag']['hallucination']:.4f} hallucination_closed_book={rag['closed_book']['hallucination']:.4f} "
        f"arithmetic_with_tools={agent['with_tools']['arithmetic']:.4f} "
        f"arithmetic_without_tools={agent['arithmetic_without_tools']:.4f} "
        f"pair_accuracy={rlhf['reward']['pair_accuracy']:.4f} dpo_win_rate={rlhf['dpo']['win_rate']:.4f} "
        f"dpo_decided_win_rate={rlhf['dpo']['decisive_win_rate']:.4f} ppo_win_rate={rlhf['ppo']['win_rate']:.4f} "
        f"ppo_decided_win_rate={rlhf['ppo']['decisive_win_rate']:.4f} grpo_arithmetic={rlhf['grpo']['arithmetic']:.4f} "
        f"sft_arithmetic={rlhf['grpo']['sft_arithmetic']:.4f} extract_field_exact_match={extract['field_exact_match']:.4f} "
        f"extract_schema_valid={extract['schema_valid']:.4f} "
        f"extract_unconstrained_schema_valid={extract['unconstrained_schema_valid']:.4f} "
        + "".join(f"{k}_gap_{lang}{suffix}={planted[name][lang][k]:.4f} " for name, suffix in
                  (("base", ""), ("balanced", "_balanced"), ("sft", "_sft")) for lang in ("en", "zh") for k in ("planted", "control"))
        + f"balanced_bpb={kept['after']:.4f} base_bpb_kept={kept['before']:.4f} "
        f"balanced_four_shot={balanced_tasks['mean_exact_match']:.4f} {result_keys(stages.costs)} "
        f"wall_s={wall:.0f}")
    return summary


def held_out_kept(before: list[dict], after: list[dict]) -> dict:
    """Mean held-out bits per byte over the sources two pretraining results share (the counter
    pass swaps one source for another): {sources, before, after}."""
    a = {r["source"]: r["val_bpb"] for r in after}
    b = {r["source"]: r["val_bpb"] for r in before if r["source"] in a}
    return {"sources": list(b), "before": sum(b.values()) / len(b), "after": sum(a[k] for k in b) / len(b)}


def balance(base: Path, out: Path, steps: int, data: str, seed: int = 0, log=print, **overrides) -> dict:
    """The counter-balanced pass: `steps` of continued pretraining (config.COUNTER_BALANCE) of the
    base run on its pretraining mix `data` with the `planted-bias` source replaced by the same
    sentences at 50/50 (written beside the run): text against the planted association, with the
    rest of the mix keeping what the base knows. `overrides`: COUNTER_BALANCE's keys or any
    TrainConfig field."""
    from ownllm.data.bias import planted_text
    from ownllm.train.pretrain import pretrain

    cb = {**COUNTER_BALANCE, **overrides}
    text = out.parent / f"{out.name}.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text(planted_text(cb.pop("sentences"), share=0.5, seed=seed + 11), encoding="utf-8")
    mix = ",".join([s for s in data.split(",") if s.strip() != "planted-bias"] + [str(text)])
    return pretrain(out, TrainConfig(**{**cb, "data": mix, "init": str(base), "max_steps": steps, "seed": seed}),
                    overwrite=True, log=log)


def align(out: Path, sft_run: Path, steps: dict, budget: float | None, n_eval: int, sft_accuracy: float,
          n_prompts: int = 1500, n_judge: int = 200, log=print) -> dict:
    """Stage 7: pairs from the SFT model's samples ranked by the hidden rule → reward model → DPO,
    PPO (against the reward model) and GRPO (against the arithmetic verifier), each for its steps
    (or a quarter of `budget` seconds); then each policy against SFT on held-out prompts."""
    from ownllm.data.preferences import write_preferences
    from ownllm.evaluation.prefs import evaluate_prefs, evaluate_reward, print_prefs_report, print_reward_report
    from ownllm.evaluation.tasks import evaluate_tasks
    from ownllm.train.pairs import preference_pairs
    from ownllm.config import DPO_DEFAULTS, GRPO_DEFAULTS, PPO_DEFAULTS, REWARD_DEFAULTS
    from ownllm.train.preference import stage_train_config, train_dpo, train_reward
    from ownllm.train.rl import train_grpo, train_ppo

    def quarter(stage):
        return limit(steps[f"{stage}_steps"], budget / 4 if budget else None)
    prefs = out / "prefs.jsonl"
    write_preferences(preference_pairs(n_prompts, "train", run=sft_run, seed=0), prefs)
    train_reward(sft_run, out / "rm", stage_train_config(REWARD_DEFAULTS, data=str(prefs), **quarter("reward")),
                 overwrite=True, log=log)
    reward = evaluate_reward(out / "rm", n=n_judge)
    print_reward_report(reward, out=log)
    train_dpo(sft_run, out / "dpo", stage_train_config(DPO_DEFAULTS, data=str(prefs), **quarter("dpo")),
              overwrite=True, log=log)
    train_ppo(sft_run, out / "ppo", str(out / "rm"), stage_train_config(PPO_DEFAULTS, **quarter("ppo")),
              overwrite=True, log=log)
    train_grpo(sft_run, out / "grpo", "verifier:arithmetic", stage_train_config(GRPO_DEFAULTS, **quarter("grpo")),
               overwrite=True, log=log)
    res: dict = {"reward": {k: reward[k] for k in ("pair_accuracy", "n_pairs", "by_rule", "by_kind")}}
    for name in ("dpo", "ppo"):
        r = evaluate_prefs(out / name, sft_run, n=n_judge, reward=out / "rm", n_task=n_eval, against_task_accuracy=sft_accuracy)
        print_prefs_report(r, name, "sft", out=log)
        res[name] = {k: v for k, v in r.items() if k != "samples"}
    arith = {name: evaluate_tasks(run, n_per_family=n_judge // 2, families=["arithmetic"])["per_family"]["arithmetic"]
             for name, run in (("grpo", out / "grpo"), ("sft", sft_run))}
    log(f"GRPO (verifier:arithmetic): held-out arithmetic exact match {arith['grpo']:.3f} vs SFT {arith['sft']:.3f}")
    res["grpo"] = {"arithmetic": arith["grpo"], "sft_arithmetic": arith["sft"]}
    return res


def _rlhf_report(r: dict) -> str:
    L = ["## 8. Alignment (`ownllm reward | dpo | ppo | grpo`, judged by the hidden rule on held-out prompts)", "",
         f"Reward model: pairwise accuracy **{r['reward']['pair_accuracy']:.3f}** on {r['reward']['n_pairs']} held-out pairs "
         "(" + ", ".join(f"{k} {a:.2f}" for k, (a, _) in {**r["reward"]["by_kind"], **r["reward"]["by_rule"]}.items())
         + "; policy pairs rank the model's own answers and the honest refusal, as PPO's rewards must).", "",
         "| policy vs SFT | win rate (ties ½) | of decided | ceiling (ties ½) | KL to SFT (nats) | reward | task accuracy (SFT) |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("dpo", "ppo"):
        p = r[name]
        L.append(f"| {name.upper()} | {p['win_rate']:.3f} | {p['decisive_win_rate']:.3f} | {p['ceiling']:.3f} | {p['kl']:.2f} | "
                 f"{p['reward']:.2f} vs {p['against_reward']:.2f} | {p['task_accuracy']:.3f} ({p['against_task_accuracy']:.3f}) |")
    L += ["", "Ceiling: the reference answer every time, against the same SFT samples — where SFT is right, "
          "the best answer only ties.", "", f"GRPO with the arithmetic verifier: held-out arithmetic exact match **{r['grpo']['arithmetic']:.3f}** "
          f"vs SFT {r['grpo']['sft_arithmetic']:.3f}.", ""]
    return "\n".join(L)


def _plot_tasks(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(next(iter(results.values()))["per_family"])
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(fams))], [res["per_family"][f] for f in fams], width, label=name)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(fams))], fams, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match (held-out)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _report(pre, samples, base_tasks, ft, sft_tasks, chat_demo, wall, rag, agent, exported, extract) -> str:
    fams = list(sft_tasks["per_family"])
    L = ["# ownllm quickstart report card", "",
         f"The whole pipeline in {wall / 60:.1f} minutes of wall time on this machine. Each stage's run directory "
         "holds its config, weights, metrics.jsonl and plots.", "",
         "## 1. Pretraining (`base/`)", "",
         f"{pre['step']} steps in {pre['elapsed_s']:.0f}s of training ({pre['dtype']}).", "",
         "| held-out source | tokens | val loss (nats/token) | bits per byte |", "|---|---:|---:|---:|"]
    L += [f"| {r['source']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |" for r in pre["sources"]]
    L += ["", "![pretraining loss](plots/pretrain_loss.png) ![bits per byte](plots/pretrain_bpb.png)", "",
          "Samples (temperature 0.8, seed 1):", ""]
    for s in samples.values():
        L += ["```", s, "```"]
    L += ["", "## 2-4. Instruction following (held-out task suite, exact match, greedy)", "",
          f"SFT: {ft['step']} steps in {ft['elapsed_s']:.0f}s.", "",
          "| family | base 0-shot | base 4-shot | SFT 0-shot |", "|---|---:|---:|---:|"]
    for f in fams:
        L.append(f"| {f} | {base_tasks[0]['per_family'][f]:.2f} | {base_tasks[4]['per_family'][f]:.2f} | "
                 f"{sft_tasks['per_family'][f]:.2f} |")
    L.append(f"| **mean** | {base_tasks[0]['mean_exact_match']:.2f} | {base_tasks[4]['mean_exact_match']:.2f} | "
             f"**{sft_tasks['mean_exact_match']:.2f}** |")
    L += ["", "![task accuracy](plots/task_accuracy.png) ![SFT loss](plots/sft_loss.png)", "", "Chat (greedy):", "", "```"]
    for q, a in chat_demo:
        L += [f"you> {q}", f"bot> {a}"]
    L += ["```", "", f"Extraction from {extract['n']} held-out staff notes (`ownllm eval extract --run sft`): "
          "field exact match / schema-valid records / replies holding JSON", "",
          "| decoding | field exact match | schema valid | JSON parsed |", "|---|---:|---:|---:|"]
    L += [f"| {label} | {extract[k + 'field_exact_match']:.3f} | {extract[k + 'schema_valid']:.3f} | "
          f"{extract[k + 'json_parsed']:.3f} |" for k, label in (("", "constrained to the schema"), ("unconstrained_", "free"))]
    L.append("")
    if exported:
        L += [f"Exported for `transformers` (`ownllm export --run sft --out hf`): `hf/`, {exported['hf']['architecture']}, "
              f"{exported['hf']['bytes'] / 1e6:.1f} MB (tests check that `AutoModelForCausalLM.from_pretrained` and the "
              "tokenizer's chat template give the run's logits and token ids). For llama.cpp-family runtimes: `sft.gguf` "
              f"(`ownllm export --run sft --out sft.gguf --format gguf`, {exported['gguf']['dtype']}, "
              f"{exported['gguf']['bytes'] / 1e6:.1f} MB).", ""]
    else:
        L += [f"Not exported: {NOT_EXPORTED}", ""]
    L += ["## 6. RAG over the demo knowledge base (`ownllm eval rag --run sft --kb demo`)", "",
          "| retrieval | recall@5 | MRR |", "|---|---:|---:|"]
    L += [f"| {m} | {r['recall_at_5']:.3f} | {r['mrr']:.3f} |" for m, r in rag["retrieval"].items()]
    cb, rg, vf = rag["closed_book"], rag["rag"], rag["rag_verified"]
    L += ["", "| answers | closed-book | with RAG | RAG + citation check (`ask --verify`) |", "|---|---:|---:|---:|",
          f"| exact match (answerable) | {cb['exact_match']:.3f} | {rg['exact_match']:.3f} | {vf['exact_match']:.3f} |",
          f"| hallucination (all) | {cb['hallucination']:.3f} | {rg['hallucination']:.3f} | {vf['hallucination']:.3f} |",
          f"| \"not in the sources\" when unanswerable | {cb['unanswerable_accuracy']:.3f} | {rg['unanswerable_accuracy']:.3f} "
          f"| {vf['unanswerable_accuracy']:.3f} |",
          "| citation accuracy (answers that cite) | - | " + " | ".join(
              f"{r['citation_accuracy']:.3f} ({r['cited']})" if r["cited"] else "- (0)" for r in (rg, vf)) + " |",
          "| attribution accuracy (answers attributed: the supporting sentence holds the answer) | - | " + " | ".join(
              f"{r['attribution_accuracy']:.3f} ({r['attributed']})" if r["attributed"] else "- (0)" for r in (rg, vf))
          + " |", "",
          "## 7. Agent (`ownllm eval agent --run sft`)", "", "| questions | accuracy |", "|---|---:|"]
    L += [f"| {f} (with tools) | {a:.3f} |" for f, a in agent["with_tools"].items()]
    L += [f"| arithmetic without tools | {agent['arithmetic_without_tools']:.3f} |",
          f"| tool-call validity ({agent['calls']} calls) | {agent['call_validity']:.3f} |", ""]
    return "\n".join(L)
