"""`ownllm merge-lora`: write a plain run whose weights have the LoRA adapters folded in."""
from __future__ import annotations

import shutil
from pathlib import Path

from ownllm.checkpoint import load_plain, save_checkpoint
from ownllm.errors import OwnLLMError
from ownllm.model import GPT


def merge_lora(run: str | Path, out: str | Path) -> Path:
    run, out = Path(run), Path(out)
    cfg, state, lora = load_plain(run)
    if not lora:
        raise OwnLLMError(f"{run}: has no LoRA adapters (config lora_rank is 0)")
    plain = GPT(cfg)
    plain.load_state_dict(state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "train_config.json"):
        if (run / f).exists():
            shutil.copy2(run / f, out / f)
    save_checkpoint(out, plain, step=0)
    return out
