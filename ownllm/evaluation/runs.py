"""Evaluate a run directory: held-out bits per byte per source (`ownllm eval --run R`).

Uses the run's own packed validation shards, or the held-out 10% of `--data` tokenized with the
run's tokenizer (so any two runs can be compared on the same text).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ownllm.checkpoint import load_model, trained_context
from ownllm.data.corpora import load_sources
from ownllm.data.shards import Shards, pack
from ownllm.errors import OwnLLMError
from ownllm.train.heldout import evaluate_sources
from ownllm.tokenizer import Tokenizer


def eval_run(run: str | Path, data: str | None = None, max_tokens: int | None = None,
             seq_len: int | None = None) -> list[dict]:
    """Held-out loss and bits per byte per source; `seq_len`: the window (default: the run's
    training windows), fixed where runs of one model before and after training are compared."""
    run = Path(run)
    model = load_model(run)
    seq_len = seq_len or trained_context(run, model.config.max_seq_len)
    if data is None:
        if not (run / "data" / "meta.json").exists():
            raise OwnLLMError(f"{run}: has no packed data/; pass --data to choose held-out text")
        return evaluate_sources(model, Shards.open(run / "data"), seq_len, max_tokens)
    tok = Tokenizer.load(run)
    with tempfile.TemporaryDirectory() as tmp:
        pack(tok, load_sources(data), tmp)
        return evaluate_sources(model, Shards.open(tmp), seq_len, max_tokens)
