"""`ownllm export`: the Hugging Face directory loads in transformers and behaves like the run."""
import dataclasses
import json

import pytest
import torch

from ownllm.checkpoint import save_checkpoint
from ownllm.cli import main
from ownllm.config import ModelConfig
from ownllm.inference import Engine, SamplingParams
from ownllm.model import GPT
from tests.conftest import randomize_, save_foreign_model

transformers = pytest.importorskip("transformers")


def _run(tmp_path, tokenizer, name="run", **over):
    cfg = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=160, max_seq_len=96), **over})
    torch.manual_seed(0)
    model = randomize_(GPT(cfg)).eval()
    d = tmp_path / name
    tokenizer.save(d, model_max_length=cfg.max_seq_len)
    save_checkpoint(d, model)
    return d, model


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 7 2 9 4"},
        {"role": "assistant", "content": "2 4 7 9"}, {"role": "user", "content": "把 305 写成中文数字。"}]


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_the_same_logits_template_and_generations(tmp_path, small_tokenizer, tie):
    run, model = _run(tmp_path, small_tokenizer, tie_embeddings=tie)
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings == tie
    ids = small_tokenizer.render(MSGS, add_generation_prompt=True).ids
    theirs = hf_tok.apply_chat_template(MSGS, add_generation_prompt=True)
    assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)
    engine = Engine(model, small_tokenizer.pad_id)
    ours = engine.generate([ids], SamplingParams(max_new_tokens=12, temperature=0, stop_ids=()))[0]
    theirs = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12)[0, len(ids):]
    assert list(ours) == theirs.tolist()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [small_tokenizer.end_id, small_tokenizer.eos_id]
    assert not list(tmp_path.glob(".hf.export-*"))        # the staging directory is gone


def test_export_folds_lora_and_writes_reward_models_and_bf16(tmp_path, small_tokenizer):
    lora_run, lora = _run(tmp_path, small_tokenizer, "lora", lora_rank=4, lora_alpha=8)
    x = torch.randint(0, small_tokenizer.vocab_size, (2, 17))
    assert main(["export", "--run", str(lora_run), "--out", str(tmp_path / "hf_lora")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lora(x), rtol=1e-4, atol=1e-4)

    rm_run, rm = _run(tmp_path, small_tokenizer, "rm", score_head=True)
    assert main(["export", "--run", str(rm_run), "--out", str(tmp_path / "hf_rm")]) == 0
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_rm").eval()
    assert hf_rm.config.num_labels == 1
    with torch.no_grad():  # HF pools each row's last token (no padding here): our reward read there
        torch.testing.assert_close(hf_rm(x).logits[:, 0], rm.scores(x)[:, -1], rtol=1e-4, atol=1e-4)
    # a reward model whose score adds the answer's likelihood has no HF architecture: refused by name
    lik_run, _ = _run(tmp_path, small_tokenizer, "rm_lik", score_head=True, score_likelihood=True)
    assert main(["export", "--run", str(lik_run), "--out", str(tmp_path / "hf_lik")]) == 2
    assert not (tmp_path / "hf_lik").exists()

    plain_run, plain = _run(tmp_path, small_tokenizer, "plain")
    assert main(["export", "--run", str(plain_run), "--out", str(tmp_path / "hf16"), "--dtype", "bfloat16"]) == 0
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf16", dtype=torch.float32).eval()
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with torch.no_grad():
        ref = GPT(dataclasses.replace(plain.config))
        ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in plain.state_dict().items()})
        torch.testing.assert_close(hf16(x).logits, ref.eval()(x), rtol=1e-4, atol=1e-4)


def test_export_refuses_to_clobber_and_names_what_is_wrong(tmp_path, small_tokenizer, capsys):
    run, _ = _run(tmp_path, small_tokenizer)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):    # not a model directory: never replaced
        assert main(["export", "--run", str(run), "--out", str(out), *flags]) == 2
        assert "not a model directory" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    out = tmp_path / "hf2"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(out), "--overwrite", "--dtype", "float16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert not list(tmp_path.glob(".hf2.*"))        # neither the staging copy nor the replaced export is left
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(run), "--overwrite"]) == 2
    assert "is the run itself" in capsys.readouterr().err and (run / "model.safetensors").is_file()
    smeared, _ = _run(tmp_path, small_tokenizer, name="smeared", smear=True)
    for out, fmt in ((tmp_path / "hf3", "hf"), (tmp_path / "s.gguf", "gguf")):
        assert main(["export", "--run", str(smeared), "--out", str(out), "--format", fmt]) == 2
        assert "smear" in capsys.readouterr().err and not out.exists()


