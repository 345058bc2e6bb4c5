"""Exact-match accuracy on the held-out task suite, zero- or few-shot.

Where it sits: `ownllm eval tasks --run R [--shots K]`. A fine-tuned run (stage sft) is prompted
with the chat template; K shots become earlier user/assistant turns. A base run never saw chat
markers, so it gets plain text: K blocks of "Q: …\\nA: …" then "Q: …\\nA:", and its answer ends
at the first newline. Shots come from the train split of the same family and language.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from ownllm.checkpoint import trained_context
from ownllm.data.tasks import FAMILIES, Example, generate
from ownllm.inference.generate import greedy_texts, load_run


def run_stage(run: str | Path) -> str:
    """The stage whose prompt format the run's model speaks: its own, or for continued pretraining
    (`pretrain --init`) the stage of the run it started from (a fine-tuned model trained on more
    text still answers in the chat template)."""
    tc = Path(run) / "train_config.json"
    cfg = json.loads(tc.read_text()) if tc.exists() else {}
    stage, init = cfg.get("stage", "pretrain"), cfg.get("init")
    if stage == "pretrain" and init and Path(init).resolve() != Path(run).resolve() and Path(init).is_dir():
        return run_stage(init)
    return stage


def _shots(ex: Example, pool: dict, k: int, r: random.Random) -> list[Example]:
    cands = pool[(ex.family, ex.lang)]
    return r.sample(cands, k) if k else []


def build_prompt(tok, ex: Example, shots: list[Example], chat: bool) -> list[int]:
    if chat:
        msgs = [m for s in shots for m in s.messages()] + [{"role": "user", "content": ex.prompt}]
        return tok.render(msgs, add_generation_prompt=True).ids
    text = "".join(f"Q: {s.prompt}\nA: {s.answer}\n\n" for s in shots) + f"Q: {ex.prompt}\nA:"
    return tok.encode(text)


def evaluate_tasks(run: str | Path, shots: int = 0, n_per_family: int = 50, batch_size: int = 32,
                   max_new_tokens: int = 40, families: list[str] | None = None, seed: int = 0,
                   lang: str | None = None) -> dict:
    """Held-out exact match per family; `lang` ('en', 'zh' or 'zh-hant'): prompts in that language
    and script only (a model that knows one language is measured on it alone)."""
    model, tok = load_run(run)
    # an imported instruct model speaks in its own template; a pretrained base of ours does not
    chat = run_stage(run) != "pretrain" or tok.template is not None
    fams = families or list(FAMILIES)
    tests = generate(n_per_family * len(fams), "test", seed=seed, families=fams, lang=lang)
    pool = defaultdict(list)
    for e in generate(200 * len(fams), "train", seed=seed + 1, families=fams, lang=lang):
        pool[(e.family, e.lang)].append(e)
    r = random.Random(seed)
    # prompt + answer within the windows the run was trained on (a base run: 256 of its 512 positions)
    budget = max(1, trained_context(run, model.config.max_seq_len) - max_new_tokens)
    prompts = []
    for ex in tests:
        k = shots
        ids = build_prompt(tok, ex, _shots(ex, pool, k, r), chat)
        while len(ids) > budget and k > 0:  # fewer shots when the context is full
            k -= 1
            ids = build_prompt(tok, ex, _shots(ex, pool, k, r), chat)
        prompts.append(ids[-budget:])
    answers = []
    per = defaultdict(lambda: [0, 0])
    for ex, text in zip(tests, greedy_texts(model, tok, prompts, max_new_tokens, batch_size)):
        if not chat:  # a base model runs on past its answer: as many lines as the answer has
            text = "\n".join(text.split("\n")[: ex.answer.count("\n") + 1])
        ok = text.strip() == ex.answer
        per[ex.family][0] += ok
        per[ex.family][1] += 1
        answers.append({"family": ex.family, "lang": ex.lang, "prompt": ex.prompt, "answer": ex.answer,
                        "output": text.strip(), "correct": ok})
    acc = {f: c / n for f, (c, n) in per.items()}
    return {"per_family": acc, "mean_exact_match": sum(acc.values()) / len(acc), "shots": shots, "chat": chat,
            "n": len(tests), "lang": lang, "samples": answers}


def print_task_report(res: dict, out=print) -> None:
    out(f"held-out task suite: {res['n']} prompts{' in ' + res['lang'] if res.get('lang') else ''}, {res['shots']}-shot, "
        f"{'chat template' if res['chat'] else 'plain Q/A prompt'}, greedy")
    out(f"{'family':<14}{'exact match':>12}")
    for f, a in res["per_family"].items():
        out(f"{f:<14}{a:>12.3f}")
    out(f"{'mean':<14}{res['mean_exact_match']:>12.3f}")
    keys = " ".join(f"{f}={a:.4f}" for f, a in res["per_family"].items())
    out(f"RESULT mean_exact_match={res['mean_exact_match']:.4f} {keys}")
