"""Reinforcement learning on the policy's own samples: PPO against a reward model, GRPO against a
verifier (or a reward model).

Where it sits: `ownllm ppo --policy runs/sft --reward runs/rm --out runs/ppo` and
`ownllm grpo --policy runs/sft --reward verifier:arithmetic --out runs/grpo`. Both run on the
shared Trainer: its `next_batch` here samples a batch of answers with the inference Engine (KV
cache), scores them and keeps them as a buffer of minibatches for several optimisation epochs; its
`loss_fn` is the clipped surrogate (objectives.py). So checkpoints, resume (the adaptive KL
coefficient travels in state.pt), metrics.jsonl, plots and the progress bar are the Trainer's.

PPO: a value head (`score`) on the policy's own trunk estimates V; per-token reward is
−β·KL(π‖ref) on every answer token plus the reward model's (whitened) score on the last one, minus a
penalty when the answer never ended its turn; GAE(γ, λ) gives advantages (whitened); policy loss
clipped at 1±ε, value loss clipped at ±ε_v; β fixed or adapted toward a target KL. With
ptx_coef > 0 each minibatch also adds the NLL of answers the preference data ranked best (the
policy pairs' chosen side, from --data) — InstructGPT's "PPO-ptx" mixes pretraining text the same
way; here it is what lets PPO reach an answer its own samples never find (SFT gives the honest
"I don't know." to a closed-book question a probability near e^-40, so no rollout ever scores it).
GRPO: no value model: each prompt gets G answers and an answer's advantage is its reward minus the
group mean over the group std; clipped surrogate; optional KL to the reference (β = 0 by default).
The reference (the starting policy) stays resident and frozen; with β = 0 it is only read to report KL.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ownllm.checkpoint import load_model
from ownllm.config import GRPO_DEFAULTS, PPO_DEFAULTS, GRPOConfig, PPOConfig, TrainConfig
from ownllm.data.tasks import FAMILIES, Example, generate
from ownllm.errors import OwnLLMError
from ownllm.inference.engine import Engine, SamplingParams
from ownllm.model import GPT
from ownllm.data.grounded import is_refusal
from ownllm.train.objectives import (AdaptiveKL, gae, group_advantages, kl_penalty, masked_mean, ppo_policy_loss,
                                     ppo_value_loss, whiten)
from ownllm.train.preference import (answer_lengths, begin, completion_logps, load_reward_model, open_run, stage_config,
                                     stage_train_config)
from ownllm.train.trainer import Trainer

_INT = re.compile(r"-?\d+")


# -- rollouts ----------------------------------------------------------------------------------------
@dataclass
class Rollout:
    x: torch.Tensor            # (B, L) prompt + answer, right-padded
    prompt_len: torch.Tensor   # (B,)
    tokens: torch.Tensor       # (B, R) answer tokens, left-aligned, pad after
    mask: torch.Tensor         # (B, R) 1 on answer tokens
    has_end: torch.Tensor      # (B,) the answer ended its turn
    texts: list[str]           # answers as text (without the end-of-turn token)

    def rows(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(self.x[idx], self.prompt_len[idx], self.tokens[idx], self.mask[idx], self.has_end[idx],
                       [self.texts[i] for i in idx.tolist()])


def rollout(model: GPT, tok, prompts: list[list[int]], params: SamplingParams) -> Rollout:
    """Sample one answer per prompt with the KV-cache engine (left-padded batch)."""
    outs = Engine(model, tok.pad_id).generate(prompts, params)
    model.train()
    stops = set(params.stop_ids)
    B, R = len(prompts), max(1, max(len(o) for o in outs))
    L = max(len(p) + len(o) for p, o in zip(prompts, outs))
    x = torch.full((B, L), tok.pad_id, dtype=torch.long)
    tokens = torch.full((B, R), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(B, R)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        x[i, : len(p) + len(o)] = torch.tensor(p + o)
        tokens[i, : len(o)] = torch.tensor(o, dtype=torch.long)
        mask[i, : len(o)] = 1
    has_end = torch.tensor([bool(o) and o[-1] in stops for o in outs])
    texts = [tok.decode([t for t in o if t not in stops]).strip() for o in outs]
    return Rollout(x, torch.tensor([len(p) for p in prompts]), tokens, mask, has_end, texts)


def answer_stats(model: GPT, ro: Rollout, values: bool = False) -> dict:
    """Per answer token: log π(token), entropy of π, and (values=True) the value head's V, read at
    the position that predicts the token; the LM head runs on answer positions only."""
    h = model.hidden_states(ro.x)
    R = ro.tokens.shape[1]
    at = (ro.prompt_len[:, None] - 1 + torch.arange(R)[None]).clamp(max=ro.x.shape[1] - 1)
    h = torch.gather(h, 1, at[..., None].expand(-1, -1, h.shape[-1]))
    logp_all = F.log_softmax(model.lm_head(h).float(), -1)
    out = {"logp": torch.gather(logp_all, 2, ro.tokens[..., None]).squeeze(-1),
           "entropy": -(logp_all.exp() * logp_all).sum(-1)}
    if values:
        out["values"] = model.score(h).squeeze(-1).float()
    return out


def last_token_scores(reward_model: GPT, ro: Rollout) -> torch.Tensor:
    """The reward model's score of each rollout (GPT.rewards: its head at the answer's last token,
    plus, for a likelihood reward model, the gated log-likelihood of the answer's tokens)."""
    n = ro.mask.sum(1).long()
    pos = torch.arange(ro.x.shape[1])[None]
    answer = (pos >= ro.prompt_len[:, None]) & (pos < (ro.prompt_len + n)[:, None])
    with torch.no_grad():
        return reward_model.rewards(ro.x, answer.float(), ro.prompt_len + n - 1)


