"""Pack text into token shards (numpy memmaps) and draw training batches from them.

Where it sits: `pretrain` tokenizes each source's train and val split once into
`<run>/data/{train,val}.bin` (uint16 when the vocabulary fits, else uint32) plus `meta.json`
(per-source token ranges and UTF-8 byte counts, which bits-per-byte needs). Tokenization runs
in the Rust tokenizer over line-aligned chunks; batching slices the memmap with numpy.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ownllm.data.corpora import Source
from ownllm.files import atomic_write, write_error
from ownllm.tokenizer import Tokenizer, _chunks


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def tokenize_text(tok: Tokenizer, text: str) -> np.ndarray:
    pieces = list(_chunks([text], size=1 << 15))
    ids = tok.encode_batch(pieces) if pieces else []
    total = sum(len(x) for x in ids)
    out = np.empty(total, dtype=_dtype(tok.vocab_size))
    pos = 0
    for x in ids:
        out[pos: pos + len(x)] = x
        pos += len(x)
    return out


def pack(tok: Tokenizer, sources: list[Source], out_dir: str | Path) -> dict:
    """Write train.bin / val.bin / meta.json under out_dir; an eos token separates sources."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": tok.vocab_size, "dtype": np.dtype(_dtype(tok.vocab_size)).name, "sources": []}
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    offsets = {"train": 0, "val": 0}
    eos = np.array([tok.eos_id], dtype=_dtype(tok.vocab_size))
    for src in sources:
        entry = {"name": src.name}
        for split, text in zip(("train", "val"), src.split()):
            arr = np.concatenate([tokenize_text(tok, text), eos])
            entry[split] = {"start": offsets[split], "tokens": int(len(arr)), "bytes": len(text.encode("utf-8"))}
            splits[split].append(arr)
            offsets[split] += len(arr)
        meta["sources"].append(entry)
    for split, arrs in splits.items():
        tmp = out / f"{split}.bin.tmp"
        try:
            np.concatenate(arrs).tofile(tmp)
            os.replace(tmp, out / f"{split}.bin")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(out / f"{split}.bin", e) from None
    atomic_write(out / "meta.json", json.dumps(meta, indent=2))
    return meta


@dataclass
class Shards:
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @classmethod
    def open(cls, data_dir: str | Path) -> "Shards":
        d = Path(data_dir)
        meta = json.loads((d / "meta.json").read_text())
        dt = np.dtype(meta["dtype"])
        return cls(np.memmap(d / "train.bin", dtype=dt, mode="r"), np.memmap(d / "val.bin", dtype=dt, mode="r"), meta)

    def val_bytes_per_token(self) -> float:
        toks = sum(s["val"]["tokens"] for s in self.meta["sources"])
        return sum(s["val"]["bytes"] for s in self.meta["sources"]) / toks


def random_batch(data: np.ndarray, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of seq_len+1 tokens: inputs and next-token targets."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"only {len(data)} tokens; need more than seq_len+1={seq_len + 1}")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen).numpy()
    rows = np.stack([data[s: s + seq_len + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def copy_batch(batch: int, seq_len: int, vocab: tuple[int, int], gen: torch.Generator,
               span: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `span` distinct random token ids (from the range `vocab`) each followed by the same
    ids again, packed to seq_len; targets only where the second copy is predictable (after its
    first token). Only content-addressed copying predicts them — find the current token earlier,
    emit the one that followed it: the induction head a model needs to look a value up in its
    prompt, which this architecture forms here within ~100 Muon steps (with ModelConfig.smear and
    qk_norm) where natural text had not formed it in the quickstart's budget."""
    lo, hi = vocab
    n = (seq_len + 1 + 2 * span - 1) // (2 * span)
    perm = torch.rand(batch * n, hi - lo, generator=gen).argsort(dim=1)[:, :span] + lo
    rows = torch.cat([perm, perm], 1).view(batch, n * 2 * span)[:, : seq_len + 1]
    target = rows[:, 1:].clone()
    pos = torch.arange(1, seq_len + 1) % (2 * span)
    target[:, (pos < span + 1)] = -100  # first copies and the first token of each second copy
    return rows[:, :-1], target


def sequential_windows(data: np.ndarray, seq_len: int, batch: int):
    """Non-overlapping windows covering `data` once (for exact held-out loss); yields (x, y) with y=-100 past the end."""
    n = len(data) - 1
    n_windows = math.ceil(n / seq_len)
    for b0 in range(0, n_windows, batch):
        xs, ys = [], []
        for w in range(b0, min(b0 + batch, n_windows)):
            s = w * seq_len
            chunk = np.asarray(data[s: min(s + seq_len + 1, n + 1)], dtype=np.int64)
            x = np.zeros(seq_len, dtype=np.int64)
            y = np.full(seq_len, -100, dtype=np.int64)  # -100: ignored by cross_entropy
            x[: len(chunk) - 1] = chunk[:-1]
            y[: len(chunk) - 1] = chunk[1:]
            xs.append(x)
            ys.append(y)
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
