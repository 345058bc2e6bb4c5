"""Preference pairs from a policy's own samples: the bundled generator (data/preferences.py) ranks
the answers a run gives to its prompts — greedy, sampled, and its honest refusal — beside the
perturbations.

Where it sits: `ownllm data prefs --run R`, `--data prefs` of reward, dpo and ppo (ptx), the
held-out pairs of `eval reward`, and `eval prefs` (answers from two runs, judged by the rule).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ownllm.data.chat import encode_conversations
from ownllm.data.preferences import Pair, generate_preferences, read_preferences
from ownllm.data.tasks import Example
from ownllm.inference.engine import Engine, SamplingParams
from ownllm.inference.generate import load_run


def sample_answers(run, examples: list[Example], samples: int, seed: int, max_new_tokens: int = 48,
                   temperature: float = 1.0, batch_size: int = 32, progress: bool = True) -> list[list[str]]:
    """`samples` answers per example from the chat model in `run` (sampled, temperature 1)."""
    model, tok = load_run(run)
    engine = Engine(model, tok.pad_id)
    ctx = model.config.max_seq_len - max_new_tokens
    prompts = [tok.user_turn(ex.prompt)[-ctx:]
               for ex in examples for _ in range(samples)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, str] = {}
    stops = tok.stop_ids
    with torch.inference_mode():
        for b in tqdm(range(0, len(order), batch_size), desc="sampling answers", disable=not progress, unit="batch"):
            idx = order[b: b + batch_size]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=None, top_p=None,
                                    seed=seed + b, stop_ids=stops)
            for i, o in zip(idx, engine.generate([prompts[i] for i in idx], params)):
                outs[i] = tok.decode([t for t in o if t not in stops]).strip()
    return [[outs[i * samples + j] for j in range(samples)] for i in range(len(examples))]


def honest_refusals(run, examples: list[Example]) -> list[str]:
    """For each prompt, the honest refusal in the model's own words, in the question's language: of
    "I don't know." and "The sources do not say.", the one the chat model in `run` finds more
    likely. The SFT model learnt only the second (for sources that do not answer) and prefers it
    nearly everywhere, to a sum or a poem line too; the rule takes either as a refusal. Choosing by
    the prompt instead ("I don't know." without sources) makes DPO learn a phrase the model finds
    all but impossible, at a higher KL."""
    from ownllm.data.grounded import CLOSED_BOOK_REFUSAL, REFUSAL

    options = [CLOSED_BOOK_REFUSAL, REFUSAL]
    logps = [answer_logps(run, examples, [o[ex.lang] for ex in examples]) for o in options]
    return [options[int(logps[1][i] > logps[0][i])][ex.lang] for i, ex in enumerate(examples)]


def answer_logps(run, examples: list[Example], answers: list[str]) -> torch.Tensor:
    """Summed log-prob of each answer (its assistant tokens and end of turn) under `run`."""
    from ownllm.train.preference import all_completion_logps

    model, tok = load_run(run)
    convs = [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": a}] for e, a in zip(examples, answers)]
    return all_completion_logps(model, encode_conversations(tok, convs, model.config.max_seq_len, keep_end=True),
                                tok.pad_id)


def sampled_policy(run, samples: int = 3, seed: int = 0, progress: bool = True):
    """examples -> (the greedy answer and `samples` sampled ones per prompt, the honest refusal per
    prompt) from the chat model in `run`: what generate_preferences ranks as policy pairs."""
    def policy(examples: list[Example]) -> tuple[list[list[str]], list[str]]:
        greedy = sample_answers(run, examples, 1, seed, temperature=0.0, progress=progress)
        sampled = [g + s for g, s in zip(greedy, sample_answers(run, examples, samples, seed, progress=progress))]
        return sampled, honest_refusals(run, examples)
    return policy


def preference_pairs(n_prompts: int, split: str = "train", run=None, samples: int = 3, pairs_per_prompt: int = 4,
                     seed: int = 0, progress: bool = True) -> list[Pair]:
    """The bundled pairs for `n_prompts` prompts: with `run`, its own answers ranked too."""
    policy = sampled_policy(run, samples, seed, progress) if run else None
    return generate_preferences(n_prompts, split, policy, pairs_per_prompt=pairs_per_prompt, seed=seed)


def load_pairs(data: str, run=None, n_prompts: int = 1500, seed: int = 0, log=print) -> list[Pair]:
    """`--data` of reward/dpo: 'prefs' = the bundled generator sampling from `run`; else JSONL paths."""
    if data == "prefs":
        pairs = preference_pairs(n_prompts, "train", run=run, seed=seed)
        log(f"bundled preferences: {len(pairs):,} pairs from {n_prompts:,} prompts"
            f"{f' (answers sampled from {run} + perturbations)' if run else ' (perturbations only)'}")
        return pairs
    pairs = [p for path in data.split(",") if path.strip() for p in read_preferences(path.strip())]
    log(f"{data}: {len(pairs):,} preference pairs")
    return pairs