class Verifier:
    """Reward 1 for an answer that ended its turn and equals the task's reference answer exactly;
    for a prompt with no answer the reference is a refusal, and any refusal counts. With
    partial_credit > 0 a wrong number whose reference is a number earns partial_credit × the share
    of its digits that are right (aligned from the units): a denser signal where exact answers are
    rare at first (units digits come before carries), still maximal only for the exact answer."""

    def __init__(self, spec: str, partial_credit: float = 0.0):
        self.partial_credit = partial_credit
        name = spec.split(":", 1)[1]
        self.families = list(FAMILIES) if name == "tasks" else [f for f in name.split("+") if f]
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise OwnLLMError(f"--reward {spec}: unknown task family {sorted(unknown)} "
                              f"(verifier:tasks or verifier:{'+'.join(list(FAMILIES)[:2])}…; families: {', '.join(FAMILIES)})")

    def __call__(self, examples: list[Example], ro: Rollout) -> torch.Tensor:
        scores = [1.0 if ok else self.partial_credit * digit_share(t, ex.answer)
                  for ex, t, ok in zip(examples, ro.texts, exact(examples, ro))]
        return torch.tensor(scores) * ro.has_end.float()


def digit_share(text: str, answer: str) -> float:
    """Share of right digits, aligned from the units, of a numeric `text` against a numeric answer
    (0 when either is not a plain integer); the longer length is the denominator."""
    if not (_INT.fullmatch(text) and _INT.fullmatch(answer)):
        return 0.0
    a, b = text.lstrip("-")[::-1], answer.lstrip("-")[::-1]
    same_sign = text.startswith("-") == answer.startswith("-")
    return same_sign * sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))


def exact(examples: list[Example], ro: Rollout) -> list[bool]:
    return [t == ex.answer or (is_refusal(ex.answer) and is_refusal(t)) for ex, t in zip(examples, ro.texts)]


def prompt_ids(tok, examples: list[Example], max_len: int) -> list[list[int]]:
    return [tok.user_turn(ex.prompt)[-max_len:]
            for ex in examples]


