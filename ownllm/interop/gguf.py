"""GGUF export (`ownllm export --format gguf`): one file that llama.cpp-family runtimes load.

Where it sits: beside the Hugging Face export (hf.py), from the same run directory, for Llama,
Qwen2 and Qwen3 runs — ours and imported ones alike. The file is written with the `gguf`
package's writer and quantiser (llama.cpp's own Python code). What goes in:
  - `general.*` and `<arch>.*` hyper-parameters for the architecture llama.cpp calls `llama`,
    `qwen2` (q/k/v biases) or `qwen3` (q/k norms);
  - the byte-level BPE as `tokenizer.ggml.model = gpt2` with tokens, token types (special tokens
    are control tokens), merges, and the `tokenizer.ggml.pre` whose split is the run's own:
    ours isolates every digit and then applies GPT-2's regex (`refact`); an imported tokenizer
    maps back to the name it came with (gguf_import.PRE_TOKENIZERS), and one llama.cpp has no
    name for is refused rather than written wrong;
  - bos/eos/pad ids, the first stop token as end-of-turn, and the chat template (Jinja);
  - the weights under llama.cpp's names. For `llama` only, q and k are permuted per head from
    Hugging Face's rotate-half RoPE layout to the interleaved pairs llama.cpp rotates there (the
    inverse of what its HF converter undoes); Qwen files keep rotate-half. Norms and biases stay
    float32; matrices are F32, F16, BF16, Q8_0 or Q4_0 (a matrix whose rows do not split into
    32-value blocks falls back to F16, as llama.cpp's converter does).
Tests read the file back with the `gguf` package and run a reference forward pass with
interleaved RoPE on the tensors it returns, and import it again: the logits equal the run's
within the type's error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ownllm.errors import OwnLLMError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
# --dtype → (general.file_type as llama.cpp numbers it, the matrices' type name in gguf)
FILE_TYPES = {"float32": (0, "F32"), "float16": (1, "F16"), "bfloat16": (32, "BF16"),
              "q8_0": (7, "Q8_0"), "q4_0": (2, "Q4_0")}


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order (each head: first halves, then second
    halves of its rotation pairs) to interleaved pairs (x0, y0, x1, y1, ...)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_names(n_layers: int) -> dict[str, str]:
    """Our parameter names → llama.cpp's (biases and q/k norms included)."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for p in "qkv":
        per_layer[f"self_attn.{p}_proj.weight"] = f"attn_{p}.weight"
        per_layer[f"self_attn.{p}_proj.bias"] = f"attn_{p}.bias"
    for p in "qk":
        per_layer[f"self_attn.{p}_norm.weight"] = f"attn_{p}_norm.weight"
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"blk.{i}.{theirs}"
    return names


def gguf_architecture(cfg) -> str:
    from ownllm.interop.hf import hf_family

    family = hf_family(cfg)
    if family == "Gemma3":
        raise OwnLLMError("a Gemma 3 run is not written to GGUF here (llama.cpp reads Gemma files with a SentencePiece "
                          "vocabulary); use the Hugging Face export and llama.cpp's converter for it")
    return "llama" if family == "Mistral" else family.lower()   # llama.cpp reads Mistral as llama


