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


def encode_conversations(tok: Tokenizer, conversations: list[list[dict]], max_len: int,
                         keep_end: bool = False) -> ChatExamples:
    """Token ids and loss masks. An over-long conversation is cut to max_len + 1 tokens: its end
    for training (what does not fit is dropped, counted), its start with `keep_end` — for scoring
    answers, where every conversation must keep its final answer so scores stay aligned."""
    out = ChatExamples([], [])
    for conv in conversations:
        r = tok.render(conv)
        ids, mask = np.asarray(r.ids, dtype=np.int64), np.asarray(r.mask, dtype=np.int8)
        if len(ids) > max_len + 1:
            out.truncated += 1
            cut = slice(-(max_len + 1), None) if keep_end else slice(None, max_len + 1)
            ids, mask = ids[cut], mask[cut]
        if mask[1:].sum() == 0:
            out.dropped += 1
            continue
        out.ids.append(ids)
        out.masks.append(mask)
    return out


def _example_xy(ids: np.ndarray, mask: np.ndarray, prompt_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights). With prompt_weight > 0 the prompt tokens are targets too, each
    weighing prompt_weight against 1 for an answer token."""
    answer = mask[1:] == 1
    y = ids[1:].copy() if prompt_weight > 0 else np.where(answer, ids[1:], -100)
    return ids[:-1], y, np.where(answer, 1.0, prompt_weight).astype(np.float32)


def collate_padded(examples: ChatExamples, index: list[int], pad_id: int, prompt_weight: float = 0.0) -> dict:
    """Right-padded rows: x padded with pad_id, y with -100 (and `w` as in collate_packed)."""
    rows = [_example_xy(examples.ids[i], examples.masks[i], prompt_weight) for i in index]
    L = max(len(x) for x, _, _ in rows)
    x = np.full((len(rows), L), pad_id, dtype=np.int64)
    y = np.full((len(rows), L), -100, dtype=np.int64)
    w = np.zeros((len(rows), L), dtype=np.float32)
    for r, (xi, yi, wi) in enumerate(rows):
        x[r, : len(xi)], y[r, : len(yi)], w[r, : len(wi)] = xi, yi, wi
    out = {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
    if prompt_weight > 0:
        out["w"] = torch.from_numpy(w)
    return out


def collate_packed(examples: ChatExamples, index: list[int], seq_len: int, pad_id: int,
                   n_rows: int | None = None, prompt_weight: float = 0.0) -> dict:
    """Greedily pack examples (in the given order) into rows of seq_len; returns x, y, positions
    and a (rows, 1, T, T) boolean mask that is causal within each example and False across them.
    With n_rows, exactly that many rows (extra examples dropped, missing rows empty): a fixed
    shape, so a compiled model never recompiles. With prompt_weight > 0 also `w`: per-token loss
    weights (1 on answers, prompt_weight on prompts, 0 on padding)."""
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for i in index:
        xy = _example_xy(examples.ids[i], examples.masks[i], prompt_weight)
        if used + len(xy[0]) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(xy)
        used += len(xy[0])
    rows = rows if n_rows is None else (rows + [[] for _ in range(n_rows - len(rows))])[:n_rows]
    B = len(rows)
    x = np.full((B, seq_len), pad_id, dtype=np.int64)
    y = np.full((B, seq_len), -100, dtype=np.int64)
    w = np.zeros((B, seq_len), dtype=np.float32)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    seg = np.full((B, seq_len), -1, dtype=np.int64)  # example id within its row; -1 = padding
    for r, row in enumerate(rows):
        at = 0
        for s, (xi, yi, wi) in enumerate(row):
            n = len(xi)
            x[r, at: at + n], y[r, at: at + n], w[r, at: at + n] = xi, yi, wi
            pos[r, at: at + n] = np.arange(n)
            seg[r, at: at + n] = s
            at += n
    seg_t = torch.from_numpy(seg)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    same = seg_t[:, :, None] == seg_t[:, None, :]
    mask = (same & causal) | torch.eye(seq_len, dtype=torch.bool)  # padding rows see themselves (no NaN)
    out = {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "positions": torch.from_numpy(pos), "mask": mask[:, None]}
    if prompt_weight > 0:
        out["w"] = torch.from_numpy(w)
    return out
