"""GGUF export (`ownllm export --format gguf`): one file that llama.cpp-family runtimes load.

Where it sits: beside the Hugging Face export (hf.py), from the same run directory. Written by our
own ~150-line writer of the GGUF v3 layout: a header, typed key/value metadata, a table of tensor
descriptions, then the tensors, each aligned to 32 bytes. What goes in:
  - `general.*` and `llama.*` hyper-parameters (the model is the Llama architecture);
  - the byte-level BPE as `tokenizer.ggml.model = gpt2` with tokens, token types (specials are
    control tokens), merges, and `tokenizer.ggml.pre = refact`: the llama.cpp pre-tokenizer that
    isolates every digit and then applies GPT-2's regex, which is exactly ours;
  - bos/eos/pad ids, `<|end|>` as the end-of-turn token, and the chat template (Jinja);
  - the weights under llama.cpp's names. q and k are permuted per head from Hugging Face's
    rotate-half RoPE layout to the interleaved pairs llama.cpp rotates (the inverse of what its
    HF converter undoes); norms stay float32, matrices are float32 or float16.
Tests read the file back with the `gguf` package (an independent reader) and run a reference
forward pass with interleaved RoPE on the tensors it returns: the logits equal the run's.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ownllm.errors import OwnLLMError

ALIGNMENT = 32
GGUF_VERSION = 3
# value types of the GGUF spec
U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
# tensor types
GGML_F32, GGML_F16 = 0, 1
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
FILE_TYPES = {"float32": (0, GGML_F32, np.float32), "float16": (1, GGML_F16, np.float16)}


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order (each head: first halves, then second
    halves of its rotation pairs) to interleaved pairs (x0, y0, x1, y1, ...)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_names(n_layers: int) -> dict[str, str]:
    """Our parameter names (the Llama layout) → llama.cpp's."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


class _Writer:
    def __init__(self):
        self.buf = bytearray()

    def u32(self, v): self.buf += struct.pack("<I", v)
    def u64(self, v): self.buf += struct.pack("<Q", v)

    def string(self, s: str):
        b = s.encode("utf-8")
        self.u64(len(b))
        self.buf += b

    def value(self, v):
        """A typed value: bool, int (uint32, or int32 if negative), float (float32), str, or a
        list of one of those (an array)."""
        if isinstance(v, bool):
            self.u32(BOOL); self.buf += struct.pack("<?", v)
        elif isinstance(v, int):
            self.u32(I32 if v < 0 else U32); self.buf += struct.pack("<i" if v < 0 else "<I", v)
        elif isinstance(v, float):
            self.u32(F32); self.buf += struct.pack("<f", v)
        elif isinstance(v, str):
            self.u32(STRING); self.string(v)
        elif isinstance(v, list):
            self.u32(ARRAY)
            kinds = {type(x) for x in v}
            if kinds == {str}:
                self.u32(STRING); self.u64(len(v))
                for s in v:
                    self.string(s)
            elif kinds == {int}:
                self.u32(I32); self.u64(len(v)); self.buf += struct.pack(f"<{len(v)}i", *v)
            else:
                raise TypeError(f"GGUF arrays here hold str or int, not {kinds}")
        else:
            raise TypeError(f"no GGUF type for {type(v).__name__}")

    def pad(self):
        self.buf += b"\0" * (-len(self.buf) % ALIGNMENT)


def gguf_metadata(cfg, tok, name: str, file_type: int) -> dict:
    from ownllm.tokenizer import SPECIAL_TOKENS, pre_tokenizer_spec

    spec = json.loads(tok.hf.to_str())
    if spec.get("pre_tokenizer") != pre_tokenizer_spec() or spec["model"].get("type") != "BPE":
        raise OwnLLMError("the tokenizer is not ownllm's byte-level BPE (a model imported with its own tokenizer): "
                          "GGUF export writes ownllm's pre-tokenizer only — export to a Hugging Face directory "
                          "and convert that with llama.cpp's convert_hf_to_gguf.py")
    vocab = spec["model"]["vocab"]
    tokens = [""] * tok.vocab_size
    for piece, i in vocab.items():
        tokens[i] = piece
    specials = set()
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        specials.add(added["id"])
    if any(t == "" for t in tokens):
        raise OwnLLMError("tokenizer: some ids have no token; cannot write a GGUF vocabulary")
    if cfg.vocab_size < len(tokens):
        raise OwnLLMError(f"the tokenizer has {len(tokens)} tokens but the model only {cfg.vocab_size} embedding rows")
    n_real = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n_real, cfg.vocab_size)]  # llama.cpp wants one token per embedding row
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special_ids = {tok.hf.token_to_id(t) for t in SPECIAL_TOKENS}
    return {
        "general.architecture": "llama", "general.name": name, "general.file_type": file_type,
        "general.alignment": ALIGNMENT,
        "llama.vocab_size": cfg.vocab_size, "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim, "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.ffn_dim, "llama.rope.dimension_count": cfg.head_dim,
        "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.attention.key_length": cfg.head_dim, "llama.attention.value_length": cfg.head_dim,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps), "llama.rope.freq_base": float(cfg.rope_theta),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "refact",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TOKEN_UNUSED if i >= n_real else TOKEN_CONTROL if i in specials | special_ids
                                      else TOKEN_NORMAL for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.eot_token_id": tok.stop_ids[0],
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tok.chat_template,
    }