def gguf_metadata(cfg, tok, name: str, file_type: int) -> dict:
    from ownllm.interop.gguf_import import pre_tokenizer_name
    from ownllm.tokenizer import SPECIAL_TOKENS

    spec = json.loads(tok.hf.to_str())
    pre = pre_tokenizer_name(spec)
    if pre is None:
        raise OwnLLMError("the tokenizer is not a byte-level BPE whose split llama.cpp names (a SentencePiece-style "
                          "vocabulary, or a pre-tokenizer of its own): export to a Hugging Face directory and "
                          "convert that with llama.cpp's convert_hf_to_gguf.py")
    vocab = spec["model"]["vocab"]
    tokens = [""] * tok.vocab_size
    for piece, i in vocab.items():
        tokens[i] = piece
    specials, user = set(), set()
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        (specials if added.get("special") else user).add(added["id"])
    if any(t == "" for t in tokens):
        raise OwnLLMError("tokenizer: some ids have no token; cannot write a GGUF vocabulary")
    if cfg.vocab_size < len(tokens):
        raise OwnLLMError(f"the tokenizer has {len(tokens)} tokens but the model only {cfg.vocab_size} embedding rows")
    n_real = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n_real, cfg.vocab_size)]  # llama.cpp wants one token per embedding row
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    specials |= {tok.hf.token_to_id(t) for t in SPECIAL_TOKENS}
    # an imported template names its own bos/eos; ours are <|bos|> and <|eos|>
    named = tok.template.variables if tok.template else {}
    bos, eos = (tok.hf.token_to_id(named[k]) if named.get(k) else None for k in ("bos_token", "eos_token"))
    bos = tok.bos_id if bos is None else bos
    eos = tok.eos_id if eos is None else eos
    # a tokenizer that prepends bos by itself (Llama 3's post-processor) tells llama.cpp to do the same
    adds_bos = tok.template is not None and tok.hf.encode("a", add_special_tokens=True).ids[:1] == [bos]
    arch = gguf_architecture(cfg)
    a = arch + "."
    meta = {
        "general.name": name, "general.file_type": file_type,
        a + "vocab_size": cfg.vocab_size, a + "context_length": cfg.max_seq_len,
        a + "embedding_length": cfg.dim, a + "block_count": cfg.n_layers,
        a + "feed_forward_length": cfg.ffn_dim, a + "rope.dimension_count": cfg.head_dim,
        a + "attention.head_count": cfg.n_heads, a + "attention.head_count_kv": cfg.n_kv_heads,
        a + "attention.key_length": cfg.head_dim, a + "attention.value_length": cfg.head_dim,
        a + "attention.layer_norm_rms_epsilon": float(cfg.norm_eps), a + "rope.freq_base": float(cfg.rope_theta),
    }
    if cfg.rope_scaling:
        meta.update({a + "rope.scaling.type": "linear", a + "rope.scaling.factor": float(cfg.rope_scaling["factor"])})
    if cfg.sliding_window:
        meta[a + "attention.sliding_window"] = cfg.sliding_window
    meta.update({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TOKEN_UNUSED if i >= n_real else TOKEN_CONTROL if i in specials
                                      else TOKEN_USER_DEFINED if i in user else TOKEN_NORMAL
                                      for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.eot_token_id": tok.stop_ids[0],
        "tokenizer.ggml.add_bos_token": adds_bos, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tok.chat_template,
    })
    return meta


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """Metadata (bool, int: uint32 or int32 if negative, float: float32, str, list of str or int)
    and tensors ({name: (array, gguf type name)}; float arrays are quantised here, uint8 arrays
    are taken as blocks already in that type) as one file."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(path, arch)
    for key, v in metadata.items():
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v) if v >= 0 else w.add_int32(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, list):
            w.add_array(key, v)
        else:
            raise TypeError(f"no GGUF type for {key}: {type(v).__name__}")
    for name, (arr, kind) in tensors.items():
        qtype = GGMLQuantizationType[kind]
        if arr.dtype == np.uint8:
            w.add_tensor(name, arr, raw_dtype=qtype)
        elif kind in ("F32", "F16"):
            w.add_tensor(name, arr.astype(np.float32 if kind == "F32" else np.float16))
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def export_gguf(run: str | Path, out: str | Path, dtype: str = "float16", overwrite: bool = False) -> dict:
    """Write run `run` as one GGUF file at `out` (written beside it, then renamed into place)."""
    from ownllm.interop.hf import SMEAR_HINT, SMEAR_UNEXPORTABLE
    from ownllm.checkpoint import load_plain
    from ownllm.tokenizer import Tokenizer

    run, out = Path(run), Path(out)
    if dtype not in FILE_TYPES:
        raise OwnLLMError(f"--dtype {dtype}: GGUF export writes {', '.join(FILE_TYPES)}")
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
    if cfg.attn_head_dim and not cfg.qk_norm:
        raise OwnLLMError(f"{run}: a head size other than dim / n_heads outside the Qwen3 layout; llama.cpp's "
                          "llama and qwen2 architectures cannot hold it — use the Hugging Face export for it")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") != "linear":
        raise OwnLLMError(f"{run}: RoPE scaling {cfg.rope_scaling.get('rope_type')!r} (Llama 3) is not written to "
                          "GGUF here — use the Hugging Face export and llama.cpp's converter for it")
    tok = Tokenizer.load(run)
    file_type, kind = FILE_TYPES[dtype]
    arch = gguf_architecture(cfg)
    names = gguf_tensor_names(cfg.n_layers)
    tensors = {}
    for ours, t in state.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        t = t.detach().float()
        if arch == "llama" and ours.endswith("q_proj.weight"):
            t = permute_rope(t, cfg.n_heads)
        elif arch == "llama" and ours.endswith("k_proj.weight"):
            t = permute_rope(t, cfg.n_kv_heads)
        arr = t.numpy()
        blocked = kind in ("F32", "F16", "BF16") or arr.shape[-1] % 32 == 0
        tensors[names[ours]] = (arr, "F32" if arr.ndim == 1 else kind if blocked else "F16")
    meta = gguf_metadata(cfg, tok, run.name, file_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        write_gguf(tmp, arch, meta, tensors)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "architecture": f"{arch} (GGUF)", "dtype": dtype, "tensors": len(tensors),
            "parameters": sum(a.size for a, _ in tensors.values()), "bytes": out.stat().st_size,
            "lora_merged": lora_merged}

