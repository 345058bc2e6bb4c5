"""Learning from preference pairs: the reward model (Bradley–Terry) and DPO (+ IPO, hinge).

Where it sits: `ownllm reward --base runs/sft --data prefs --out runs/rm` trains the SFT
transformer with a scalar head — plus, by default, its own gated log-likelihood of the answer
(GPT.rewards) — so that r(chosen) > r(rejected); PPO and GRPO then optimise against it.
`ownllm dpo --policy runs/sft --data prefs --out runs/dpo` skips the reward model: it raises the
policy's log-probability margin of chosen over rejected relative to the reference (the SFT model),
whose log-probs are computed once before training, so no second model stays in memory.
Both run on the shared Trainer (checkpoints, resume, metrics.jsonl, plots, progress bar) and read
pairs from data/preferences.py; the hidden rule that produced the bundled pairs is never seen here.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ownllm.checkpoint import load_model_config, load_start_weights, refuse_overwrite, resumed_train_config, start_run
from ownllm.config import (DPO_DEFAULTS, LORA_ALPHA, REWARD_DEFAULTS, DPOConfig, RewardConfig, TrainConfig, from_json_dict,
                           read_json)
from ownllm.data.chat import ChatExamples, collate_padded
from ownllm.data.preferences import Pair
from ownllm.data.tasks import prompt_bucket
from ownllm.errors import OwnLLMError
from ownllm.lora import freeze_base
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer
from ownllm.train.objectives import bradley_terry_loss, dpo_loss, target_logits
from ownllm.train.trainer import Trainer

STAGE_FILE = "stage_config.json"


def stage_train_config(defaults: dict, **overrides) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **{**defaults, **overrides})


# -- pairs as tensors -----------------------------------------------------------------------------
def encode_pairs(tok: Tokenizer, pairs: list[Pair], max_len: int) -> tuple[ChatExamples, list[Pair]]:
    """Rendered conversations, chosen then rejected for each kept pair (rows 2i and 2i+1); pairs
    whose longer side exceeds max_len tokens are dropped (counted in `.dropped`)."""
    ex, kept = ChatExamples([], []), []
    for p in pairs:
        rows = [tok.render(p.messages(a)) for a in (p.chosen, p.rejected)]
        if max(len(r.ids) for r in rows) > max_len:
            ex.dropped += 1
            continue
        for r in rows:
            ex.ids.append(np.asarray(r.ids, dtype=np.int64))
            ex.masks.append(np.asarray(r.mask, dtype=np.int8))
        kept.append(p)
    return ex, kept


def reward_batch(ex: ChatExamples, pair_idx: list[int], pad_id: int) -> dict:
    return sequence_batch(ex, [2 * i + k for i in pair_idx for k in (0, 1)], pad_id)


def sequence_batch(ex: ChatExamples, rows: list[int], pad_id: int) -> dict:
    """Rows of `ex` right-padded, their answer masks, and the index of each one's last token
    (where the reward head is read)."""
    L = max(len(ex.ids[r]) for r in rows)
    x = np.full((len(rows), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=np.float32)
    for j, r in enumerate(rows):
        x[j, : len(ex.ids[r])] = ex.ids[r]
        mask[j, : len(ex.masks[r])] = ex.masks[r]
    return {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask),
            "last": torch.tensor([len(ex.ids[r]) - 1 for r in rows])}


def load_reward_model(run) -> GPT:
    """A reward-model run (from `ownllm reward`), frozen; a clear error for any other run."""
    from ownllm.checkpoint import load_model

    if not (Path(run) / "config.json").is_file():
        raise OwnLLMError(f"{run}: not a run directory (expected a reward model from `ownllm reward`)")
    rm = load_model(run)
    if not rm.config.score_head:
        raise OwnLLMError(f"{run}: not a reward model (its config has no score head; train one with `ownllm reward`)")
    return rm.requires_grad_(False)


def sequence_rewards(model: GPT, batch: dict) -> torch.Tensor:
    return model.rewards(batch["x"], batch["mask"], batch["last"])


def completion_logps(model: GPT, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's assistant tokens (targets ≠ −100), in fp32; the LM head
    runs on those positions only (the prompt's logits are never needed)."""
    logits, y, keep = target_logits(model, batch)
    logp = torch.gather(F.log_softmax(logits.float(), -1), 1, y[:, None]).squeeze(1)
    return torch.zeros(keep.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, keep.nonzero()[:, 0], logp)


def answer_lengths(batch: dict) -> torch.Tensor:
    return (batch["y"] != -100).sum(-1)