class KLState:
    """The adaptive KL coefficient as checkpointable state (Trainer aux)."""

    def __init__(self, ctl: AdaptiveKL):
        self.ctl = ctl

    def state_dict(self) -> dict:
        return {"kl_coef": self.ctl.coef}

    def load_state_dict(self, state: dict) -> None:
        self.ctl.coef = float(state["kl_coef"])


class RolloutBuffer:
    """Minibatches of one scored rollout, for `epochs` passes; refilled by `refill(gen)` when empty."""

    def __init__(self, refill, epochs: int, minibatches: int, extra=None):
        self.refill, self.epochs, self.minibatches, self.extra = refill, epochs, minibatches, extra
        self.queue: list[dict] = []
        self.stats: dict = {}

    def next_batch(self, gen: torch.Generator) -> dict:
        if not self.queue:
            data = self.refill(gen)
            B = len(data["ro"].texts)
            for _ in range(self.epochs):
                order = torch.randperm(B, generator=gen)
                for idx in order.chunk(self.minibatches):
                    mb = {k: (v.rows(idx) if isinstance(v, Rollout) else v[idx]) for k, v in data.items()}
                    self.queue.append({**mb, **(self.extra(gen) if self.extra else {})})
        return self.queue.pop(0)


def _pool(cfg_n: int, families: list[str] | None, seed: int) -> list[Example]:
    from ownllm.data.preferences import preference_prompts

    return generate(cfg_n, "train", seed=seed, families=families) if families else preference_prompts(cfg_n, "train", seed)


def _draw(pool: list[Example], n: int, gen: torch.Generator) -> list[Example]:
    return [pool[i] for i in torch.randint(0, len(pool), (n,), generator=gen).tolist()]


def _params(max_new_tokens: int, temperature: float, tok, gen: torch.Generator) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=None, top_p=None,
                          seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)), stop_ids=tok.stop_ids)


def _with_reward(cfg, reward: str | None):
    """The stage config with --reward applied when given."""
    return dataclasses.replace(cfg, reward=reward) if reward else cfg


def _frozen_reference(start) -> GPT:
    """The starting policy, frozen: the reference the KL is measured against."""
    ref = load_model(start)
    ref.requires_grad_(False)
    return ref


