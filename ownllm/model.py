"""The Transformer: a Llama-layout decoder, top-down.

Where it sits: every stage builds a `GPT` from a run's `config.json` and loads
`model.safetensors` into it. Parameter names follow `transformers.LlamaForCausalLM` (without
its leading `model.`), so export/import is a rename and the logits match HF's (tests/test_model.py).

    GPT
     ├─ embed_tokens
     ├─ layers × n_layers: Block
     │    ├─ input_layernorm (RMSNorm) → self_attn (Attention: RoPE, GQA via SDPA, KV cache)
     │    └─ post_attention_layernorm (RMSNorm) → mlp (SwiGLU)
     ├─ norm (RMSNorm)
     └─ lm_head (tied to embed_tokens unless config says otherwise)

Imported architectures add what their configs ask for (config.py): Qwen's q/k/v biases and q/k
norms, Mistral's and Gemma 3's sliding-window layers (a band on the attention mask, also in the KV
cache: a row's cached entries are always one contiguous run, so a column distance is a position
distance), and Gemma 3's scaled embeddings, norms on both sides of each branch and GeGLU. Gemma
stores its norms as w for a scale of 1 + w; the import stores 1 + w, so one RMSNorm serves all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ownllm.config import ModelConfig
from ownllm.cost import count_forward
from ownllm.lora import LoRALinear, is_lora_param, merged_state_dict

LOGP_FLOOR = 10.0  # GPT.rewards: a token's log-likelihood counts down to −10 nats, no lower


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # casts only when needed: even no-op casts cost ~20% of a decode step
        xf = x if x.dtype == torch.float32 else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y if y.dtype == x.dtype else y.to(x.dtype)


def rope_tables(cfg: ModelConfig, length: int, device=None, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (length, head_dim) in HF's 'rotate_half' layout (frequencies repeated twice);
    `local`: the sliding layers' tables (rope_local_theta, unscaled)."""
    hd = cfg.head_dim
    theta, scaling = (cfg.rope_local_theta, None) if local else (cfg.rope_theta, cfg.rope_scaling)
    inv_freq = scaled_inv_freq(1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd)),
                               scaling)
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """RoPE frequencies under `rope_scaling`: 'linear' divides all by `factor`; 'llama3' (Llama 3.1+)
    divides the low frequencies (wavelength above original_max / low_freq_factor) by `factor`, keeps
    the high ones (below original_max / high_freq_factor) and blends in between."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / low, inv_freq / factor, torch.where(wavelen < old_len / high, inv_freq, blended))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin broadcast to it: (T, hd) or (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Static per-layer key/value buffers for incremental decoding.

    `length` is how many positions are filled (shared by the batch: prompts are left-padded);
    `valid` marks which of those key positions are real tokens (False at left padding).
    """

    k: torch.Tensor      # (n_layers, B, n_kv_heads, max_len, head_dim)
    v: torch.Tensor
    valid: torch.Tensor  # (B, max_len) bool
    length: int = 0
    prev: torch.Tensor | None = None  # (B, 1, dim) the last token's embedding, for ModelConfig.smear

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def linear(cfg: ModelConfig, name: str, d_in: int, d_out: int, layer: int = 0) -> nn.Linear:
    """A projection, bias-free except q/k/v with `attention_bias` (Qwen2); a LoRALinear when the
    config asks for adapters on `name` in block `layer`."""
    bias = cfg.attention_bias and name in ("q_proj", "k_proj", "v_proj")
    if name in cfg.lora_targets.split(",") and cfg.has_lora(layer):
        return LoRALinear(d_in, d_out, cfg.lora_rank, cfg.lora_alpha, bias=bias)
    return nn.Linear(d_in, d_out, bias=bias)


def window_band(q_start: int, T: int, K: int, window: int, device=None) -> torch.Tensor:
    """(T, K) bool: query column q_start + i may see key column j when j <= it and it - j < window."""
    q = torch.arange(q_start, q_start + T, device=device)[:, None]
    j = torch.arange(K, device=device)[None, :]
    return (j <= q) & (q - j < window)


def last_entries(keep: torch.Tensor, n: int) -> torch.Tensor:
    """`keep` (..., K) bool with only each row's last `n` True entries left True."""
    return keep & (keep.flip(-1).long().cumsum(-1).flip(-1) <= n)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d, masked where `keep` is False) v, written out. On CPU it beats SDPA where it
    counts: full-sequence training once torch.compile fuses mask and softmax (SDPA's flash
    backward took 130 of 437 ms per tiny-preset step). Same math as SDPA; checked against HF logits."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped-query attention: share each k/v head among `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    att = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    return att.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v


