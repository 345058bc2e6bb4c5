"""Supervised fine-tuning: instruction → reference answer, loss on the answer only.

Where it sits: `ownllm sft --base runs/base --data tasks --out runs/sft` (full) or with
`--lora` (adapters only). Reads conversations (bundled task suite or JSONL in any supported
format), renders them with the chat template, trains with the shared Trainer (same
checkpoints, resume and metrics as pretraining) and writes a run directory that chat, eval
and later stages load like any other.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ownllm.checkpoint import load_model_config, load_start_weights, refuse_overwrite, resumed_train_config, start_run
from ownllm.config import LORA_ALPHA, LORA_LR, SFT_DEFAULTS, TrainConfig
from ownllm.data.chat import ChatExamples, collate_packed, collate_padded, encode_conversations
from ownllm.data.formats import read_chat_jsonl
from ownllm.errors import OwnLLMError
from ownllm.lora import freeze_base
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer
from ownllm.train.distributed import context
from ownllm.train.objectives import masked_lm_step
from ownllm.train.trainer import Trainer

def sft_config(lora: bool = False, **overrides) -> TrainConfig:
    """SFT's settings: SFT_DEFAULTS, LoRA's learning rate with `lora`, then `overrides`."""
    return dataclasses.replace(TrainConfig(), **{**SFT_DEFAULTS, **({"lr": LORA_LR} if lora else {}), **overrides})


def load_conversations(tcfg: TrainConfig, log=print) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, val) conversations from `tcfg.data`: 'tasks' or comma-separated JSONL files."""
    if tcfg.data == "tasks":
        from ownllm.data.tasks import ALL_FAMILIES, LANGS, generate, parse_weights

        try:
            weights = parse_weights(tcfg.task_weights)
        except ValueError as e:
            raise OwnLLMError(str(e)) from None
        if tcfg.task_lang not in (None, *LANGS):
            raise OwnLLMError(f"task_lang {tcfg.task_lang!r}: expected {', '.join(LANGS)} (or none for en and zh)")
        train = [e.messages() for e in generate(tcfg.task_examples, "train", seed=tcfg.seed, families=list(ALL_FAMILIES),
                                                weights=weights, lang=tcfg.task_lang)]
        val = [e.messages() for e in generate(200, "test", seed=0, families=list(ALL_FAMILIES), lang=tcfg.task_lang)]
        return train, val
    convs = []
    for path in [p.strip() for p in tcfg.data.split(",") if p.strip()]:
        data = read_chat_jsonl(path, tcfg.format, tcfg.skip_bad)
        if data.skipped:
            log(f"{path}: skipped {data.skipped} bad record(s), e.g. {data.errors[0]}")
        convs += data.conversations
    g = torch.Generator().manual_seed(tcfg.seed)
    order = torch.randperm(len(convs), generator=g).tolist()
    n_val = max(1, len(convs) // 50) if len(convs) >= 20 else 0
    val = [convs[i] for i in order[:n_val]]
    train = [convs[i] for i in order[n_val:]]
    return train, val or train[:1]


def examples_per_batch(ex: ChatExamples, tcfg: TrainConfig) -> int:
    """batch_size, or when packing, about as many examples as fill batch_size rows."""
    if not tcfg.pack:
        return tcfg.batch_size
    mean_len = sum(len(i) for i in ex.ids[:1000]) / min(len(ex), 1000)
    return max(1, int(tcfg.batch_size * tcfg.seq_len / mean_len))


def make_batcher(ex: ChatExamples, tcfg: TrainConfig, pad_id: int, n_packed: int):
    # packed: draw n_packed examples (examples_per_batch: enough to fill batch_size rows); rows past
    # batch_size are dropped
    def next_batch(gen: torch.Generator) -> dict:
        if not tcfg.pack:
            idx = torch.randint(0, len(ex), (tcfg.batch_size,), generator=gen).tolist()
            return collate_padded(ex, idx, pad_id, tcfg.prompt_loss_weight)
        idx = torch.randint(0, len(ex), (n_packed,), generator=gen).tolist()
        return collate_packed(ex, idx, tcfg.seq_len, pad_id, n_rows=tcfg.batch_size, prompt_weight=tcfg.prompt_loss_weight)
    return next_batch


def val_loss_fn(ex: ChatExamples, pad_id: int, batch: int = 32):
    def run(model) -> dict:
        total, count = 0.0, 0
        for i in range(0, len(ex), batch):
            s, n = masked_lm_step(model, collate_padded(ex, list(range(i, min(i + batch, len(ex)))), pad_id))
            total, count = total + float(s), count + int(n)
        return {"val_loss": total / max(count, 1)}
    return run


def sft(base: str | Path, out: str | Path, tcfg: TrainConfig | None = None, lora_rank: int = 0,
        lora_alpha: float = LORA_ALPHA, lora_layers: int = 0, resume: bool = False, overwrite: bool = False, progress: bool = True,
        stop_at_step: int | None = None, log=print) -> dict:
    """Fine-tune `base` into `out`; `tcfg` defaults to sft_config(lora=lora_rank > 0). `lora_layers`:
    adapters in that many top blocks only (0: all)."""
    out = Path(out)
    if resume:
        tcfg = resumed_train_config(out, tcfg, defaults=sft_config())
        mcfg = load_model_config(out)
        tok = Tokenizer.load(out)
    else:
        base = Path(base)
        tcfg = tcfg or sft_config(lora=lora_rank > 0)
        writer = context(tcfg.device).is_main  # under torchrun rank 0 writes the run directory
        if writer:
            refuse_overwrite(out, overwrite)
        mcfg = load_model_config(base)
        tok = Tokenizer.load(base)
        mcfg = dataclasses.replace(mcfg, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_layers=lora_layers)
    train_convs, val_convs = load_conversations(tcfg, log)
    seq_len = min(tcfg.seq_len, mcfg.max_seq_len)
    train_ex = encode_conversations(tok, train_convs, seq_len)
    val_ex = encode_conversations(tok, val_convs, seq_len)
    if train_ex.truncated or train_ex.dropped:
        log(f"note: {train_ex.truncated} of {len(train_convs)} training conversations truncated to {seq_len} tokens"
            f"{f', {train_ex.dropped} dropped (no answer left)' if train_ex.dropped else ''}")
    if not len(train_ex):
        raise OwnLLMError(f"--data {tcfg.data}: no trainable examples")
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg)
    if not resume:
        load_start_weights(model, base)  # a LoRA base: its adapters folded in
        if writer:
            start_run(out, tok, mcfg, tcfg, overwrite)
    if mcfg.lora_rank > 0:
        trainable, total = freeze_base(model)
    else:
        trainable = total = sum(p.numel() for p in model.parameters())
    log(f"sft: {len(train_ex):,} train / {len(val_ex):,} val conversations, "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)")
    avg = sum(int((m[1:] == 1).sum()) for m in train_ex.masks) / len(train_ex)  # answer tokens per example
    per_batch = examples_per_batch(train_ex, tcfg)
    trainer = Trainer(model, dataclasses.replace(tcfg, seq_len=seq_len), out,
                      make_batcher(train_ex, tcfg, tok.pad_id, per_batch), masked_lm_step,
                      evaluate=val_loss_fn(val_ex, tok.pad_id), resume=resume,
                      tokens_per_batch=int(avg * per_batch), progress=progress)
    result = trainer.run(stop_at_step=stop_at_step)
    result.update(trainable_params=trainable, total_params=total, truncated=train_ex.truncated)
    return result
