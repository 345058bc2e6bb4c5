"""Hugging Face `LlamaForCausalLM` layout: config, weight-name mapping, and `ownllm export`.

Where it sits: `ownllm export --run R --out DIR` writes a run as a directory that
`transformers` loads with `AutoModelForCausalLM.from_pretrained(DIR)` (a reward model: with
`AutoModelForSequenceClassification`, one label) and `AutoTokenizer.from_pretrained(DIR)`,
chat template included; tests check logits, chat-template ids and greedy generations against
transformers. Our parameter names are HF's without the leading `model.` (lm_head keeps its
name), so the mapping is a prefix; no tensor is permuted because we use HF's rotate-half RoPE
convention. LoRA adapters are folded into the weights on the way out.
`ownllm import DIR --out R` goes the other way for a Llama, Qwen2 or Qwen3 directory (single or
sharded safetensors, stored in the checkpoint's own float type unless --dtype says otherwise;
`finish_import` is shared with the GGUF import): an ownllm export trained elsewhere
comes back unchanged; another model keeps its tokenizer, gains ownllm's chat tokens and keeps its
own chat template (`import_hf`). Sliding windows, other RoPE scalings and other features the
model cannot run exactly are refused by name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ownllm.config import ROPE_SCALING_KEYS, ModelConfig, read_json
from ownllm.errors import OwnLLMError

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SMEAR_UNEXPORTABLE = ("mixes each token's embedding with the previous one's (model.smear), which no transformers "
                      "or GGUF architecture does")
SMEAR_HINT = "; cannot export (train with --set model.smear=false to export)"


def hf_family(cfg: ModelConfig) -> str:
    """The transformers architecture a config is: Gemma 3's sandwich norms, scaled embeddings, GeGLU
    and q/k norms together are Gemma3; a sliding window on every layer Mistral; q/k norms Qwen3,
    q/k/v biases (none on o_proj) Qwen2, neither Llama."""
    if cfg.smear:
        raise OwnLLMError(f"the model {SMEAR_UNEXPORTABLE}{SMEAR_HINT}")
    if cfg.sandwich_norms or cfg.embed_scale or cfg.hidden_act != "silu" or cfg.layer_types or cfg.rope_local_theta:
        if cfg.sandwich_norms and cfg.embed_scale and cfg.hidden_act == "gelu_tanh" and cfg.qk_norm \
                and not cfg.attention_bias:
            return "Gemma3"
        raise OwnLLMError("this mix of Gemma 3 features (scaled embeddings, sandwich norms, GeGLU, layer types) "
                          "matches no transformers architecture; cannot export")
    if cfg.qk_norm and cfg.attention_bias:
        raise OwnLLMError("q/k norms with q/k/v biases match no transformers architecture; cannot export")
    if cfg.sliding_window:
        if cfg.qk_norm or cfg.attention_bias:
            raise OwnLLMError("a sliding window on every layer with Qwen's q/k norms or biases matches no "
                              "transformers architecture ownllm writes; cannot export")
        return "Mistral"
    return "Qwen3" if cfg.qk_norm else "Qwen2" if cfg.attention_bias else "Llama"


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def hf_config_dict(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None) -> dict[str, Any]:
    family = hf_family(cfg)
    rope = {"rope_type": "default", **(cfg.rope_scaling or {})}
    if family == "Gemma3":
        return {**_hf_base(cfg, family, rope, bos_id, eos_id, pad_id), "model_type": "gemma3_text",
                "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": round(cfg.attn_scale ** -2) if cfg.attn_scale
                else cfg.head_dim, "sliding_window": cfg.sliding_window or None,
                "layer_types": cfg.layer_types or ["full_attention"] * cfg.n_layers,
                "rope_parameters": {"full_attention": {**rope, "rope_theta": cfg.rope_theta},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": cfg.rope_local_theta or cfg.rope_theta}},
                "final_logit_softcapping": None, "attn_logit_softcapping": None}
    out = _hf_base(cfg, family, rope, bos_id, eos_id, pad_id)
    if family == "Mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def _hf_base(cfg: ModelConfig, family: str, rope: dict, bos_id, eos_id, pad_id) -> dict[str, Any]:
    return {
        "architectures": [f"{family}ForCausalLM"],
        "model_type": family.lower(),
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "rope_scaling": cfg.rope_scaling,   # the transformers 4 name
        "hidden_act": "silu",
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    gemma = hf_family(cfg) == "Gemma3"
    for name, t in state.items():
        if gemma and is_norm(name):   # Gemma's RMSNorm scales by 1 + w: we keep 1 + w, it stores w
            t = (t.float() - 1).to(t.dtype)
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
        else:
            out["model." + name] = t
    return out


def to_hf_reward_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reward model as `LlamaForSequenceClassification`: the scalar head is HF's `score`; our
    unused language-model head stays behind."""
    return {("score.weight" if n == "score.weight" else "model." + n): t for n, t in state.items()
            if n != "lm_head.weight"}