def write_gguf(path: Path, metadata: dict, tensors: dict[str, np.ndarray]) -> None:
    w = _Writer()
    w.buf += b"GGUF"
    w.u32(GGUF_VERSION)
    w.u64(len(tensors))
    w.u64(len(metadata))
    for key, value in metadata.items():
        w.string(key)
        w.value(value)
    offset = 0
    for name, arr in tensors.items():
        w.string(name)
        w.u32(arr.ndim)
        for d in reversed(arr.shape):  # GGUF lists dimensions innermost first
            w.u64(d)
        w.u32(GGML_F16 if arr.dtype == np.float16 else GGML_F32)
        w.u64(offset)
        offset += arr.nbytes + (-arr.nbytes % ALIGNMENT)
    w.pad()
    with open(path, "wb") as f:
        f.write(w.buf)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
            f.write(b"\0" * (-arr.nbytes % ALIGNMENT))
        f.flush()
        os.fsync(f.fileno())


def export_gguf(run: str | Path, out: str | Path, dtype: str = "float16", overwrite: bool = False) -> dict:
    """Write run `run` as one GGUF file at `out` (written beside it, then renamed into place)."""
    from ownllm.interop.hf import SMEAR_HINT, SMEAR_UNEXPORTABLE
    from ownllm.lora import load_plain
    from ownllm.tokenizer import Tokenizer

    run, out = Path(run), Path(out)
    if dtype not in FILE_TYPES:
        raise OwnLLMError(f"--dtype {dtype}: GGUF export writes {' or '.join(FILE_TYPES)}")
    if out.is_dir():
        raise OwnLLMError(f"{out}: is a directory; GGUF export writes one file (e.g. --out model.gguf)")
    if out.exists() and not overwrite:
        raise OwnLLMError(f"{out}: already exists; pass --overwrite to replace it")
    if not (run / "config.json").is_file():
        raise OwnLLMError(f"--run {run}: no config.json; expected a run directory")
    cfg, state, lora_merged = load_plain(run)
    if cfg.score_head:
        raise OwnLLMError(f"{run}: is a reward model (scalar head); GGUF holds language models — "
                          "use the Hugging Face export for it")
    if cfg.smear:
        raise OwnLLMError(f"{run}: {SMEAR_UNEXPORTABLE}{SMEAR_HINT}")
    if cfg.attention_bias:
        raise OwnLLMError(f"{run}: has q/k/v biases (the Qwen2 architecture); GGUF export writes Llama models only "
                          "so far — use the Hugging Face export for it")
    if cfg.qk_norm or cfg.attn_head_dim or cfg.rope_scaling:
        raise OwnLLMError(f"{run}: has q/k norms, its own head size or scaled RoPE (Qwen3 / Llama 3 imports); GGUF "
                          "export writes plain Llama models only so far — use the Hugging Face export for it")
    tok = Tokenizer.load(run)
    file_type, _, np_dtype = FILE_TYPES[dtype]
    names = gguf_tensor_names(cfg.n_layers)
    tensors = {}
    for ours, t in state.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        t = t.detach().float()
        if ours.endswith("q_proj.weight"):
            t = permute_rope(t, cfg.n_heads)
        elif ours.endswith("k_proj.weight"):
            t = permute_rope(t, cfg.n_kv_heads)
        arr = t.numpy()
        tensors[names[ours]] = arr.astype(np.float32 if arr.ndim == 1 else np_dtype)
    meta = gguf_metadata(cfg, tok, run.name, file_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        write_gguf(tmp, meta, tensors)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "architecture": "llama (GGUF)", "dtype": dtype, "tensors": len(tensors),
            "parameters": sum(a.size for a in tensors.values()), "bytes": out.stat().st_size,
            "lora_merged": lora_merged}