def _interleaved_rope_forward(reader, ids: torch.Tensor) -> torch.Tensor:
    """A Llama forward pass written from the GGUF file alone, rotating *adjacent* pairs as
    llama.cpp does: it agrees with the run only if q/k were permuted correctly on the way out."""
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    W = {t.name: torch.tensor(t.data.astype("float32")) for t in reader.tensors}
    n_h, n_kv, hd = f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]
    eps, base = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"]
    T = ids.shape[0]
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    ang = pos * base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)       # (T, hd/2)
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]

    def rope(x):  # x: (T, heads, hd); pairs (0,1), (2,3), ...
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    x = W["token_embd.weight"][ids]
    for i in range(f["llama.block_count"]):
        g = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, g("attn_norm"))
        q, k, v = (h @ g("attn_q").T).view(T, n_h, hd), (h @ g("attn_k").T).view(T, n_kv, hd), (h @ g("attn_v").T).view(T, n_kv, hd)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_h // n_kv, 1), v.repeat_interleave(n_h // n_kv, 1)
        att = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, -1) @ g("attn_output").T
        h = norm(x, g("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ g("ffn_gate").T) * (h @ g("ffn_up").T)) @ g("ffn_down").T
    return norm(x, W["output_norm.weight"]) @ W.get("output.weight", W["token_embd.weight"]).T


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_export_reads_back_and_runs_like_the_run(tmp_path, small_tokenizer, tie):
    gguf = pytest.importorskip("gguf")
    run, model = _run(tmp_path, small_tokenizer, tie_embeddings=tie)
    out = tmp_path / "model.gguf"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "gguf", "--dtype", "float32"]) == 0
    r = gguf.GGUFReader(out)
    meta = {k: v.contents() for k, v in r.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "refact"
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.context_length"] == 96
    vocab = small_tokenizer.hf.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.eot_token_id"] == small_tokenizer.end_id
    assert meta["tokenizer.ggml.token_type"][small_tokenizer.end_id] == 3 and meta["tokenizer.ggml.token_type"][300] == 1
    assert len(meta["tokenizer.ggml.merges"]) == small_tokenizer.vocab_size - 256 - 16
    assert ("output.weight" in {t.name for t in r.tensors}) != tie
    ids = torch.tensor(small_tokenizer.render(MSGS, add_generation_prompt=True).ids)
    with torch.no_grad():
        torch.testing.assert_close(_interleaved_rope_forward(r, ids), model(ids[None])[0], rtol=1e-4, atol=1e-4)

    half = tmp_path / "half.gguf"
    assert main(["export", "--run", str(run), "--out", str(half), "--format", "gguf"]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(half).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert main(["export", "--run", str(run), "--out", str(half), "--format", "gguf"]) == 2   # exists
    assert main(["export", "--run", str(run), "--out", str(tmp_path), "--format", "gguf"]) == 2  # a directory
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b.gguf"), "--format", "gguf",
                 "--dtype", "bfloat16"]) == 0
    assert gguf.GGUFReader(tmp_path / "b.gguf").tensors[1].tensor_type.name in ("BF16", "F32")
    rm_run, _ = _run(tmp_path, small_tokenizer, "rm", score_head=True)
    assert main(["export", "--run", str(rm_run), "--out", str(tmp_path / "rm.gguf"), "--format", "gguf"]) == 2
    padded, _ = _run(tmp_path, small_tokenizer, "padded", vocab_size=small_tokenizer.vocab_size + 8)
    assert main(["export", "--run", str(padded), "--out", str(tmp_path / "p.gguf"), "--format", "gguf"]) == 0
    pm = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "p.gguf").fields.items()}
    assert len(pm["tokenizer.ggml.tokens"]) == pm["llama.vocab_size"] == small_tokenizer.vocab_size + 8
    assert pm["tokenizer.ggml.tokens"][-1] == f"[PAD{small_tokenizer.vocab_size + 7}]" and pm["tokenizer.ggml.token_type"][-1] == 5
    assert not list(tmp_path.glob(".*.tmp"))