# -- run set-up shared by the preference and RL stages ---------------------------------------------
def open_run(start: str | Path | None, out: str | Path, tcfg: TrainConfig, defaults: TrainConfig, resume: bool,
             overwrite: bool, score_head: bool = False, lora_rank: int = 0, lora_alpha: float = LORA_ALPHA,
             score_likelihood: bool = False, lora_layers: int = 0):
    """(model with the start run's weights or the resumed ones, tokenizer, train config, start run).
    A fresh run keeps the starting run's model config, adding a scalar head or LoRA adapters.
    These stages run in one process on the CPU (their rollouts, reference and reward models are
    built there); pretrain and sft are the ones that use a GPU and torchrun."""
    from ownllm.train.distributed import current

    if current().distributed:
        raise OwnLLMError("reward, dpo, ppo and grpo train in one process; start them without torchrun "
                          "(pretrain and sft take several)")
    if tcfg.device not in ("auto", "cpu"):
        raise OwnLLMError(f"--set device={tcfg.device}: reward, dpo, ppo and grpo train on the CPU for now")
    tcfg = dataclasses.replace(tcfg, device="cpu")
    out = Path(out)
    if resume:
        tcfg = dataclasses.replace(resumed_train_config(out, tcfg, defaults=defaults), device="cpu")
        saved = read_json(out / STAGE_FILE)
        start = saved.get("start", start)
        mcfg, tok = load_model_config(out), Tokenizer.load(out)
        model = GPT(mcfg)
        return model, tok, tcfg, Path(start), saved
    if start is None:
        raise OwnLLMError("give the run to start from")
    start = Path(start)
    refuse_overwrite(out, overwrite)
    mcfg = dataclasses.replace(load_model_config(start), score_head=score_head, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_layers=lora_layers, score_likelihood=score_likelihood)
    tok = Tokenizer.load(start)
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg)
    load_start_weights(model, start)
    return model, tok, tcfg, start, {}


def begin(out, tok, model, tcfg, overwrite: bool, start, stage_cfg, extra: dict | None = None) -> None:
    """Lay the run directory down (only after every input was read and validated)."""
    from ownllm.checkpoint import commit_files

    start_run(out, tok, model.config, tcfg, overwrite)
    commit_files(out, {STAGE_FILE: json.dumps({"start": str(start), **(extra or {}),
                                               "config": dataclasses.asdict(stage_cfg)}, indent=2).encode()})


def stage_config(cls, saved: dict, given, before: dict | None = None):
    """The stage dataclass saved in the run (resume) or the one given. `before`: for a field added
    since, the value a run saved without it used, so that it resumes as it began."""
    if not saved:
        return given or cls()
    missing = {k: v for k, v in (before or {}).items() if k not in saved["config"]}
    return dataclasses.replace(from_json_dict(cls, saved["config"]), **missing)


# what a run saved before max_val_pairs existed used: every held-out pair scored (its curves stay one series)
PAIR_STAGE_BEFORE = {"max_val_pairs": 0}


def _held_out(prompt: str) -> bool:
    """1 prompt in 10 by a salted hash: held out of a file that has no test-split prompts."""
    return prompt_bucket("held-out:" + prompt) == 0


