"""How high can an aligned policy's win rate go without costing task accuracy? An upper bound.

    python bench/prefs_ceiling.py --run runs/quickstart/sft [--n 400]

`ownllm eval prefs` compares one sample (temperature 1) of a policy with one of the SFT model per
held-out prompt, judged by the hidden rule (right > "I don't know" > wrong). Alignment cannot add
skills, so the best it can do is (a) answer as SFT does at its best (its greedy answer) and (b) say
"I don't know" where SFT is usually wrong. This scores such simulated policies against SFT's own
samples: greedy everywhere, then abstaining on one more family at a time (cheapest in task accuracy
first), with the task accuracy each costs (mean over the suite's families, exact match of the
greedy answers on these prompts). Ends with `RESULT ceiling_within_2_points=…` — the best win rate
of a simulated policy that keeps task accuracy within 0.02 of SFT, ties
counting half and (`decided_within_2_points`) over the comparisons that are not ties.

    python bench/prefs_ceiling.py --run runs/sft --reward runs/rm [--best-of 8]

adds what RL against a reward model could reach within the policy's own samples: K answers per
prompt (temperature 1), the best one picked by the hidden rule (an oracle: the most any policy
that only re-weights SFT's answers can win) and the one the reward model scores highest (what
optimising that reward model selects — best-of-K sampling, the yardstick RL against a reward model
is usually measured by), each against SFT's sample. Adds `oracle_best_of_K` and `rm_best_of_K`
(of decided comparisons) to the RESULT line.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import result_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="the SFT run alignment starts from")
    ap.add_argument("--n", type=int, default=400, help="held-out preference prompts")
    ap.add_argument("--reward", help="a reward-model run: also pick the best of --best-of samples by its score")
    ap.add_argument("--best-of", type=int, default=8, help="answers sampled per prompt for the best-of rows")
    args = ap.parse_args()

    from ownllm.data.preferences import preference_prompts
    from ownllm.train.pairs import sample_answers
    from ownllm.data.tasks import FAMILIES
    from ownllm.data.judge import prefer
    from ownllm.data.grounded import CLOSED_BOOK_REFUSAL

    examples = preference_prompts(args.n, "test", 0)
    theirs = [s[0] for s in sample_answers(args.run, examples, 1, 1, progress=False)]
    greedy = [s[0] for s in sample_answers(args.run, examples, 1, 0, temperature=0.0, progress=False)]
    n_fam = len(FAMILIES)  # task accuracy is the mean over the suite's families

    # family → [[wins, losses] answering greedily, [wins, losses] abstaining]
    win = defaultdict(lambda: [[0, 0], [0, 0]])
    count, right = defaultdict(int), defaultdict(int)
    for ex, a, b in zip(examples, greedy, theirs):
        for i, mine in enumerate((a, CLOSED_BOOK_REFUSAL[ex.lang])):
            v = prefer(ex, mine, b)
            win[ex.family][i][0] += v > 0
            win[ex.family][i][1] += v < 0
        count[ex.family] += 1
        right[ex.family] += a.strip() == ex.answer  # as `ownllm eval tasks` scores
    # abstaining on a family costs its greedy accuracy ÷ the suite's family count (closed-book
    # questions are not in the suite: free); a family is worth abstaining on only if it wins more
    cost = {f: (right[f] / count[f] / n_fam if f in FAMILIES else 0.0) for f in win}
    gain = {f: (win[f][1][0] - win[f][1][1] - win[f][0][0] + win[f][0][1]) / 2 / args.n for f in win}
    choice = {f: 0 for f in win}

    def rates() -> tuple[float, float]:
        w = sum(win[f][choice[f]][0] for f in win)
        lost = sum(win[f][choice[f]][1] for f in win)
        return 0.5 + (w - lost) / 2 / args.n, w / max(1, w + lost)

    score, decided = rates()
    spent, best, best_decided = 0.0, score, decided
    print(f"{'policy':<44}{'win rate':>10}{'of decided':>12}{'accuracy cost':>15}")
    print(f"{'greedy answers everywhere':<44}{score:>10.3f}{decided:>12.3f}{0.0:>15.3f}")
    for f in sorted((f for f in win if gain[f] > 0), key=lambda f: cost[f] / gain[f]):
        choice[f], spent = 1, spent + cost[f]
        score, decided = rates()
        print(f"{'+ abstain on ' + f:<44}{score:>10.3f}{decided:>12.3f}{-spent:>15.3f}")
        if spent <= 0.02:
            best, best_decided = score, decided
    extra = best_of(args, examples, theirs) if args.reward else {}
    print(result_line(ceiling_within_2_points=best, decided_within_2_points=best_decided, n=args.n, **extra))


def best_of(args, examples, theirs: list[str]) -> dict:
    """Rows for the best of k ≤ K of the policy's own samples, picked by the hidden rule and by the
    reward model, against SFT's sample; returns the RESULT keys for k = K."""
    from ownllm.train.pairs import sample_answers
    from ownllm.data.judge import grade, prefer
    from ownllm.evaluation.prefs import reward_scores

    K = args.best_of
    many = sample_answers(args.run, examples, K, 1000, progress=False)
    flat = [a for answers in many for a in answers]
    scores = reward_scores(args.reward, [ex for ex in examples for _ in range(K)], flat)
    pickers = {"hidden rule": lambda i, ex, k: max(many[i][:k], key=lambda a: grade(ex, a)),
               "reward model": lambda i, ex, k: many[i][max(range(k), key=lambda j: scores[i * K + j])]}
    print(f"\n{'best of k own samples, picked by':<34}{'k':>4}{'won':>6}{'lost':>6}{'of decided':>12}")
    out = {}
    for name, pick in pickers.items():
        for k in sorted(k for k in {1, 2, 4, K} if k <= K):
            v = [prefer(ex, pick(i, ex, k), b) for i, (ex, b) in enumerate(zip(examples, theirs))]
            won, lost = v.count(1), v.count(-1)
            rate = won / max(1, won + lost)
            print(f"{name:<34}{k:>4}{won:>6}{lost:>6}{rate:>12.3f}")
            if k == K:
                out[f"{'oracle' if name == 'hidden rule' else 'rm'}_best_of_{K}"] = rate
    return out


if __name__ == "__main__":
    main()