def test_import_brings_back_an_export_and_a_sharded_transformers_save(tmp_path, small_tokenizer, capsys):
    from ownllm.inference.generate import load_run

    run, model = _run(tmp_path, small_tokenizer, tie_embeddings=False)
    x = torch.randint(0, small_tokenizer.vocab_size, (2, 23))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, tok = load_run(tmp_path / "back")
    ref = GPT(model.config)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref.eval()(x), rtol=0, atol=0)      # bf16 weights, read exactly
    assert tok.render(MSGS).ids == small_tokenizer.render(MSGS).ids

    # trained elsewhere and saved by transformers in shards: comes back with the same logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        hf.model.norm.weight.mul_(1.5)
    hf.save_pretrained(tmp_path / "shards", max_shard_size="200KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "shards" / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    assert main(["import", "--hf", str(tmp_path / "shards"), "--out", str(tmp_path / "back2")]) == 0
    back2, _ = load_run(tmp_path / "back2")
    with torch.no_grad():
        torch.testing.assert_close(back2(x), hf.eval()(x).logits, rtol=1e-4, atol=1e-4)

    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2   # a run is there
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "not a run directory" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()


def test_import_refuses_what_it_cannot_run_exactly(tmp_path, small_tokenizer, capsys):
    run, _ = _run(tmp_path, small_tokenizer)
    src = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--out", str(src)]) == 0
    cfg = json.loads((src / "config.json").read_text())

    def refused(change: dict, expect: str, edit=None):
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        if edit:
            edit()
        assert main(["import", "--hf", str(src), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert expect in err, err
        assert not (tmp_path / "x" / "model.safetensors").exists()

    refused({"model_type": "phi3"}, "model_type 'phi3'")
    refused({"model_type": "gemma3"}, "vision tower")
    refused({"attention_bias": True}, "attention_bias=True")
    refused({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'")
    refused({"num_hidden_layers": 3}, "missing ['layers.2.")
    refused({"intermediate_size": 128}, "has shape")
    refused({"hidden_size": "wide"}, "not a number")
    refused({"num_attention_heads": 0}, "num_attention_heads=0 must be positive")
    refused({"num_hidden_layers": 10 ** 9}, "n_layers=1000000000 must be a whole number from 1 to 1,024")
    refused({"vocab_size": 10 ** 12}, "vocab_size=1000000000000 must be")
    weights = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../../etc/passwd"}}))
    refused({}, "not a file inside")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": 5}}))
    refused({}, "not a file inside")
    (src / "model.safetensors.index.json").unlink()
    assert (src / "model.safetensors").read_bytes() == weights
    (src / "config.json").write_text(json.dumps(cfg))
    ours = (src / "tokenizer.json").read_bytes()
    (src / "tokenizer.json").write_text("{not json")
    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "not a valid tokenizer.json" in capsys.readouterr().err
    (src / "tokenizer.json").write_bytes(ours)
    (src / "model.safetensors").unlink()
    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_import_of_another_models_llama_keeps_its_tokens_and_logits(tmp_path, capsys):
    """A Llama that never met ownllm: its own byte-level BPE (no chat tokens), saved by transformers."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from ownllm.inference.generate import generate_text, load_run

    foreign = HFTokenizer(models.BPE())
    foreign.pre_tokenizer, foreign.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = "Varnok is a town in the Selam valley. 翠岚镇位于青屿省。 It was founded in 1642."
    foreign.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "foreign"
    hf = save_foreign_model(src, "Llama", foreign.get_vocab_size() + 4, tied=False, max_positions=128)
    foreign.save(str(src / "tokenizer.json"))

    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "16 chat tokens" in capsys.readouterr().out
    model, tok = load_run(tmp_path / "run")
    ids = foreign.encode(text).ids
    assert tok.encode(text) == ids and tok.decode(ids) == text           # its own tokenization, unchanged
    assert model.config.vocab_size == foreign.get_vocab_size() + 16       # 4 padding rows reused, 12 new
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=1e-4, atol=1e-4)
    new_rows = model.embed_tokens.weight[hf.config.vocab_size:]
    torch.testing.assert_close(new_rows, hf.model.embed_tokens.weight.mean(0).expand_as(new_rows))
    assert tok.render([{"role": "user", "content": "hi"}], add_generation_prompt=True).ids[-1] == tok.special["<|assistant|>"]
    assert isinstance(generate_text(tmp_path / "run", "Varnok", max_new_tokens=5, temperature=0), str)
    # out to GGUF with its own GPT-2 split, and back: the same tokens and logits
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--dtype", "float32"]) == 0
    assert main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back, back_tok = load_run(tmp_path / "back")
    assert back_tok.encode(text) == ids and back_tok.stop_ids == tok.stop_ids
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)


def test_qwen2_layout_with_qkv_biases_matches_transformers_both_ways(tmp_path, small_tokenizer, capsys):
    """attention_bias: q/k/v biases, none on o_proj — the Qwen2 architecture, out and back in."""
    from ownllm.inference.quantize import quantize_int8

    run, model = _run(tmp_path, small_tokenizer, attention_bias=True, tie_embeddings=True)
    assert model.layers[0].self_attn.q_proj.bias.abs().sum() > 0 and model.layers[0].self_attn.o_proj.bias is None
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = small_tokenizer.render(MSGS, add_generation_prompt=True).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)
    engine = Engine(model, small_tokenizer.pad_id)        # KV cache + fused q/k/v projection with biases
    ours = engine.generate([ids], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=()))[0]
    assert list(ours) == hf.generate(x, max_new_tokens=10, do_sample=False, eos_token_id=None, min_new_tokens=10)[0, len(ids):].tolist()
    with torch.no_grad():
        full = model(x)
        quantize_int8(model)
        assert (model(x) - full).abs().max() < 0.05 * full.abs().max()   # biases survive int8
    _gguf_round_trip(tmp_path, run, x, full, arch="qwen2")

    hf.model.layers[1].self_attn.k_proj.bias.data.add_(0.3)      # trained elsewhere, then brought back
    hf.save_pretrained(tmp_path / "qwen")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "qwen" / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    assert main(["import", "--hf", str(tmp_path / "qwen"), "--out", str(tmp_path / "back")]) == 0
    from ownllm.inference.generate import load_run
    back, _ = load_run(tmp_path / "back")
    assert back.config.attention_bias
    with torch.no_grad():
        torch.testing.assert_close(back(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "qwen" / "config.json").read_text())
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    assert main(["import", "--hf", str(tmp_path / "qwen"), "--out", str(tmp_path / "x")]) == 2
    assert "use_sliding_window=True" in capsys.readouterr().err

    rm_run, rm = _run(tmp_path, small_tokenizer, "rm", attention_bias=True, score_head=True)
    assert main(["export", "--run", str(rm_run), "--out", str(tmp_path / "hf_rm")]) == 0
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_rm").eval()
    assert type(hf_rm).__name__ == "Qwen2ForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(hf_rm(x).logits[:, 0], rm.scores(x)[:, -1], rtol=1e-4, atol=1e-4)
    lora_run, lora = _run(tmp_path, small_tokenizer, "lora", attention_bias=True, lora_rank=4, lora_alpha=8)
    assert main(["export", "--run", str(lora_run), "--out", str(tmp_path / "hf_lora")]) == 0
    hf_lora = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_lora(x).logits, lora(x), rtol=1e-4, atol=1e-4)


def test_import_takes_a_sentencepiece_style_tokenizer_and_streams_it(tmp_path):
    """Llama 2 / TinyLlama-style tokenizer.json: '▁' for spaces, byte fallback for the rest."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, trainers

    from ownllm.interop.hf import _import_tokenizer

    sp = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    sp.train_from_iterator(["Varnok is a town in the Selam valley. It was founded in 1642."] * 30,
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_]))
    sp.save(str(tmp_path / "tokenizer.json"))
    tok, added = _import_tokenizer(tmp_path)
    assert len(added) == 16
    text = "Hello Varnok, 翠岚镇 was founded in 1642."     # the Chinese only through byte fallback
    ids = tok.encode(text)
    assert ids == sp.encode(text).ids and tok.decode(ids) == text
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) == text


@pytest.mark.parametrize("arch", ["qwen3", "llama3"])
def test_qwen3_and_llama3_rope_import_and_export_match_transformers(tmp_path, small_tokenizer, arch):
    """Qwen3 (q/k RMSNorm per head, head_dim ≠ hidden/heads) and Llama 3.x (rope_scaling 'llama3',
    its own head_dim): logits over 120 positions — past the original context, where the scaled
    frequencies matter — and KV-cache greedy tokens equal transformers', out and back again."""
    from ownllm.inference.generate import load_run
    from ownllm.inference.quantize import quantize_int8

    common = dict(vocab_size=small_tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=160,
                  initializer_range=0.2, tie_word_embeddings=arch == "qwen3")
    torch.manual_seed(0)
    if arch == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, rope_theta=1e6)).eval()
        for layer in hf.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.data.uniform_(0.5, 1.5)
    else:
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32, rope_theta=500000.0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rope)).eval()
    hf.save_pretrained(tmp_path / "src")
    small_tokenizer.save(tmp_path / "src")
    assert main(["import", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    model, _ = load_run(tmp_path / "run")
    assert model.config.head_dim == 24 and model.config.qk_norm == (arch == "qwen3")
    assert (model.config.rope_scaling or {}).get("rope_type") == (None if arch == "qwen3" else "llama3")
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, small_tokenizer.vocab_size, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    prompt = x[0, :40].tolist()
    ours = Engine(model, small_tokenizer.pad_id).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=()))[0]
    theirs = hf.generate(x[:, :40], max_new_tokens=10, do_sample=False, eos_token_id=None, min_new_tokens=10)[0, 40:]
    assert list(ours) == theirs.tolist()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-4, atol=1e-4)
        quantize_int8(model)
        assert (model(x) - want).norm() < 0.05 * want.norm()     # int8 keeps the q/k norms and scaled RoPE
    if arch == "qwen3":
        _gguf_round_trip(tmp_path, tmp_path / "run", x, want, arch="qwen3")
    else:   # Llama 3's frequency scaling is a tensor llama.cpp's converter computes; not written here
        assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2


