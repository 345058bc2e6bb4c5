"""Training objectives as small pure functions (tests call them directly).

Where it sits: the Trainer calls `loss_fn(model, batch)`; each stage picks one of these. Losses
are returned as (sum, count) so the Trainer can weigh every target token equally across
micro-batches; evaluation sums the same quantity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ownllm.train.distributed import on_model_device


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL in nats, number of targets), in fp32; targets of -100 are ignored."""
    total = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, (targets != -100).sum()


def lm_step(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction on (inputs, targets)."""
    x, y = batch
    return summed_nll(model(x), y)


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Total NLL in nats → bits per UTF-8 byte: comparable across tokenizers."""
    return nll_nats / (math.log(2) * n_bytes)


# -- preference learning and RL (ownllm reward | dpo | ppo | grpo) ------------------------------
# Shapes: per-sequence tensors are (B,); per-token tensors are (B, T) with a 0/1 `mask` marking
# response tokens. Every function is pure: tests check them against hand-computed values.

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (the mean is kept when shift_mean=False)."""
    if mask is None:
        mask = torch.ones_like(x)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss −log σ(r_c − r_r − margin), plus center_coef·(r_c + r_r)² which
    keeps rewards centred on zero (the loss alone only fixes differences)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, kind: str = "sigmoid", dpop: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family loss from summed completion log-probs under the policy and the reference.
    h = (π_c − π_r) − (ref_c − ref_r) − dpop·max(0, ref_c − π_c); sigmoid (DPO): −log σ(βh);
    ipo: (h − 1/(2β))²; hinge: max(0, 1 − βh). `dpop` > 0 is DPO-Positive (Pal et al., 2024): the
    margin counts against the pair whenever the chosen answer has become less likely than under
    the reference, which plain DPO allows (it only widens the gap, and on pairs that differ in a
    few tokens it often does so by lowering both)."""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if dpop:
        h = h - dpop * torch.relu(ref_chosen - pi_chosen)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown DPO loss {kind!r} (sigmoid, ipo, hinge)")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖ref) from tokens sampled from π. k1 = log π − log ref (unbiased,
    can be negative); k3 = (r − 1) − log r with r = ref/π (unbiased, never negative, lower variance)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k3)")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (mask = 1 on a row's tokens, which
    are left-aligned). Returns (advantages, returns = advantages + values); zero outside the mask.
    δ_t = r_t + γ V_{t+1} − V_t (V past the last token is 0); A_t = δ_t + γλ A_{t+1}."""
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):  # T is the response length (tens of tokens): a short loop over time
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate −min(ρA, clip(ρ, 1±ε)A), ρ = π/π_old, averaged over response tokens;
    also the fraction of tokens where clipping was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²) over response tokens."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO: rewards (prompts, generations) → (r − group mean) / (group std + eps); a group whose
    answers all scored the same gets zero advantage (nothing to learn from it)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred


class AdaptiveKL:
    """KL coefficient that moves toward a target KL (Ziegler et al. 2019): β ← β·(1 + clip(e, ±0.2)·n/horizon)
    with e = KL/target − 1. With target None the coefficient stays fixed."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n_steps / self.horizon
        return self.coef


def target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, keep): the LM head applied only where a row has a target (keep = y ≠ −100).
    Answers are a few % of a chat row, and the vocabulary projection + log-softmax over every
    position was a quarter of an SFT step."""
    batch = on_model_device(batch, model)
    kwargs = {k: batch[k] for k in ("positions", "mask") if k in batch}
    keep = batch["y"] != -100
    return model.lm_head(model.hidden_states(batch["x"], **kwargs)[keep]), batch["y"][keep], keep


def masked_lm_step(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over target tokens, target count) for a chat batch (padded or packed); with
    per-token weights `w` (prompt loss), the weighted sum and the sum of weights."""
    logits, y, keep = target_logits(model, batch)  # (moves the batch to the model's device)
    if "w" not in batch:
        return summed_nll(logits, y)
    w = batch["w"].to(keep.device)[keep]  # 0 wherever there is no target, so nothing is lost by the selection
    return (F.cross_entropy(logits.float(), y, reduction="none") * w).sum(), w.sum()
