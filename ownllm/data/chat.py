"""Chat examples as token ids + loss masks, batched with padding or packed without leakage.

Where it sits: SFT turns conversations (data/formats.py, data/tasks.py) into training batches.
Targets are -100 (ignored) everywhere the chat template's mask is 0: system/user text, role
markers and padding; so the loss falls on assistant tokens and their end-of-turn token only.
Packing puts several short examples in one row with a block-diagonal causal mask and positions
that restart at 0 for each example, so no example attends to another.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ownllm.tokenizer import Tokenizer


@dataclass
class ChatExamples:
    ids: list[np.ndarray]
    masks: list[np.ndarray]
    truncated: int = 0   # examples cut to fit max_len (reported, never silent)
    dropped: int = 0     # examples with no trainable token left after truncation

    def __len__(self) -> int:
        return len(self.ids)


def encode_conversations(tok: Tokenizer, conversations: list[list[dict]], max_len: int) -> ChatExamples:
    out = ChatExamples([], [])
    for conv in conversations:
        r = tok.render(conv)
        ids, mask = np.asarray(r.ids, dtype=np.int64), np.asarray(r.mask, dtype=np.int8)
        if len(ids) > max_len + 1:
            out.truncated += 1
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        if mask[1:].sum() == 0:
            out.dropped += 1
            continue
        out.ids.append(ids)
        out.masks.append(mask)
    return out


def _example_xy(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.where(mask[1:] == 1, ids[1:], -100)
    return ids[:-1], y


def collate_padded(examples: ChatExamples, index: list[int], pad_id: int) -> dict:
    """Right-padded rows: x padded with pad_id, y with -100."""
    rows = [_example_xy(examples.ids[i], examples.masks[i]) for i in index]
    L = max(len(x) for x, _ in rows)
    x = np.full((len(rows), L), pad_id, dtype=np.int64)
    y = np.full((len(rows), L), -100, dtype=np.int64)
    for r, (xi, yi) in enumerate(rows):
        x[r, : len(xi)], y[r, : len(yi)] = xi, yi
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}


def collate_packed(examples: ChatExamples, index: list[int], seq_len: int, pad_id: int,
                   n_rows: int | None = None) -> dict:
    """Greedily pack examples (in the given order) into rows of seq_len; returns x, y, positions
    and a (rows, 1, T, T) boolean mask that is causal within each example and False across them.
    With n_rows, exactly that many rows (extra examples dropped, missing rows empty): a fixed
    shape, so a compiled model never recompiles."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for i in index:
        xy = _example_xy(examples.ids[i], examples.masks[i])
        if used + len(xy[0]) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(xy)
        used += len(xy[0])
    rows = rows if n_rows is None else (rows + [[] for _ in range(n_rows - len(rows))])[:n_rows]
    B = len(rows)
    x = np.full((B, seq_len), pad_id, dtype=np.int64)
    y = np.full((B, seq_len), -100, dtype=np.int64)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    seg = np.full((B, seq_len), -1, dtype=np.int64)  # example id within its row; -1 = padding
    for r, row in enumerate(rows):
        at = 0
        for s, (xi, yi) in enumerate(row):
            n = len(xi)
            x[r, at: at + n], y[r, at: at + n] = xi, yi
            pos[r, at: at + n] = np.arange(n)
            seg[r, at: at + n] = s
            at += n
    seg_t = torch.from_numpy(seg)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    same = seg_t[:, :, None] == seg_t[:, None, :]
    mask = (same & causal) | torch.eye(seq_len, dtype=torch.bool)  # padding rows see themselves (no NaN)
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "positions": torch.from_numpy(pos),
            "mask": mask[:, None]}


def masked_lm_step(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over target tokens, target count) for a chat batch (padded or packed)."""
    from ownllm.train.objectives import summed_nll

    kwargs = {k: batch[k] for k in ("positions", "mask") if k in batch}
    return summed_nll(model(batch["x"], **kwargs), batch["y"])