# the written-out scores are (batch, heads, T, T) per layer, several of them kept for the backward
# pass: past this many elements (64 MB of float32) SDPA's flash kernel, whose memory grows with T
# only, takes over (a real model's long preference rows through 30 layers exhausted 24 GB otherwise)
EXPLICIT_ATTENTION_MAX = 1 << 24


def stacked_bias(layers) -> torch.Tensor | None:
    """The biases of layers fused row-wise (zeros for one without), or None when none has one."""
    present = [lin.bias for lin in layers if lin.bias is not None]
    if not present:
        return None
    return torch.cat([lin.bias.detach() if lin.bias is not None else present[0].new_zeros(lin.out_features)
                      for lin in layers])


class FusedLinears:
    """One matmul for several projections that read the same input (q/k/v, gate/up) at inference.

    The concatenated weight is rebuilt whenever any source weight changes in place (tracked by
    tensor version counters), so it is never stale after an optimizer step or a load."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        ws = [lin.weight for lin in self.linears] + [lin.bias for lin in self.linears if lin.bias is not None]
        key = tuple((id(w), w._version, w.dtype) for w in ws)
        if key != self.key:
            self.weight, self.key = torch.cat([lin.weight.detach() for lin in self.linears]), key
            self.bias = stacked_bias(self.linears)
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def project(owner: nn.Module, key: str, x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """Apply several projections of x: as one fused matmul at inference (eval mode, no grad, plain
    Linears, not inside torch.compile, which schedules its own graph), else one by one. A
    quantised model brings its own fused layer (inference/quantize.fuse_projections)."""
    quantized = owner.__dict__.get(key + "_quantized")
    if quantized is not None:
        layer, sizes = quantized
        return layer(x).split(sizes, dim=-1)
    if (owner.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not all(type(lin) is nn.Linear for lin in linears)):
        return [lin(x) for lin in linears]
    fused = owner.__dict__.get(key)  # kept out of the module tree: not a parameter, never saved
    if fused is None:
        fused = owner.__dict__[key] = FusedLinears(*linears)
    return fused(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window_of(layer)
        self.scale = cfg.attn_scale or self.head_dim ** -0.5
        self.q_proj = linear(cfg, "q_proj", cfg.dim, cfg.n_heads * cfg.head_dim, layer)
        self.k_proj = linear(cfg, "k_proj", cfg.dim, cfg.n_kv_heads * cfg.head_dim, layer)
        self.v_proj = linear(cfg, "v_proj", cfg.dim, cfg.n_kv_heads * cfg.head_dim, layer)
        self.o_proj = linear(cfg, "o_proj", cfg.n_heads * cfg.head_dim, cfg.dim, layer)
        if cfg.qk_norm:   # Qwen3: each head's q and k RMS-normalised before RoPE
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def _rope_qkv(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = project(self, "_qkv", x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def decode_static(self, x, cos, sin, past_k, past_v, keep):
        """One new token per row (x (B, 1, dim)) attending to the whole fixed-size cache where
        `keep` (B, 1, 1, max_len) is True, plus itself. Reads the cache, never writes it: returns
        (output, k, v) and the caller stores k/v (a write inside a compiled graph made inductor
        copy the whole cache every step). Softmax over the two parts is combined exactly."""
        B = x.shape[0]
        q, k, v = self._rope_qkv(x, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        pk, pv, nk, nv = past_k, past_v, k, v
        if rep > 1:
            pk, pv, nk, nv = (t.repeat_interleave(rep, dim=1) for t in (pk, pv, nk, nv))
        scale = self.scale
        if self.window:   # the new token plus the last window - 1 cached ones
            keep = last_entries(keep, self.window - 1)
        s_past = ((q @ pk.to(q.dtype).transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf"))
        s_new = (q * nk).sum(-1, keepdim=True) * scale
        m = torch.maximum(s_past.amax(-1, keepdim=True), s_new)
        e_past, e_new = (s_past - m).exp(), (s_new - m).exp()
        y = (e_past @ pv.to(q.dtype) + e_new * nv) / (e_past.sum(-1, keepdim=True) + e_new)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, -1)), k, v

    def forward(self, x, cos, sin, *, layer: int = 0, cache: KVCache | None = None,
                mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._rope_qkv(x, cos, sin)
        if cache is not None:
            start, end = cache.length, cache.length + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            causal = causal and start == 0 and mask is None
        if self.window:   # a band: causal, and no further back than the window
            band = window_band(cache.length if cache is not None else 0, T, k.shape[2], self.window, x.device)
            mask, causal = (band if mask is None else mask & band), False
        gqa = self.n_heads != self.n_kv_heads
        if (x.device.type == "cpu" and cache is None and mask is None and causal and T > 1
                and B * self.n_heads * T * T <= EXPLICIT_ATTENTION_MAX):
            y = explicit_attention(q, k, v, torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), self.scale)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           is_causal=causal and mask is None and T > 1, enable_gqa=gqa,
                                           scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU (Gemma) with gelu_tanh in place of silu."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.gate_proj = linear(cfg, "gate_proj", cfg.dim, cfg.ffn_dim, layer)
        self.up_proj = linear(cfg, "up_proj", cfg.dim, cfg.ffn_dim, layer)
        self.down_proj = linear(cfg, "down_proj", cfg.ffn_dim, cfg.dim, layer)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, "_gate_up", x, self.gate_proj, self.up_proj)
        return self.down_proj((F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up)


class Block(nn.Module):
    """Llama: x + attn(norm(x)), then x + mlp(norm(x)). With sandwich_norms (Gemma 3) each branch's
    output is normalised too, and the MLP's input norm is `pre_feedforward_layernorm`."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, layer)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def _mlp(self, x):
        if self.sandwich:
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))

    def _attn_out(self, a):
        return self.post_attention_layernorm(a) if self.sandwich else a

    def forward(self, x, cos, sin, **attn_kwargs):
        x = x + self._attn_out(self.self_attn(self.input_layernorm(x), cos, sin, **attn_kwargs))
        return self._mlp(x)

    def decode_static(self, x, cos, sin, past_k, past_v, keep):
        a, k, v = self.self_attn.decode_static(self.input_layernorm(x), cos, sin, past_k, past_v, keep)
        return self._mlp(x + self._attn_out(a)), k, v


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.smear:
            self.smear_gate = nn.Parameter(torch.zeros(cfg.dim))
        if cfg.score_head:  # reward / value model: one scalar per position
            self.score = nn.Linear(cfg.dim, 1, bias=False)
        if cfg.score_likelihood:  # reward model: + gated log-likelihood of the answer (rewards)
            self.score_gate = nn.Linear(cfg.dim, 1)
            self.score_scale = nn.Parameter(torch.ones(1))
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # sliding layers with a RoPE base of their own (Gemma 3) read these tables
        self.local_rope = [bool(cfg.rope_local_theta and cfg.window_of(i)) for i in range(cfg.n_layers)]
        if any(self.local_rope):
            cos, sin = rope_tables(cfg, cfg.max_seq_len, local=True)
            self.register_buffer("rope_cos_local", cos, persistent=False)
            self.register_buffer("rope_sin_local", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, except the residual branches' output projections, which
        start at zero so every block begins as the identity (as in modded-nanogpt: it trains faster)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if is_lora_param(name):
                continue  # LoRALinear initialises its own adapters (B = 0)
            if name.endswith(".bias") or name == "smear_gate":
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    def _rope(self, T: int, positions: torch.Tensor | None, offset: int) -> list:
        """[(cos, sin) per layer] for these positions."""
        if positions is None:
            if offset + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {offset + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            return self._per_layer(lambda t: t[offset: offset + T])
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len={self.config.max_seq_len}")
        return self._per_layer(lambda t: t[positions].unsqueeze(1))

    def _per_layer(self, pick) -> list:
        tables = {False: (pick(self.rope_cos), pick(self.rope_sin))}
        if any(self.local_rope):
            tables[True] = (pick(self.rope_cos_local), pick(self.rope_sin_local))
        return [tables[local] for local in self.local_rope]

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        if self.config.embed_scale:   # √dim, rounded to the activations' dtype first as Gemma does
            x = x * torch.tensor(self.config.dim ** 0.5, dtype=x.dtype)
        return x

    def hidden_states(self, idx: torch.Tensor, *, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      collect: list | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim). With `cache`, `idx` continues from `cache.length`.
        `collect`: a list that receives the residual stream entering the first block and leaving
        each block (for explanations; no hooks, so other threads' passes are not caught)."""
        T = idx.shape[1]
        offset = cache.length if cache is not None else 0
        count_forward(self, idx.shape[0], T, offset, head_positions=0)
        rope = self._rope(T, positions, offset)
        x = self._embed(idx)
        if self.config.smear:
            x = self._smear(x, cache, positions)
        if collect is not None:
            collect.append(x)
        for i, block in enumerate(self.layers):
            x = block(x, *rope[i], layer=i, cache=cache, mask=mask)
            if collect is not None:
                collect.append(x)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def _smear(self, x: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None) -> torch.Tensor:
        """x + gate ⊙ (the previous token's embedding): each position sees what preceded it without
        an attention head that learns to look one back, the half of an induction head ("find where
        this token occurred before, emit what followed") that a small model forms slowest. The gate starts at zero; nothing crosses an example boundary or left padding
        (positions 0), and the KV cache keeps the last embedding for the next call."""
        prev = cache.prev if cache is not None and cache.length > 0 and cache.prev is not None else x.new_zeros(
            x.shape[0], 1, x.shape[2])
        shifted = torch.cat([prev, x[:, :-1]], 1)
        if cache is not None:
            cache.prev = x[:, -1:]
        return self._add_prev(x, shifted, positions)

    def _add_prev(self, x: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """x + gate ⊙ prev, where `prev` holds each position's previous embedding; none at an
        example's first position (packed rows, left padding)."""
        if positions is not None:
            prev = prev * (positions > 0).to(x.dtype)[..., None]
        return x + self.smear_gate.to(x.dtype) * prev

    def decode_static(self, idx: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      keep: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step whose tensor shapes never change, so torch.compile builds it once: idx
        and positions (B, 1), the whole stacked cache (KVCache.k / .v), `keep` (B, 1, 1, max_len)
        marking the cached positions to attend to (not the new token's slot). Writes nothing:
        returns logits (B, vocab) and the new token's keys and values (n_layers, B, n_kv_heads,
        1, head_dim) for the caller to store (Engine.stream). With smear, `prev` (B, 1, dim) is the
        previous token's embedding (KVCache.prev; the caller sets it to this token's afterwards)."""
        rope = self._per_layer(lambda t: t[positions].unsqueeze(1))
        x = self._embed(idx)
        if self.config.smear:
            x = self._add_prev(x, prev, positions)
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            x, k, v = block.decode_static(x, *rope[i], cache_k[i], cache_v[i], keep)
            ks.append(k), vs.append(v)
        return self.lm_head(self.norm(x))[:, -1], torch.stack(ks), torch.stack(vs)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, T, vocab). kwargs: cache, positions, mask (see hidden_states)."""
        count_forward(self, 0, 0, head_positions=idx.numel())
        return self.lm_head(self.hidden_states(idx, **kwargs))

    def last_logits(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, vocab) at the last position only: a prefill needs no more, and the output head
        over every prompt position would cost T times the vocabulary-sized product."""
        count_forward(self, 0, 0, head_positions=idx.shape[0])
        return self.lm_head(self.hidden_states(idx, **kwargs)[:, -1])

    def scores(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Scalar head per position (B, T): reward (read at a sequence's last token) or value."""
        return self.score(self.hidden_states(idx, **kwargs)).squeeze(-1)

    def rewards(self, idx: torch.Tensor, answer_mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A reward model's score of each row (B,): the scalar head read at the row's last token
        (`last`, (B,)); with `score_likelihood`, plus scale × Σ over the answer's tokens
        (`answer_mask` (B, T), 1 on them) of gate_t × max(log p(token_t | before), −LOGP_FLOOR),
        the gate a learned σ(linear(h_t)) of the token's own hidden state. Why: whether an answer
        is right is what the model already knows when it predicts the answer's tokens — a wrong
        digit is one it finds unlikely — but a head on the last hidden state has to learn that
        comparison anew; the gate lets it ignore tokens whose likelihood says nothing of truth
        (filler, a refusal's wording)."""
        h = self.hidden_states(idx)
        r = self.score(h[torch.arange(len(idx), device=idx.device), last]).squeeze(-1).float()
        if not self.config.score_likelihood:
            return r
        # the LM head on the answer's positions only: row b's token t (answer_mask[b, t] = 1, t ≥ 1)
        # is predicted at t − 1, and gated by its own hidden state at t
        b, t = (answer_mask[:, 1:] > 0).nonzero(as_tuple=True)
        t = t + 1
        logp = torch.gather(F.log_softmax(self.lm_head(h[b, t - 1]).float(), -1), 1, idx[b, t, None]).squeeze(1)
        gate = torch.sigmoid(self.score_gate(h[b, t]).squeeze(-1).float())
        term = gate * logp.clamp(min=-LOGP_FLOOR)
        return r + self.score_scale.float() * torch.zeros_like(r).index_add(0, b, term)

    def compile_blocks(self) -> None:
        """torch.compile each Block in place; identical blocks share one compiled graph."""
        for block in self.layers:
            block.compile()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device


def fold_adapters(model: nn.Module) -> nn.Module:
    """A plain copy of a LoRA model (eval mode), its adapters folded into the weights."""
    plain = GPT(model.config.without_lora())
    plain.load_state_dict(merged_state_dict(model))
    return plain.eval()
