"""GGUF import (`ownllm import FILE.gguf`): a llama.cpp / ollama / LM Studio model file → a run.

Where it sits: beside the Hugging Face import (hf.py), ending in the same run layout so every
later stage (chat, sft --lora, dpo, serve, export) treats the model like any other run. The file
is read with the `gguf` package (llama.cpp's own reader) and every tensor is dequantised with its
numpy dequantisation (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants); nothing here decodes
a quantised block itself.

  - Architectures: `llama` (SmolLM, Llama, Mistral files, a sliding window included), `qwen2`,
    `qwen3`; anything else (Gemma's files carry a SentencePiece vocabulary, below), MoE and RoPE
    frequency tables are refused by name. llama.cpp's converter
    permutes the q/k rows of `llama` files into interleaved RoPE pairs; that is undone here (Qwen
    files keep rotate-half order, as we use).
  - The tokenizer is rebuilt from the metadata as an HF `tokenizers` byte-level BPE with the
    pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre` (a table below; an unknown name is
    refused, never guessed); control tokens become special tokens, and the chat template, bos/eos
    and end-of-turn ids come along.
  - A downloaded file is untrusted: the header is walked once with every length and array count
    bounded by the file's size before the reader sees it, and every tensor's bytes must lie inside
    the file and its shape match the config before anything is dequantised.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np
import torch

from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError

ARCHITECTURES = ("llama", "qwen2", "qwen3")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

# GPT-2's split, and the ones of llama.cpp's pre-tokenizer types (llama-vocab.cpp) that we rebuild.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# (spelled as the models' tokenizer.json files spell them; llama.cpp writes the (?i:...) out by hand)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name → (isolate every digit first, the word regex, ignore_merges)
PRE_TOKENIZERS = {
    **{name: (False, GPT2_REGEX, False) for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: (True, GPT2_REGEX, False) for name in ("smollm", "refact", "starcoder", "codeshell", "exaone")},
    **{name: (False, QWEN2_REGEX, False) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
    "llama-bpe": (False, LLAMA3_REGEX, True),
}
# the name a GGUF export writes for each split
CANONICAL_PRE = {"gpt2": PRE_TOKENIZERS["gpt2"], "refact": PRE_TOKENIZERS["refact"],
                 "qwen2": PRE_TOKENIZERS["qwen2"], "llama-bpe": PRE_TOKENIZERS["llama-bpe"]}


def build_pre_tokenizer(name: str):
    """The `tokenizers` pre-tokenizer that splits text as llama.cpp's pre-tokenizer `name` does."""
    from tokenizers import Regex, pre_tokenizers

    digits, regex, _ = PRE_TOKENIZERS[name]
    split = [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")] if digits else []
    if regex == GPT2_REGEX:
        return pre_tokenizers.Sequence([*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([*split, pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def pre_tokenizer_name(spec: dict) -> str | None:
    """The llama.cpp pre-tokenizer name for a tokenizer.json (parsed), or None when it is not a
    byte-level BPE whose split llama.cpp knows (a SentencePiece-style vocabulary, another regex)."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
        return None
    steps = list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]
    digits = False
    if steps and (steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
                  or steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": r"\p{N}"}
                  and steps[0].get("behavior") == "Isolated"):
        digits, steps = True, steps[1:]
    if [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        regex = GPT2_REGEX
    elif ([s.get("type") for s in steps] == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        regex = (steps[0].get("pattern") or {}).get("Regex")
    else:
        return None
    return next((name for name, (d, r, _) in CANONICAL_PRE.items() if (d, r) == (digits, regex)), None)

# value types of the GGUF spec → byte size (strings and arrays are walked)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_header(path: Path) -> None:
    """Walk the header of a GGUF file with every length bounded by the file's size, so a forged
    count can neither run the reader past the end nor loop it over billions of empty items."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 24:
            raise OwnLLMError(f"{path}: {size} bytes is too short for a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                raise OwnLLMError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            version, = struct.unpack_from("<I", m, 4)
            if version not in (2, 3):
                raise OwnLLMError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
            n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
            pos = 24

            def need(n: int, what: str) -> None:
                if n < 0 or pos + n > size:
                    raise OwnLLMError(f"{path}: truncated or corrupt header ({what} at byte {pos} runs past "
                                      f"the end of the {size}-byte file)")

            def u(fmt: str, what: str):
                nonlocal pos
                need(struct.calcsize(fmt), what)
                v, = struct.unpack_from(fmt, m, pos)
                pos += struct.calcsize(fmt)
                return v

            def string(what: str) -> None:
                nonlocal pos
                n = u("<Q", what)
                need(n, what)
                pos += n

            def value(kind: int, what: str) -> None:
                nonlocal pos
                if kind == _STRING:
                    string(what)
                elif kind == _ARRAY:
                    sub, count = u("<I", what), u("<Q", what)
                    if sub == _ARRAY:
                        raise OwnLLMError(f"{path}: {what}: nested arrays are not read")
                    if sub in _SCALAR_SIZES:
                        need(count * _SCALAR_SIZES[sub], what)
                        pos += count * _SCALAR_SIZES[sub]
                    elif sub == _STRING:
                        need(count * 8, what)         # every string has at least its 8-byte length
                        for _ in range(count):
                            string(what)
                    else:
                        raise OwnLLMError(f"{path}: {what}: unknown array type {sub}")
                elif kind in _SCALAR_SIZES:
                    need(_SCALAR_SIZES[kind], what)
                    pos += _SCALAR_SIZES[kind]
                else:
                    raise OwnLLMError(f"{path}: {what}: unknown value type {kind}")

            need(n_kv * 13, "metadata")             # a key length, a type and one byte at least
            for i in range(n_kv):
                string(f"metadata key {i}")
                value(u("<I", f"metadata key {i}"), f"metadata value {i}")
            need(n_tensors * 24, "tensor table")
            for i in range(n_tensors):
                string(f"tensor {i} name")
                dims = u("<I", f"tensor {i}")
                if dims > 4:
                    raise OwnLLMError(f"{path}: tensor {i} has {dims} dimensions (GGUF allows 4)")
                need(8 * dims + 12, f"tensor {i}")
                pos += 8 * dims + 12


class GGUFFile:
    """A GGUF file opened for import: its metadata as Python values and its tensors (memory-mapped)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise OwnLLMError(f"{self.path}: no such file")
        check_header(self.path)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, struct.error) as e:
            raise OwnLLMError(f"{self.path}: not a readable GGUF file ({e})") from None
        size = self.path.stat().st_size
        self.arch = self.get("general.architecture")
        self.tensors = {}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise OwnLLMError(f"{self.path}: tensor {t.name}'s data runs past the end of the file")
            self.tensors[t.name] = t

    def get(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            v = f.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise OwnLLMError(f"{self.path}: metadata {key} is unreadable ({e})") from None
        return v

    def require(self, key: str, kind=int):
        v = self.get(key)
        if v is None:
            raise OwnLLMError(f"{self.path}: metadata {key} is missing")
        if kind in (int, float) and (isinstance(v, (list, str, bool)) or not isinstance(v, (int, float))):
            raise OwnLLMError(f"{self.path}: metadata {key} = {str(v)[:60]!r}: expected one number")
        return kind(v)

    def drop_metadata(self) -> None:
        """Free the reader's parsed metadata once the config and tokenizer are read: its per-token
        arrays (one small numpy object per token and merge) cost more than a small model's weights.
        `get` answers None afterwards; the architecture stays in `arch`."""
        import gc

        self.reader.fields.clear()
        for t in self.tensors.values():
            t.field.parts.clear()
        gc.collect()

    def token_types(self) -> list[int]:
        f = self.reader.fields.get("tokenizer.ggml.token_type")
        return [int(f.parts[i][0]) for i in f.data] if f is not None else []


def model_config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.arch
    if arch in ("gemma3", "gemma2", "gemma"):
        raise OwnLLMError(f"{g.path}: architecture {arch!r}: Gemma's GGUF files carry a SentencePiece vocabulary, "
                          "which is not read from GGUF; import the model's Hugging Face directory or hub id instead "
                          "(Gemma 3 text models are read from there)")
    if arch not in ARCHITECTURES:
        raise OwnLLMError(f"{g.path}: architecture {arch!r}; GGUF import reads {', '.join(ARCHITECTURES)} "
                          "(Phi, MoE and other architectures are not supported)")
    a = f"{arch}."
    if (g.get(a + "expert_count") or 0) > 0:
        raise OwnLLMError(f"{g.path}: a mixture-of-experts model ({a}expert_count); not supported")
    window = int(g.get(a + "attention.sliding_window") or 0)
    if window and arch != "llama":   # Qwen's windows cover only some layers, which the file does not say
        raise OwnLLMError(f"{g.path}: {a}attention.sliding_window is set; sliding windows are read for `llama` files")
    if "rope_freqs.weight" in g.tensors:
        raise OwnLLMError(f"{g.path}: has a RoPE frequency table (rope_freqs.weight, Llama 3.1-style scaling); "
                          "import the model's Hugging Face directory instead (--hf)")
    scaling = g.get(a + "rope.scaling.type") or "none"
    if scaling not in ("none", "linear"):
        raise OwnLLMError(f"{g.path}: RoPE scaling {scaling!r} is not supported (linear is)")
    kv = g.get(a + "attention.head_count_kv")
    if isinstance(kv, list):
        raise OwnLLMError(f"{g.path}: {a}attention.head_count_kv differs per layer; not supported")
    dim, n_heads = g.require(a + "embedding_length"), g.require(a + "attention.head_count")
    if n_heads <= 0 or dim <= 0:
        raise OwnLLMError(f"{g.path}: {a}embedding_length and {a}attention.head_count must be positive")
    head_dim = int(g.get(a + "attention.key_length") or dim // n_heads)
    if int(g.get(a + "attention.value_length") or head_dim) != head_dim:
        raise OwnLLMError(f"{g.path}: key and value head sizes differ; not supported")
    if int(g.get(a + "rope.dimension_count") or head_dim) != head_dim:
        raise OwnLLMError(f"{g.path}: RoPE over part of each head ({a}rope.dimension_count) is not supported")
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise OwnLLMError(f"{g.path}: no token_embd.weight tensor")
    vocab = int(g.get(a + "vocab_size") or emb.shape[-1])
    try:
        return ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=g.require(a + "block_count"), n_heads=n_heads,
            n_kv_heads=int(kv or n_heads), ffn_dim=g.require(a + "feed_forward_length"),
            max_seq_len=int(g.get(a + "context_length") or 2048),
            rope_theta=float(g.get(a + "rope.freq_base") or 10000.0),
            norm_eps=float(g.get(a + "attention.layer_norm_rms_epsilon") or 1e-5),
            tie_embeddings="output.weight" not in g.tensors, attention_bias=arch == "qwen2",
            attn_head_dim=head_dim if head_dim * n_heads != dim else 0, qk_norm=arch == "qwen3",
            rope_scaling={"rope_type": "linear", "factor": float(g.require(a + "rope.scaling.factor", float))}
            if scaling == "linear" else None,
            sliding_window=window if window < int(g.get(a + "context_length") or 2048) else 0)
    except OwnLLMError as e:
        raise OwnLLMError(f"{g.path}: {e}") from None


def gguf_to_ours(n_layers: int) -> dict[str, str]:
    """llama.cpp's tensor names → ours (biases and q/k norms included)."""
    from ownllm.interop.gguf import gguf_tensor_names

    names = {theirs: ours for ours, theirs in gguf_tensor_names(n_layers).items()}
    for i in range(n_layers):
        for p in "qkv":
            names[f"blk.{i}.attn_{p}.bias"] = f"layers.{i}.self_attn.{p}_proj.bias"
        for p in "qk":
            names[f"blk.{i}.attn_{p}_norm.weight"] = f"layers.{i}.self_attn.{p}_norm.weight"
    return names


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from llama.cpp's interleaved pairs back to rotate-half order
    (the inverse of interop.gguf.permute_rope)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(g: GGUFFile, cfg: ModelConfig, expected: dict[str, tuple],
                    store: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor dequantised (to float32, then `store`) under our names; shapes are checked against `expected`
    (the config's, from a model on the meta device) before a byte is dequantised."""
    names = gguf_to_ours(cfg.n_layers)
    unknown = sorted(set(g.tensors) - set(names))
    if unknown:
        raise OwnLLMError(f"{g.path}: tensors this architecture does not have: {', '.join(unknown[:3])}")
    for name, t in g.tensors.items():
        ours = names[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        want = expected.get(ours)
        if ours in ("embed_tokens.weight", "lm_head.weight") and want:
            want = (cfg.vocab_size, *want[1:])
        if want is None or shape != tuple(want):
            raise OwnLLMError(f"{g.path}: tensor {name} has shape {shape}, the metadata implies {want}")
    state = {}
    arch = g.arch
    for name, t in g.tensors.items():
        ours = names[name]
        x = _dequantize(g, name, t, store)
        if arch == "llama" and ours.endswith("q_proj.weight"):
            x = unpermute_rope(x, cfg.n_heads)
        elif arch == "llama" and ours.endswith("k_proj.weight"):
            x = unpermute_rope(x, cfg.n_kv_heads)
        state[ours] = x.contiguous()
    return state


def _dequantize(g: GGUFFile, name: str, t, store: torch.dtype, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """One tensor through gguf's dequantisation, a block of rows at a time into a tensor of the
    stored dtype, so a large embedding never exists as a whole float32 copy."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = expected_shape(t)
    rows = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
    out = torch.empty((rows.shape[0], shape[-1]), dtype=store)
    step = max(1, chunk_elements // max(1, shape[-1]))
    for r in range(0, rows.shape[0], step):
        try:
            arr = dequantize(rows[r:r + step], GGMLQuantizationType(t.tensor_type))
        except NotImplementedError:
            raise OwnLLMError(f"{g.path}: tensor {name} is {t.tensor_type.name}, which the gguf package "
                              "cannot dequantise") from None
        out[r:r + step] = torch.from_numpy(np.require(arr, np.float32, ["C", "W"])).reshape(-1, shape[-1])
    return out.reshape(shape)


def expected_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def source_dtype(g: GGUFFile) -> str:
    """The dtype that keeps a file's precision: float32 or float16 when every matrix is that,
    else bfloat16 (quantised weights gain nothing from more)."""
    kinds = {t.tensor_type.name for t in g.tensors.values() if len(t.shape) > 1}
    return "float32" if kinds <= {"F32"} else "float16" if kinds <= {"F16"} else "bfloat16"


def gguf_tokenizer(g: GGUFFile):
    """(HF tokenizers object, tokenizer_config-style dict with the chat template and the token
    strings it names, stop-token strings) from the file's metadata."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    kind = g.get("tokenizer.ggml.model")
    if kind == "llama":
        raise OwnLLMError(f"{g.path}: a SentencePiece-style vocabulary (tokenizer.ggml.model 'llama': Gemma, "
                          "Llama 2, Mistral v0.1-0.3 files) is not read from GGUF yet; import the model's Hugging "
                          "Face directory instead (--hf), whose tokenizer.json is read")
    if kind != "gpt2":
        raise OwnLLMError(f"{g.path}: tokenizer.ggml.model {kind!r}; GGUF import reads byte-level BPE ('gpt2')")
    pre = g.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise OwnLLMError(f"{g.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one ownllm rebuilds "
                          f"(known: {', '.join(sorted(PRE_TOKENIZERS))}); a guess would split text differently "
                          "from llama.cpp, so it is refused")
    tokens, merges, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.merges") or [], g.token_types()
    if not isinstance(tokens, list) or not tokens:
        raise OwnLLMError(f"{g.path}: metadata tokenizer.ggml.tokens is missing")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise OwnLLMError(f"{g.path}: tokenizer.ggml.tokens holds the same token twice")
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise OwnLLMError(f"{g.path}: merge {m[:40]!r} is not two tokens")
        pairs.append((m[:cut], m[cut + 1:]))
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=PRE_TOKENIZERS[pre][2]))
    tok.pre_tokenizer = build_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, kind in enumerate(types) if kind == TOKEN_CONTROL and i < len(tokens)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == TOKEN_USER_DEFINED and i < len(tokens)]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)

    def named(key: str) -> str | None:
        i = g.get(key)
        return tokens[i] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) else None

    tok_cfg = {k: t for k, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                                   ("unk_token", "unknown")) if (t := named(f"tokenizer.ggml.{key}_token_id"))}
    tok_cfg["chat_template"] = g.get("tokenizer.chat_template")
    stops = [t for key in ("eot", "eom", "eos") if (t := named(f"tokenizer.ggml.{key}_token_id"))]
    return tok, tok_cfg, list(dict.fromkeys(stops))


def import_gguf(src: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> dict:
    """A GGUF file → an ownllm run; `dtype` of the stored weights (default: the source's precision)."""
    from ownllm.interop.hf import finish_import, with_chat_tokens

    g = GGUFFile(src)
    cfg = model_config_from_gguf(g)
    hf_tok, tok_cfg, stops = gguf_tokenizer(g)
    tok, added = with_chat_tokens(hf_tok, tok_cfg, stops, origin=f"{g.path} (tokenizer.chat_template)")
    g.drop_metadata()
    return finish_import(str(g.path), cfg, tok, added, lambda expected, store: gguf_state_dict(g, cfg, expected, store),
                         out, dtype or source_dtype(g), overwrite)
