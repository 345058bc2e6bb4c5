"""What alignment adds, judged by the hidden rule on held-out prompts.

Where it sits: `ownllm eval prefs --run runs/dpo --against runs/sft` samples one answer per
held-out prompt from each policy, lets the hidden rule (judge.py) pick the better one, and reports
the win rate (a tie counts half), the KL of the policy to the one it is compared against
(Σ over answer tokens of log π − log π_against on the policy's own samples: the k1 estimate of
KL(π‖π_against) per answer), the reward model's mean score when --reward is given, and greedy
task-suite accuracy of both (alignment must not cost the skills SFT taught).
`ownllm eval reward --run runs/rm` reports a reward model's pairwise accuracy on held-out pairs,
by kind (policy pairs: the model's own answers and the honest refusal, what PPO's rewards rank;
perturbation pairs), by rule and by family.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ownllm.data.chat import encode_conversations
from ownllm.data.judge import deciding_rule, prefer
from ownllm.data.preferences import Pair, preference_prompts, read_preferences
from ownllm.tokenizer import Tokenizer
from ownllm.train.pairs import answer_logps, preference_pairs, sample_answers


def reward_scores(rm_run, examples, answers: list[str]) -> list[float]:
    from ownllm.train.preference import all_rewards, load_reward_model

    rm, tok = load_reward_model(rm_run), Tokenizer.load(rm_run)
    ex = encode_conversations(tok, _conversations(examples, answers), rm.config.max_seq_len, keep_end=True)
    return all_rewards(rm, ex, tok.pad_id).tolist()


def _conversations(examples, answers: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": a}] for e, a in zip(examples, answers)]


def evaluate_prefs(run, against, n: int = 200, temperature: float = 1.0, reward=None, n_task: int = 25,
                   seed: int = 0, progress: bool = True, against_task_accuracy: float | None = None,
                   lang: str | None = None, families: list[str] | None = None) -> dict:
    """`against_task_accuracy`: the compared run's task accuracy when already measured (same n_task,
    `lang` and `families`, which choose the task prompts)."""
    from ownllm.evaluation.tasks import evaluate_tasks

    examples = preference_prompts(n, "test", seed)
    mine = [s[0] for s in sample_answers(run, examples, 1, seed, temperature=temperature, progress=progress)]
    theirs = [s[0] for s in sample_answers(against, examples, 1, seed + 1, temperature=temperature, progress=progress)]
    verdicts = [prefer(e, a, b) for e, a, b in zip(examples, mine, theirs)]
    per = defaultdict(lambda: [0.0, 0])
    rules = defaultdict(lambda: [0, 0])   # which preference decided, [wins, losses]
    for e, a, b, v in zip(examples, mine, theirs, verdicts):
        per[e.family][0] += (v + 1) / 2
        per[e.family][1] += 1
        if v:
            rules[deciding_rule(e, a, b)][0 if v > 0 else 1] += 1
    kl = float((answer_logps(run, examples, mine) - answer_logps(against, examples, mine)).mean())
    res = {"n": n, "temperature": temperature, "wins": verdicts.count(1), "ties": verdicts.count(0),
           "losses": verdicts.count(-1), "win_rate": (verdicts.count(1) + 0.5 * verdicts.count(0)) / n, "kl": kl,
           "per_family": {f: w / c for f, (w, c) in per.items()}, "decided_by": {k: tuple(v) for k, v in rules.items()}}
    decisive = res["wins"] + res["losses"]
    res["decisive_win_rate"] = res["wins"] / decisive if decisive else 0.5
    # the most any policy could score against these samples: the reference answer every time wins
    # where the compared answer is wrong and ties where it is right
    res["ceiling"] = sum((prefer(e, e.answer, b) + 1) / 2 for e, b in zip(examples, theirs)) / n
    if reward:
        res["reward"] = sum(reward_scores(reward, examples, mine)) / n
        res["against_reward"] = sum(reward_scores(reward, examples, theirs)) / n
    def accuracy(r):
        return evaluate_tasks(r, n_per_family=n_task, lang=lang, families=families)["mean_exact_match"]
    res["task_accuracy"] = accuracy(run)
    res["against_task_accuracy"] = against_task_accuracy if against_task_accuracy is not None else accuracy(against)
    res["samples"] = [{"family": e.family, "prompt": e.prompt, "reference": e.answer, "answer": a, "against": b,
                       "verdict": v} for e, a, b, v in zip(examples, mine, theirs, verdicts)]
    return res


def print_prefs_report(res: dict, run, against, out=print) -> None:
    out(f"{run} vs {against}: {res['n']} held-out prompts, one sampled answer each (temperature {res['temperature']:g}), "
        f"judged by the hidden rule")
    out(f"wins {res['wins']}  ties {res['ties']}  losses {res['losses']}  → win rate {res['win_rate']:.3f} "
        f"(ties half; {res['decisive_win_rate']:.3f} of decided comparisons)")
    out(f"  the reference answer every time would score {res['ceiling']:.3f} (ties half): a tie is what "
        f"a right answer gets against a right answer")
    for rule, (w, lo) in sorted(res["decided_by"].items()):
        out(f"  decided by {rule:<11} {w:>4} won {lo:>4} lost")
    out(f"{'family':<14}{'win rate':>10}")
    for f, w in res["per_family"].items():
        out(f"{f:<14}{w:>10.3f}")
    out(f"KL to {against}: {res['kl']:.3f} nats per answer")
    if "reward" in res:
        out(f"reward model score: {res['reward']:.3f} vs {res['against_reward']:.3f}")
    out(f"task accuracy (greedy exact match): {res['task_accuracy']:.3f} vs {res['against_task_accuracy']:.3f}")
    extra = f" reward={res['reward']:.4f} against_reward={res['against_reward']:.4f}" if "reward" in res else ""
    out(f"RESULT win_rate={res['win_rate']:.4f} kl={res['kl']:.4f} task_accuracy={res['task_accuracy']:.4f} "
        f"decisive_win_rate={res['decisive_win_rate']:.4f} wins={res['wins']} ties={res['ties']} losses={res['losses']} "
        f"against_task_accuracy={res['against_task_accuracy']:.4f} ceiling={res['ceiling']:.4f}{extra}")


def evaluate_reward(run, data: str | None = None, n: int = 200, seed: int = 0, progress: bool = True) -> dict:
    """Pairwise accuracy on held-out pairs: from `data` (JSONL) or the bundled generator's test split,
    sampling answers from the run the reward model started from (as its training pairs did)."""
    from ownllm.train.preference import STAGE_FILE, encode_pairs, load_reward_model, reward_accuracy

    if data:
        pairs: list[Pair] = [p for path in data.split(",") for p in read_preferences(path.strip())]
    else:
        stage = Path(run) / STAGE_FILE
        start = json.loads(stage.read_text()).get("start") if stage.exists() else None
        pairs = preference_pairs(n, "test", run=start if start and Path(start).exists() else None, seed=seed,
                                 progress=progress)
    rm, tok = load_reward_model(run), Tokenizer.load(run)
    ex, kept = encode_pairs(tok, pairs, rm.config.max_seq_len)
    res = reward_accuracy(rm, ex, tok.pad_id)
    by = {"rule": defaultdict(list), "family": defaultdict(list), "kind": defaultdict(list)}
    for p, ok in zip(kept, res.pop("correct")):
        for key, name in (("rule", p.rule), ("family", p.family), ("kind", p.family and ("policy" if p.on_policy else "perturbation"))):
            if name:
                by[key][name].append(ok)
    return {"pair_accuracy": res["val_pair_accuracy"], "reward_gap": res["val_reward_gap"], "n_pairs": len(kept),
            **{f"by_{k}": {name: (sum(v) / len(v), len(v)) for name, v in d.items()} for k, d in by.items()}}


def print_reward_report(res: dict, out=print) -> None:
    out(f"held-out preference pairs: {res['n_pairs']}; mean reward gap (chosen − rejected) {res['reward_gap']:.3f}")
    for key in ("by_kind", "by_rule", "by_family"):
        for name, (acc, cnt) in res[key].items():
            out(f"  {key[3:]:<7}{name:<13}{acc:>7.3f}  ({cnt} pairs)")
    out(f"RESULT pair_accuracy={res['pair_accuracy']:.4f} n_pairs={res['n_pairs']}")