def _gguf_round_trip(tmp_path, run, x, want, arch):
    """`run` exported to GGUF in float32 and imported again gives `want` (its logits on x); the
    architecture is named in the file, and the weights are not permuted outside `llama`."""
    import gguf

    from ownllm.inference.generate import load_run

    out = tmp_path / f"{arch}.gguf"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "gguf", "--dtype", "float32"]) == 0
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == arch
    assert main(["import", str(out), "--out", str(tmp_path / f"{arch}_back")]) == 0
    back, _ = load_run(tmp_path / f"{arch}_back")
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-4, atol=1e-4)


def _windowed_hf(arch, vocab):
    """A tiny random transformers Gemma 3 (text) or Mistral with a sliding window of 8 positions."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=160, initializer_range=0.2, sliding_window=8)
    torch.manual_seed(0)
    if arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **common, head_dim=24, num_hidden_layers=4, query_pre_attn_scalar=32, tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
        hf = transformers.Gemma3ForCausalLM(cfg)
        for name, p in hf.named_parameters():   # Gemma's norms hold w of a 1 + w scale: make them matter
            if name.endswith("norm.weight"):
                p.data.uniform_(-0.5, 0.5)
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**common, num_hidden_layers=2,
                                                                        tie_word_embeddings=False))
    return hf.eval()


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_sliding_window_models_match_transformers(tmp_path, small_tokenizer, arch):
    """Gemma 3 (√dim embeddings, 1 + w norms on both sides of each branch, GeGLU, q/k norms,
    query_pre_attn_scalar, sliding layers with their own RoPE base between full ones with scaled
    RoPE) and Mistral (a window on every layer): logits over 60 positions, far past the window of 8,
    equal transformers'; greedy tokens through the KV cache — eager, the fixed-shape decode step,
    a left-padded batch and the server's continuous batcher — equal transformers' generate; and the
    export loads back into the same transformers class with the same logits."""
    from ownllm.inference.batcher import ContinuousBatcher
    from ownllm.inference.generate import load_run

    hf = _windowed_hf(arch, small_tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "src")
    small_tokenizer.save(tmp_path / "src")
    assert main(["import", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "run"), "--dtype", "float32"]) == 0
    model, _ = load_run(tmp_path / "run")
    cfg = model.config
    assert cfg.sliding_window == 8 and cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert [cfg.window_of(i) for i in range(cfg.n_layers)] == ([8, 0, 8, 0] if arch == "gemma3" else [8, 8])
    x = torch.randint(0, small_tokenizer.vocab_size, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    prompts = [x[0, :20].tolist(), x[0, 30:42].tolist()]
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_ids=())
    theirs = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          min_new_tokens=16)[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, small_tokenizer.pad_id)
    assert [engine.generate([p], params)[0] for p in prompts] == theirs
    assert engine.generate(prompts, params) == theirs                        # left-padded batch
    engine._decode = model.decode_static                                     # the fixed-shape step, uncompiled
    assert engine.generate(prompts, params) == theirs
    batcher = ContinuousBatcher(model, small_tokenizer.pad_id, slots=2)
    try:
        assert [batcher.generate(p, params) for p in prompts] == theirs
    finally:
        batcher.close()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-4, atol=1e-4)
    gguf_out = ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]
    if arch == "mistral":   # llama.cpp's llama architecture, the window in its metadata
        _gguf_round_trip(tmp_path, tmp_path / "run", x, want, arch="llama")
    else:   # llama.cpp reads Gemma with a SentencePiece vocabulary: not written here, and said so
        assert main(gguf_out) == 2