# -- PPO ---------------------------------------------------------------------------------------------
def train_ppo(policy, out, reward: str | None = None, tcfg: TrainConfig | None = None, pcfg: PPOConfig | None = None,
              resume=False, overwrite=False, progress=True, stop_at_step=None, log=print) -> dict:
    defaults = stage_train_config(PPO_DEFAULTS)
    model, tok, tcfg, start, saved = open_run(policy, out, tcfg or defaults, defaults, resume, overwrite, score_head=True)
    pcfg = stage_config(PPOConfig, saved, _with_reward(pcfg or PPOConfig(), reward))
    if not pcfg.reward:
        raise OwnLLMError("ppo needs --reward RUN (a reward model from `ownllm reward`)")
    if pcfg.kl_estimator not in ("k1", "k3"):
        raise OwnLLMError(f"--kl-estimator {pcfg.kl_estimator!r}: expected k1 or k3")
    rm = load_reward_model(pcfg.reward)
    ref = _frozen_reference(start)
    pool = _pool(pcfg.n_prompts, None, tcfg.seed)
    ctx = model.config.max_seq_len - pcfg.max_new_tokens
    kl = KLState(AdaptiveKL(pcfg.kl_coef, pcfg.target_kl, pcfg.kl_horizon))
    extra = _ptx_batches(tok, model.config.max_seq_len, tcfg, pcfg, start, log) if pcfg.ptx_coef else None
    if not resume:
        begin(out, tok, model, tcfg, overwrite, start, pcfg)
    stats: dict = {}

    def refill(gen):
        examples = _draw(pool, tcfg.batch_size, gen)
        ro = rollout(model, tok, prompt_ids(tok, examples, ctx), _params(pcfg.max_new_tokens, pcfg.temperature, tok, gen))
        with torch.no_grad():
            old = answer_stats(model, ro, values=True)
            ref_logp = answer_stats(ref, ro)["logp"]
        score = last_token_scores(rm, ro)
        penalised = score - pcfg.missing_end_penalty * (~ro.has_end).float()
        final = whiten(penalised) if pcfg.whiten_rewards and len(penalised) > 1 else penalised
        token_kl = kl_penalty(old["logp"], ref_logp, pcfg.kl_estimator) * ro.mask
        rewards = -kl.ctl.coef * token_kl
        last = (ro.mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += final
        adv, returns = gae(rewards, old["values"] * ro.mask, ro.mask, pcfg.gamma, pcfg.lam)
        adv = whiten(adv, ro.mask) * ro.mask
        seq_kl = float(token_kl.sum(1).mean())
        stats.update(reward=float(score.mean()), kl=seq_kl, kl_coef=kl.ctl.coef,
                     exact_match=sum(exact(examples, ro)) / len(examples), ended=float(ro.has_end.float().mean()),
                     answer_tokens=float(ro.mask.sum(1).mean()))
        kl.ctl.update(seq_kl, len(examples))
        return {"ro": ro, "old_logp": old["logp"], "old_values": old["values"], "adv": adv, "returns": returns}

    def loss_fn(m, mb):
        ro = mb["ro"]
        now = answer_stats(m, ro, values=True)
        pg, clipfrac = ppo_policy_loss(now["logp"], mb["old_logp"], mb["adv"], ro.mask, pcfg.clip)
        vf = ppo_value_loss(now["values"], mb["old_values"], mb["returns"], ro.mask, pcfg.value_clip)
        stats.update(policy_loss=float(pg.detach()), value_loss=float(vf.detach()), clipfrac=float(clipfrac),
                     entropy=float(masked_mean(now["entropy"].detach(), ro.mask)))
        loss = pg + pcfg.vf_coef * vf
        if "ptx" in mb:
            nll = -(completion_logps(m, mb["ptx"]) / answer_lengths(mb["ptx"]).clamp(min=1)).mean()
            stats["ptx_nll"] = float(nll.detach())
            loss = loss + pcfg.ptx_coef * nll
        return loss, torch.tensor(1.0)

    buffer = RolloutBuffer(refill, pcfg.ppo_epochs, pcfg.minibatches, extra)
    log(f"ppo: reward model {pcfg.reward}, {tcfg.batch_size} answers per rollout, {pcfg.ppo_epochs} epochs × "
        f"{pcfg.minibatches} minibatches, KL coef {kl.ctl.coef} ({pcfg.kl_estimator}"
        f"{f', adaptive to {pcfg.target_kl}' if pcfg.target_kl else ', fixed'})")
    trainer = Trainer(model, tcfg, out, buffer.next_batch, loss_fn, resume=resume, progress=progress,
                      step_stats=lambda: dict(stats), aux=kl,
                      plots={"reward": ("reward",), "kl": ("kl",), "entropy": ("entropy",), "clipfrac": ("clipfrac",)})
    return trainer.run(stop_at_step=stop_at_step)


def _ptx_batches(tok, max_len: int, tcfg, pcfg: PPOConfig, start, log):
    """A sampler of `ptx_batch` preferred answers (prompt + chosen, loss on the answer) from --data:
    the policy pairs' chosen side where the data has policy pairs, else every pair's."""
    from ownllm.data.chat import collate_padded, encode_conversations
    from ownllm.train.pairs import load_pairs

    pairs = load_pairs(tcfg.data, run=start, n_prompts=pcfg.ptx_prompts, seed=tcfg.seed, log=log)
    pairs = [p for p in pairs if p.on_policy] or pairs
    best = {(p.prompt, p.chosen): p for p in pairs}.values()   # each preferred answer once
    ex = encode_conversations(tok, [p.messages(p.chosen) for p in best], max_len)
    log(f"ppo-ptx: {len(ex):,} preferred answers, {pcfg.ptx_batch} per minibatch, coef {pcfg.ptx_coef}")

    def extra(gen: torch.Generator) -> dict:
        return {"ptx": collate_padded(ex, torch.randint(0, len(ex), (pcfg.ptx_batch,), generator=gen).tolist(), tok.pad_id)}
    return extra


# -- GRPO --------------------------------------------------------------------------------------------
def train_grpo(policy, out, reward: str | None = None, tcfg: TrainConfig | None = None, gcfg: GRPOConfig | None = None,
               resume=False, overwrite=False, progress=True, stop_at_step=None, log=print) -> dict:
    defaults = stage_train_config(GRPO_DEFAULTS)
    model, tok, tcfg, start, saved = open_run(policy, out, tcfg or defaults, defaults, resume, overwrite)
    gcfg = stage_config(GRPOConfig, saved, _with_reward(gcfg or GRPOConfig(), reward))
    if gcfg.num_generations < 2:
        raise OwnLLMError("--num-generations must be >= 2 (advantages compare answers within a group)")
    if gcfg.reward.startswith("verifier:"):
        verifier = Verifier(gcfg.reward, gcfg.partial_credit)
        pool = _pool(gcfg.n_prompts, verifier.families, tcfg.seed)
        score_fn = verifier
    else:
        rm = load_reward_model(gcfg.reward)
        pool = _pool(gcfg.n_prompts, None, tcfg.seed)
        score_fn = lambda examples, ro: last_token_scores(rm, ro)  # noqa: E731
    ref = _frozen_reference(start)
    ctx = model.config.max_seq_len - gcfg.max_new_tokens
    G = gcfg.num_generations
    if not resume:
        begin(out, tok, model, tcfg, overwrite, start, gcfg)
    stats: dict = {}

    def refill(gen):
        examples = [ex for ex in _draw(pool, tcfg.batch_size, gen) for _ in range(G)]
        ro = rollout(model, tok, prompt_ids(tok, examples, ctx), _params(gcfg.max_new_tokens, gcfg.temperature, tok, gen))
        rewards = score_fn(examples, ro)
        adv = group_advantages(rewards.view(-1, G)).view(-1)
        with torch.no_grad():
            old_logp = answer_stats(model, ro)["logp"]
            ref_logp = answer_stats(ref, ro)["logp"]
        stats.update(reward=float(rewards.mean()), exact_match=sum(exact(examples, ro)) / len(examples),
                     kl=float((kl_penalty(old_logp, ref_logp, "k1") * ro.mask).sum(1).mean()),
                     groups_with_signal=float((rewards.view(-1, G).std(1) > 0).float().mean()),
                     answer_tokens=float(ro.mask.sum(1).mean()))
        return {"ro": ro, "old_logp": old_logp, "ref_logp": ref_logp, "adv": adv}

    def loss_fn(m, mb):
        ro = mb["ro"]
        now = answer_stats(m, ro)
        ratio = torch.exp(now["logp"] - mb["old_logp"])
        adv = mb["adv"][:, None]
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - gcfg.clip, 1 + gcfg.clip) * adv)
        if gcfg.beta:
            per_token = per_token + gcfg.beta * kl_penalty(now["logp"], mb["ref_logp"], gcfg.kl_estimator)
        loss = masked_mean(per_token, ro.mask, dim=1).mean()   # each answer weighs the same
        clipped = ((ratio - 1).abs() > gcfg.clip).float()
        stats.update(clipfrac=float(masked_mean(clipped, ro.mask)), entropy=float(masked_mean(now["entropy"].detach(), ro.mask)))
        return loss, torch.tensor(1.0)

    buffer = RolloutBuffer(refill, gcfg.epochs, 1)
    log(f"grpo: reward {gcfg.reward}, {tcfg.batch_size} prompts × {G} answers per step, beta {gcfg.beta}")
    trainer = Trainer(model, tcfg, out, buffer.next_batch, loss_fn, resume=resume, progress=progress,
                      step_stats=lambda: dict(stats),
                      plots={"reward": ("reward", "exact_match"), "kl": ("kl",), "entropy": ("entropy",)})
    return trainer.run(stop_at_step=stop_at_step)
