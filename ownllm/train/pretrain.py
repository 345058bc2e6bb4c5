"""Pretraining: next-token prediction over raw text.

Where it sits: `ownllm pretrain` → `runs/base/`, the first model stage of the flow. Reads
`--data` (bundled names, files, directories, JSONL), trains or reuses a tokenizer on the training
split, packs token shards into `<run>/data/`, trains with the shared Trainer, then evaluates
bits per byte on every held-out source and prints a sample.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ownllm.checkpoint import load_model_config, load_weights, refuse_overwrite, resumed_train_config, start_run
from ownllm.config import ModelConfig, TrainConfig, model_config
from ownllm.data.corpora import load_sources
from ownllm.errors import OwnLLMError
from ownllm.data.shards import Shards, copy_batch, pack, random_batch
from ownllm.train.heldout import evaluate_sources, quick_eval_fn
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer, train_tokenizer
from ownllm.train.distributed import main_first
from ownllm.train.objectives import lm_step
from ownllm.train.trainer import Trainer


def prepare_run(out: Path, tcfg: TrainConfig, preset: str | None, model_overrides: dict, overwrite: bool,
                log=print) -> ModelConfig:
    """Validate everything, then lay down config, tokenizer and shards in a fresh run dir."""
    refuse_overwrite(out, overwrite)
    sources = load_sources(tcfg.data)
    if tcfg.init:   # continued pretraining: the model and tokenizer are the run's
        if preset or model_overrides or tcfg.tokenizer:
            raise OwnLLMError(f"--init {tcfg.init}: the model and tokenizer come from that run; drop --preset, "
                              "--recipe's model, model.* settings and --tokenizer")
        mcfg = load_model_config(tcfg.init)
        tok = Tokenizer.load(tcfg.init)
        if tcfg.seq_len > mcfg.max_seq_len:
            raise OwnLLMError(f"--init {tcfg.init}: seq_len {tcfg.seq_len} exceeds that model's context "
                              f"{mcfg.max_seq_len}")
    elif tcfg.tokenizer:
        mcfg = model_config(preset, model_overrides)
        tok = Tokenizer.load(tcfg.tokenizer)
    else:
        mcfg = model_config(preset, model_overrides)
        vocab = tcfg.vocab_size or mcfg.vocab_size
        log(f"training a {vocab}-token byte-level BPE on the training split of {', '.join(s.name for s in sources)}")
        tok = train_tokenizer((s.split()[0] for s in sources), vocab)
    if not tcfg.init:   # (an --init model keeps its rows: an imported one may have more than its tokenizer)
        mcfg = dataclasses.replace(mcfg, vocab_size=tok.vocab_size, max_seq_len=max(mcfg.max_seq_len, tcfg.seq_len))
    start_run(out, tok, mcfg, tcfg, overwrite)
    meta = pack(tok, sources, out / "data")
    for s in meta["sources"]:
        log(f"  {s['name']}: train {s['train']['tokens']:,} tokens ({s['train']['bytes'] / s['train']['tokens']:.2f} bytes/token), "
            f"val {s['val']['tokens']:,} tokens ({s['val']['bytes'] / s['val']['tokens']:.2f} bytes/token)")
    return mcfg


def pretrain(out: str | Path, tcfg: TrainConfig | None = None, preset: str | None = None,
             model_overrides: dict | None = None, resume: bool = False, overwrite: bool = False,
             progress: bool = True, stop_at_step: int | None = None, log=print) -> dict:
    out = Path(out)
    if resume:
        tcfg = resumed_train_config(out, tcfg)
        mcfg = load_model_config(out)
    else:
        tcfg = tcfg or TrainConfig()
        with main_first(tcfg.device) as ctx:  # under torchrun rank 0 lays down tokenizer and shards, the others read them
            if ctx.is_main:
                mcfg = prepare_run(out, tcfg, preset, model_overrides or {}, overwrite, log)
            else:
                mcfg = load_model_config(out)
    shards = Shards.open(out / "data")
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg)
    if tcfg.init and not resume:
        load_weights(model, tcfg.init)
    log(f"model: {mcfg.num_params() / 1e6:.2f}M parameters ({mcfg.num_params(embeddings=False) / 1e6:.2f}M without "
        f"embeddings), {mcfg.n_layers} layers, dim {mcfg.dim}, vocab {mcfg.vocab_size}, windows of {tcfg.seq_len} tokens (context {mcfg.max_seq_len})")

    specials = len(Tokenizer.load(out).special)

    def next_batch(gen):
        if trainer.step < tcfg.copy_steps:
            return copy_batch(tcfg.batch_size, tcfg.seq_len, (specials, mcfg.vocab_size), gen)
        return random_batch(shards.train, tcfg.batch_size, tcfg.seq_len, gen)

    trainer = Trainer(model, tcfg, out, next_batch, lm_step,
                      evaluate=quick_eval_fn(shards, tcfg.seq_len, tcfg.eval_batches, tcfg.batch_size),
                      resume=resume, tokens_per_batch=tcfg.batch_size * tcfg.seq_len, progress=progress)
    result = trainer.run(stop_at_step=stop_at_step)
    if result.get("stopped") or not trainer.ctx.is_main:
        return result
    model = trainer.final_model().eval()
    per_source = evaluate_sources(model, shards, tcfg.seq_len)
    result["sources"] = per_source
    (out / "eval.json").write_text(json.dumps(per_source, indent=2))
    return result