def _split_pairs(pairs: list[Pair], log=print) -> tuple[list[Pair], list[Pair]]:
    """User files: held-out pairs are those whose prompt falls in the task suite's test bucket; a
    file with none (e.g. `data prefs` of the train split) holds out the pairs of 1 prompt in 10.
    Either way no held-out prompt is trained on. A file too small for that scores training pairs."""
    for held in (lambda q: prompt_bucket(q) == 0, _held_out):
        val = [p for p in pairs if held(p.prompt[-1][1])]
        train = [p for p in pairs if not held(p.prompt[-1][1])]
        if train and val:
            return train, val
    log(f"{len(pairs)} pairs: too few prompts to hold any out; the held-out scores are on training pairs")
    return pairs, pairs[: max(1, len(pairs) // 20)]


def training_pairs(tcfg, n_prompts: int, val_prompts: int, start, log) -> tuple[list[Pair], list[Pair]]:
    from ownllm.train.pairs import load_pairs, preference_pairs

    pairs = load_pairs(tcfg.data, run=start, n_prompts=n_prompts, seed=tcfg.seed, log=log)
    if tcfg.data == "prefs":
        return pairs, preference_pairs(val_prompts, "test", run=start, seed=0, progress=False)
    return _split_pairs(pairs, log)


def at_most(val_pairs: list[Pair], n: int, log) -> list[Pair]:
    """The held-out pairs scored at each evaluation: all, or a seeded sample of `n` (in file order);
    the rest stay held out, never trained on."""
    if n <= 0 or len(val_pairs) <= n:
        return val_pairs
    keep = sorted(random.Random(0).sample(range(len(val_pairs)), n))
    log(f"held-out pairs: scoring {n:,} of {len(val_pairs):,} at each evaluation (--set max_val_pairs=N)")
    return [val_pairs[i] for i in keep]


def pair_batcher(n_pairs: int, batch_size: int, make):
    def next_batch(gen: torch.Generator):
        return make(torch.randint(0, n_pairs, (batch_size,), generator=gen).tolist())
    return next_batch


# -- reward model ----------------------------------------------------------------------------------
def reward_step(rcfg: RewardConfig):
    def loss_fn(model, batch):
        r = sequence_rewards(model, batch)
        return bradley_terry_loss(r[0::2], r[1::2], rcfg.margin, rcfg.center_coef).sum(), torch.tensor(len(r) // 2)
    return loss_fn


def all_rewards(model: GPT, ex: ChatExamples, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """The reward of every row of `ex`, in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([sequence_rewards(model, sequence_batch(ex, list(range(b, min(b + batch_size, len(ex)))), pad_id))
                          for b in range(0, len(ex), batch_size)] or [torch.zeros(0)])


def reward_accuracy(model: GPT, ex: ChatExamples, pad_id: int, batch_size: int = 32) -> dict:
    """Held-out pairwise accuracy (r_chosen > r_rejected), and the reward statistics."""
    r = all_rewards(model, ex, pad_id, batch_size)
    chosen, rejected = r[0::2], r[1::2]
    correct = (chosen > rejected).tolist()
    n = max(len(correct), 1)
    return {"val_pair_accuracy": sum(correct) / n, "val_reward_gap": float((chosen - rejected).sum()) / n,
            "val_reward_mean": float(r.sum()) / max(len(r), 1), "correct": correct}


def train_reward(base, out, tcfg: TrainConfig | None = None, rcfg: RewardConfig | None = None, resume=False,
                 overwrite=False, progress=True, stop_at_step=None, log=print) -> dict:
    defaults = stage_train_config(REWARD_DEFAULTS)
    rcfg = rcfg or RewardConfig()
    model, tok, tcfg, start, saved = open_run(base, out, tcfg or defaults, defaults, resume, overwrite, score_head=True,
                                              score_likelihood=rcfg.likelihood)
    rcfg = stage_config(RewardConfig, saved, rcfg, PAIR_STAGE_BEFORE)
    train_pairs, val_pairs = training_pairs(tcfg, rcfg.n_prompts, rcfg.val_prompts, start, log)
    val_pairs = at_most(val_pairs, rcfg.max_val_pairs, log)
    ex, kept = encode_pairs(tok, train_pairs, model.config.max_seq_len)
    val_ex, _ = encode_pairs(tok, val_pairs, model.config.max_seq_len)
    if not kept:
        raise OwnLLMError(f"--data {tcfg.data}: no pair fits the context of {model.config.max_seq_len} tokens")
    if not resume:  # a resumed run's weights are restored by the Trainer
        begin(out, tok, model, tcfg, overwrite, start, rcfg)
    log(f"reward model: {len(kept):,} train / {len(val_ex) // 2:,} held-out pairs"
        f"{f' ({ex.dropped} too long, dropped)' if ex.dropped else ''}")

    def evaluate(m):
        res = reward_accuracy(m, val_ex, tok.pad_id)
        res.pop("correct")
        return res

    trainer = Trainer(model, tcfg, out, pair_batcher(len(kept), tcfg.batch_size, lambda i: reward_batch(ex, i, tok.pad_id)),
                      reward_step(rcfg), evaluate=evaluate, resume=resume, progress=progress,
                      plots={"pair_accuracy": ("val_pair_accuracy",)})
    return trainer.run(stop_at_step=stop_at_step)


# -- DPO -------------------------------------------------------------------------------------------
def all_completion_logps(model: GPT, ex: ChatExamples, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Summed completion log-probs of every row of `ex` under the model as it is now, without
    gradients (DPO: the reference, once before training; `eval prefs`: the KL estimate)."""
    with torch.no_grad():
        return torch.cat([completion_logps(model, collate_padded(ex, list(range(b, min(b + batch_size, len(ex)))), pad_id))
                          for b in range(0, len(ex), batch_size)] or [torch.zeros(0)])


def dpo_batch(ex: ChatExamples, ref: torch.Tensor, pair_idx: list[int], pad_id: int) -> dict:
    rows = [2 * i + k for i in pair_idx for k in (0, 1)]
    return {**collate_padded(ex, rows, pad_id), "ref": ref[rows]}


def dpo_step(dcfg: DPOConfig):
    def loss_fn(model, batch):
        pi = completion_logps(model, batch)
        ref = batch["ref"]
        loss = dpo_loss(pi[0::2], pi[1::2], ref[0::2], ref[1::2], dcfg.beta, dcfg.loss, dcfg.dpop)
        if dcfg.nll_coef:
            loss = loss - dcfg.nll_coef * pi[0::2] / answer_lengths(batch)[0::2].clamp(min=1)
        return loss.sum(), torch.tensor(len(pi) // 2)
    return loss_fn


def dpo_accuracy(model, ex, ref, pad_id, beta, batch_size: int = 32) -> dict:
    """Held-out implicit-reward accuracy: β·(log π − log ref) higher for chosen than rejected; how
    far each side's summed log-prob moved from the reference (means); and the share of chosen
    answers now less likely than under the reference. DPO only widens the gap, and can do so by
    lowering both sides (likelihood displacement: the mass goes to answers that are neither);
    accuracy alone does not show that, these do (and `dpop` > 0 counts against it)."""
    pi = all_completion_logps(model, ex, pad_id, batch_size)
    d = pi - ref
    r = beta * d
    return {"val_reward_accuracy": float((r[0::2] > r[1::2]).float().mean()),
            "val_reward_margin": float((r[0::2] - r[1::2]).mean()),
            "val_chosen_logp_shift": float(d[0::2].mean()), "val_rejected_logp_shift": float(d[1::2].mean()),
            "val_chosen_fell": float((d[0::2] < 0).float().mean())}


def train_dpo(policy, out, tcfg: TrainConfig | None = None, dcfg: DPOConfig | None = None, lora_rank: int = 0,
              lora_alpha: float = LORA_ALPHA, lora_layers: int = 0, resume=False, overwrite=False, progress=True,
              stop_at_step=None, log=print) -> dict:
    defaults = stage_train_config(DPO_DEFAULTS)
    model, tok, tcfg, start, saved = open_run(policy, out, tcfg or defaults, defaults, resume, overwrite,
                                              lora_rank=lora_rank, lora_alpha=lora_alpha, lora_layers=lora_layers)
    dcfg = stage_config(DPOConfig, saved, dcfg, {**PAIR_STAGE_BEFORE, "dpop": 0.0})  # dpop 0: begun before DPO-Positive
    if dcfg.loss not in ("sigmoid", "ipo", "hinge"):
        raise OwnLLMError(f"--loss {dcfg.loss!r}: expected sigmoid, ipo or hinge")
    train_pairs, val_pairs = training_pairs(tcfg, dcfg.n_prompts, dcfg.val_prompts, start, log)
    if dcfg.pairs not in ("auto", "all", "on_policy"):
        raise OwnLLMError(f"--set pairs={dcfg.pairs!r}: expected auto, all or on_policy")
    if dcfg.pairs == "on_policy" or (dcfg.pairs == "auto" and any(p.on_policy for p in train_pairs)):
        train_pairs, val_pairs = [p for p in train_pairs if p.on_policy], [p for p in val_pairs if p.on_policy]
        log(f"on-policy pairs only: {len(train_pairs):,} train / {len(val_pairs):,} held-out")
        if not train_pairs or not val_pairs:
            raise OwnLLMError(f"--data {tcfg.data}: no on-policy pairs (records with \"on_policy\": true)")
    val_pairs = at_most(val_pairs, dcfg.max_val_pairs, log)
    ex, kept = encode_pairs(tok, train_pairs, model.config.max_seq_len)
    val_ex, _ = encode_pairs(tok, val_pairs, model.config.max_seq_len)
    if not kept:
        raise OwnLLMError(f"--data {tcfg.data}: no pair fits the context of {model.config.max_seq_len} tokens")
    # the reference is the starting policy: its log-probs, once, before any update (on resume they
    # come from the start run's weights, loaded into a temporary model)
    ref_model = model if not resume else GPT(model.config.without_lora())
    if resume:
        load_start_weights(ref_model, start)
    ref, val_ref = all_completion_logps(ref_model, ex, tok.pad_id), all_completion_logps(ref_model, val_ex, tok.pad_id)
    del ref_model
    if not resume:
        begin(out, tok, model, tcfg, overwrite, start, dcfg)
    trainable, total = freeze_base(model) if model.config.lora_rank else (sum(p.numel() for p in model.parameters()),) * 2
    log(f"dpo ({dcfg.loss}, beta {dcfg.beta}): {len(kept):,} train / {len(val_ex) // 2:,} held-out pairs, "
        f"{trainable:,} of {total:,} parameters trainable")
    trainer = Trainer(model, tcfg, out, pair_batcher(len(kept), tcfg.batch_size,
                                                     lambda i: dpo_batch(ex, ref, i, tok.pad_id)),
                      dpo_step(dcfg), evaluate=lambda m: dpo_accuracy(m, val_ex, val_ref, tok.pad_id, dcfg.beta),
                      resume=resume, progress=progress,
                      plots={"reward_accuracy": ("val_reward_accuracy",),
                             "logp_shift": ("val_chosen_logp_shift", "val_rejected_logp_shift")})
    result = trainer.run(stop_at_step=stop_at_step)
    return {**result, "trainable_params": trainable, "total_params": total}