def _model_card(run: Path, cfg: ModelConfig, arch: str, dtype: str, stops: list[str]) -> str:
    auto = "AutoModelForSequenceClassification" if cfg.score_head else "AutoModelForCausalLM"
    return (f"---\nlibrary_name: transformers\ntags:\n- ownllm\n- {hf_family(cfg).lower()}\n---\n"
            f"# {run.name}\n\nExported by `ownllm export` from the run `{run}` as `{arch}` ({dtype}): "
            f"{cfg.num_params() / 1e6:.2f}M parameters, {cfg.n_layers} layers, dim {cfg.dim}, "
            f"vocab {cfg.vocab_size}, context {cfg.max_seq_len} tokens.\n\n"
            f"```python\nfrom transformers import AutoTokenizer, {auto}\n"
            f"tok = AutoTokenizer.from_pretrained(PATH)\nmodel = {auto}.from_pretrained(PATH)\n```\n\n"
            "The chat template is the tokenizer's (`tok.apply_chat_template(messages, add_generation_prompt=True)`);"
            f" a turn ends with {' or '.join(f'`{t}`' for t in stops)}, which generation_config.json lists as"
            " end-of-sequence tokens.\n")


def export_hf(run: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write run `run` as a Hugging Face model directory at `out`; returns a summary. The
    directory is assembled beside `out` and moved into place at the end, so a failed export
    leaves nothing half-written (and an existing `out` untouched unless `overwrite`)."""
    from safetensors.torch import save_file

    from ownllm.checkpoint import load_plain
    from ownllm.tokenizer import BOS, EOS, Tokenizer

    run, out = Path(run), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise OwnLLMError(f"--dtype {dtype}: expected one of {', '.join(EXPORT_DTYPES)}")
    if out.resolve() == run.resolve():
        raise OwnLLMError(f"{out}: is the run itself; export to another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
            raise OwnLLMError(f"{out}: exists and is not a model directory; export to a new or empty directory")
        if not overwrite:
            raise OwnLLMError(f"{out}: already holds a model; pass --overwrite to replace it")
    if not (run / "config.json").is_file():
        raise OwnLLMError(f"--run {run}: no config.json; expected a run directory")
    cfg, state, lora_merged = load_plain(run)
    if cfg.score_likelihood:
        raise OwnLLMError(f"{run}: a reward model whose score adds the answer's gated log-likelihood to its head "
                          "(`ownllm reward`'s default) has no Hugging Face architecture; train one with "
                          "`--set likelihood=false` to export it")
    tok = Tokenizer.load(run)
    family = hf_family(cfg)
    if cfg.score_head:
        arch = f"{family}ForSequenceClassification"
        weights = to_hf_reward_state_dict(state)
    else:
        arch = f"{family}ForCausalLM"
        weights = to_hf_state_dict(state, cfg)
    weights = {k: v.detach().to(EXPORT_DTYPES[dtype]).contiguous() for k, v in weights.items()}
    # an imported model's template names its own bos/eos tokens; stop_ids end a reply either way
    named = tok.template.variables if tok.template else {"bos_token": BOS, "eos_token": EOS}
    bos_id, eos_id = (tok.hf.token_to_id(named[k]) if named.get(k) else None for k in ("bos_token", "eos_token"))
    hf_cfg = hf_config_dict(cfg, bos_id, eos_id, tok.pad_id)
    hf_cfg.update(architectures=[arch], torch_dtype=dtype)
    if cfg.score_head:
        hf_cfg.update(num_labels=1, id2label={"0": "reward"}, label2id={"reward": 0})
    gen_cfg = {"bos_token_id": bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        tok.save(tmp, model_max_length=cfg.max_seq_len)
        stops = [tok.hf.id_to_token(i) for i in tok.stop_ids]
        (tmp / "README.md").write_text(_model_card(run, cfg, arch, dtype, stops), encoding="utf-8")
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        if out.exists():
            out.rename(old)      # the earlier export stays whole until the new one is in place
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "architecture": arch, "dtype": dtype, "tensors": len(weights),
            "parameters": sum(v.numel() for v in weights.values()),
            "bytes": (out / "model.safetensors").stat().st_size, "lora_merged": lora_merged}


IMPORTABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def model_config_from_hf(d: dict[str, Any], source: str) -> ModelConfig:
    """Our ModelConfig for a transformers Llama, Mistral, Qwen2, Qwen3 or Gemma 3 (text) `config.json`;
    anything the model cannot run exactly (Qwen's layer-limited sliding windows, other RoPE
    scalings, another activation, logit soft-capping) is refused by name."""
    kind = d.get("model_type")
    if kind == "gemma3":
        raise OwnLLMError(f"{source}: model_type 'gemma3' is Gemma 3 with its vision tower; `ownllm import` reads "
                          "text-only Gemma 3 models (model_type 'gemma3_text', e.g. gemma-3-1b-it)")
    if kind not in IMPORTABLE:
        raise OwnLLMError(f"{source}: model_type {kind!r}; `ownllm import` reads the Llama, Mistral, Qwen2, Qwen3 and "
                          f"Gemma 3 architectures (model_type {', '.join(map(repr, IMPORTABLE))})")
    gemma = kind == "gemma3_text"
    act_key = "hidden_activation" if gemma else "hidden_act"
    checks = [("mlp_bias", False), (act_key, "gelu_pytorch_tanh" if gemma else "silu")]
    checks += [("use_sliding_window", False)] if kind in ("qwen2", "qwen3") else []
    checks += [("attention_bias", False)] if kind != "qwen2" else []   # Qwen2's q/k/v biases are implied
    checks += [("final_logit_softcapping", None), ("attn_logit_softcapping", None),
               ("use_bidirectional_attention", False)] if gemma else []
    for key, ok in checks:
        if d.get(key, ok) != ok:
            raise OwnLLMError(f"{source}: {key}={d[key]!r} is not supported (expected {ok!r})")
    full, local = _rope_params(d, gemma, source)
    try:
        dim, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        if dim <= 0 or n_heads <= 0:
            raise OwnLLMError(f"hidden_size={dim} and num_attention_heads={n_heads} must be positive")
        head_dim = int(d.get("head_dim") or dim // n_heads)
        n_layers, max_len = int(d["num_hidden_layers"]), int(d.get("max_position_embeddings", 2048))
        window = int(d.get("sliding_window") or 0) if kind in ("mistral", "gemma3_text") else 0
        layer_types = None
        if gemma:
            layer_types = d.get("layer_types") or [
                "full_attention" if (i + 1) % int(d.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
                for i in range(n_layers)]
        elif window >= max_len:
            window = 0   # a window as long as the context changes nothing (Mistral v0.1's 4096 of 32k does)
        theta = full.get("rope_theta", d.get("rope_theta", 1_000_000.0 if gemma else 10000.0))
        scaling = {"rope_type": full["rope_type"], **{k: full.get(k) for k in ROPE_SCALING_KEYS[full["rope_type"]]}} \
            if full["rope_type"] != "default" else None
        return ModelConfig(vocab_size=int(d["vocab_size"]), dim=dim, n_layers=n_layers,
                           n_heads=n_heads, n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                           ffn_dim=int(d["intermediate_size"]), max_seq_len=max_len,
                           rope_theta=float(theta), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                           tie_embeddings=bool(d.get("tie_word_embeddings", gemma)), attention_bias=kind == "qwen2",
                           attn_head_dim=head_dim if head_dim * n_heads != dim else 0,
                           qk_norm=kind in ("qwen3", "gemma3_text"), rope_scaling=scaling,
                           sliding_window=window, layer_types=layer_types,
                           rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", 10000.0)))
                           if gemma else 0.0,
                           hidden_act="gelu_tanh" if gemma else "silu", embed_scale=gemma, sandwich_norms=gemma,
                           attn_scale=float(d.get("query_pre_attn_scalar", head_dim)) ** -0.5 if gemma else 0.0)
    except KeyError as e:
        raise OwnLLMError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise OwnLLMError(f"{source}: a size field is not a number ({e})") from None
    except OwnLLMError as e:
        raise OwnLLMError(f"{source}: {e}") from None


def _rope_params(d: dict, gemma: bool, source: str) -> tuple[dict, dict]:
    """(full layers' RoPE parameters, sliding layers') from transformers 5's `rope_parameters` (one
    dict, or one per layer type) or transformers 4's `rope_scaling`; unsupported kinds refused."""
    given = d.get("rope_parameters") or {}
    per_type = isinstance(given.get("full_attention"), dict)
    full = {**(given.get("full_attention") if per_type else given), **(d.get("rope_scaling") or {})}
    local = (given.get("sliding_attention") or {}) if per_type else {}
    full["rope_type"] = full.get("rope_type") or full.get("type") or "default"
    for which, params in (("", full), ("sliding layers' ", local)):
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in ROPE_SCALING_KEYS or (which and kind != "default"):
            raise OwnLLMError(f"{source}: {which}RoPE scaling {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_SCALING_KEYS) if not which else 'default'})")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise OwnLLMError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    return full, local


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise OwnLLMError(f"{index}: not a safetensors index (expected a 'weight_map' of file names)") from None
        root = src.resolve()
        for f in files:  # a shard named '../../x' or '/etc/x' must not be read
            if not isinstance(f, str) or not (src / f).resolve().is_relative_to(root):
                raise OwnLLMError(f"{index}: weight_map names {f!r}, which is not a file inside {src}")
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        extra = " (pytorch_model.bin is not read: pickles can run code; save it as safetensors)" \
            if (src / "pytorch_model.bin").exists() else ""
        raise OwnLLMError(f"{src}: no model.safetensors or model.safetensors.index.json{extra}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (src / f).is_file():
            raise OwnLLMError(f"{src / f}: listed in the index but missing")
        state.update(load_file(str(src / f)))
    return state


def _import_tokenizer(src: Path):
    """(Tokenizer, names of chat tokens added) of a transformers directory. An ownllm export comes
    back with the template it kept, if any; another model's tokenizer.json goes through
    `with_chat_tokens` with its tokenizer_config.json and generation_config.json's stops."""
    from ownllm.tokenizer import SPECIAL_TOKENS, Tokenizer, read_tokenizer_file, saved_template

    if not (src / "tokenizer.json").is_file():
        raise OwnLLMError(f"{src}: no tokenizer.json (a fast tokenizer file is needed; sentencepiece .model files are not read)")
    hf_tok = read_tokenizer_file(src)
    if all(hf_tok.token_to_id(t) is not None for t in SPECIAL_TOKENS):
        return Tokenizer(hf_tok, saved_template(src)), []
    tok_cfg = _json_object(src / "tokenizer_config.json")
    if tok_cfg.get("chat_template") is None and (src / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
    stops = _stop_tokens(hf_tok, tok_cfg, _json_object(src / "generation_config.json"), src)
    return with_chat_tokens(hf_tok, tok_cfg, stops, origin=str(src / "tokenizer_config.json"))


def with_chat_tokens(hf_tok, tok_cfg: dict, stops: list[str], origin: str):
    """(Tokenizer, names of chat tokens added): another model's tokenizer used as it is, gaining
    ownllm's chat tokens (appended as special tokens) where it lacks them, with its own chat
    template (`tok_cfg`, tokenizer_config.json's fields) ending replies at `stops`."""
    from tokenizers import AddedToken

    from ownllm.chat_template import ChatTemplate
    from ownllm.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

    missing = [t for t in SPECIAL_TOKENS if hf_tok.token_to_id(t) is None]
    if not missing and tok_cfg.get("chat_template") == CHAT_TEMPLATE:
        return Tokenizer(hf_tok), []        # ownllm's own tokenizer, back from a GGUF export
    hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    template = ChatTemplate.from_tokenizer_config(tok_cfg, stops, origin=origin)
    return Tokenizer(hf_tok, template), missing


def _json_object(path: Path) -> dict:
    """A JSON object file, or {} when it is absent (config.read_json names a corrupt one)."""
    if not path.is_file():
        return {}
    d = read_json(path)
    if not isinstance(d, dict):
        raise OwnLLMError(f"{path}: expected a JSON object")
    return d


def _stop_tokens(hf_tok, tok_cfg: dict, gen_cfg: dict, src: Path) -> list[str]:
    """Token strings that end a reply: generation_config.json's eos_token_id (one id or a list),
    else tokenizer_config.json's eos_token."""
    from ownllm.chat_template import token_text

    ids = gen_cfg.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    stops = []
    for i in ids:
        t = hf_tok.id_to_token(i) if isinstance(i, int) else None
        if t is None:
            raise OwnLLMError(f"{src / 'generation_config.json'}: eos_token_id {i!r} is not a token of tokenizer.json")
        stops.append(t)
    eos = token_text(tok_cfg.get("eos_token"))
    if eos and hf_tok.token_to_id(eos) is not None and eos not in stops:
        stops.append(eos)
    return stops


STORE_DTYPES = EXPORT_DTYPES


def import_hf(src: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> dict:
    """A transformers Llama / Qwen2 / Qwen3 directory → an ownllm run (config, weights in `dtype`,
    default the checkpoint's own float type; tokenizer). A tokenizer made by ownllm (an export
    trained elsewhere) comes back unchanged; another model's keeps all its tokens and gains
    ownllm's chat tokens (`finish_import`). Its own chat template comes along when it has one;
    without one, the model learns ours with `ownllm sft --base`."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise OwnLLMError(f"{src}: no config.json; expected a Hugging Face model directory")
    cfg = model_config_from_hf(_json_object(cfg_path), str(cfg_path))
    tok, added = _import_tokenizer(src)
    weights = read_hf_weights(src)
    if dtype is None:
        kinds = {t.dtype for t in weights.values() if t.is_floating_point()}
        dtype = next((k for k, v in STORE_DTYPES.items() if kinds == {v}), "float32")

    def state(expected, store):
        out = {}
        for name, t in weights.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if cfg.sandwich_norms and is_norm(name):   # Gemma stores w for a scale of 1 + w
                t = t.float() + 1
            out[name[len("model."):] if name.startswith("model.") else name] = t.to(store)
        return out

    return finish_import(str(src), cfg, tok, added, state, out, dtype, overwrite)


def finish_import(source: str, cfg: ModelConfig, tok, added: list[str], read_state, out: str | Path,
                  dtype: str, overwrite: bool) -> dict:
    """Write an imported model as a run. `read_state(expected, dtype)` gives its weights under our names
    (`expected`: the config's shapes, for checking before anything large is made). The config is
    checked against the weights on the meta device, so a forged size allocates nothing; `read_state`
    casts each tensor to the stored dtype as it goes, so no float32 copy of the whole model is made. Where
    ownllm's chat tokens need new embedding rows, those start at the mean of the existing rows
    (input and output), so plain text gives exactly the original logits over the original
    vocabulary. Weights are stored in `dtype`."""
    from ownllm.checkpoint import is_trained_run, refuse_overwrite, save_checkpoint
    from ownllm.model import GPT

    if dtype not in STORE_DTYPES:
        raise OwnLLMError(f"--dtype {dtype}: expected one of {', '.join(STORE_DTYPES)}")
    out = Path(out)
    if tok.vocab_size - len(added) > cfg.vocab_size:
        raise OwnLLMError(f"{source}: the tokenizer has {tok.vocab_size - len(added)} tokens but vocab_size is {cfg.vocab_size}")
    refuse_overwrite(out, overwrite)
    if out.exists() and any(out.iterdir()) and not is_trained_run(out):
        raise OwnLLMError(f"{out}: exists and is not a run directory; import to a new or empty directory")
    grown = max(0, tok.vocab_size - cfg.vocab_size)   # rows for chat tokens beyond the checkpoint's vocabulary
    with torch.device("meta"):
        model = GPT(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + grown))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    state = read_state(shapes, STORE_DTYPES[dtype])
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    if missing or unexpected:
        raise OwnLLMError(f"{source}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in state.items():
        want = (cfg.vocab_size, *shapes[k][1:]) if k in ("embed_tokens.weight", "lm_head.weight") else shapes[k]
        if tuple(t.shape) != want:
            raise OwnLLMError(f"{source}: {k} has shape {tuple(t.shape)}, the config implies {want}")
    for k in ("embed_tokens.weight", "lm_head.weight"):
        if grown and k in state:
            state[k] = torch.cat([state[k], state[k].mean(0, keepdim=True, dtype=torch.float32).to(state[k].dtype).expand(grown, -1)])
    state = {k: v.to(STORE_DTYPES[dtype]).contiguous() for k, v in state.items()}
    cfg = model.config
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out, model_max_length=cfg.max_seq_len)
    save_checkpoint(out, model, step=0, weights=state)
    return {"out": str(out), "parameters": cfg.num_params(), "layers": cfg.n_layers, "dim": cfg.dim,
            "vocab_size": cfg.vocab_size, "tied": cfg.tie_embeddings, "added_tokens": added, "new_rows": grown,
            "dtype": dtype, "bytes": (out / "model.safetensors").stat().st_size,
            "chat_template": tok.template is not None, "stop_tokens": tok.template.stop_tokens if tok.template else []}
