"""`ownllm import FILE.gguf`: a real GGUF file against transformers' own GGUF loading, every block
type against the gguf package's dequantisation, round trips through our export, hostile files,
and hub ids read from a cache laid out by hand (no network)."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from ownllm.checkpoint import save_checkpoint
from ownllm.cli import main
from ownllm.config import ModelConfig
from ownllm.inference import Engine, SamplingParams
from ownllm.model import GPT
from tests.conftest import randomize_

gguf = pytest.importorskip("gguf")


def _run(tmp_path, tokenizer, name="run", **over):
    cfg = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=160, max_seq_len=96), **over})
    torch.manual_seed(0)
    model = randomize_(GPT(cfg)).eval()
    d = tmp_path / name
    tokenizer.save(d, model_max_length=cfg.max_seq_len)
    save_checkpoint(d, model)
    return d, model


def _load(run):
    from ownllm.inference.generate import load_run

    return load_run(run)


@pytest.fixture(scope="module")
def smollm2():
    from ownllm.errors import OwnLLMError
    from ownllm.interop.hub import registry_model

    try:
        return registry_model("smollm2")
    except OwnLLMError as e:
        pytest.skip(str(e))


def test_smollm2_gguf_matches_transformers_gguf_loading(tmp_path, smollm2, capsys):
    """The real Q4_1 file: our dequantised float32 run gives transformers' logits and greedy tokens."""
    transformers = pytest.importorskip("transformers")
    assert main(["import", "smollm2", "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "30 layers" in out and "stored as float32" in out and "<|im_end|>" in out
    model, tok = _load(tmp_path / "f32")
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.render(msgs, add_generation_prompt=True).ids
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                           dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        want = hf(x).logits
        got = model(x)[..., : want.shape[-1]]
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    ours = Engine(model, tok.pad_id).generate([ids], SamplingParams(max_new_tokens=16, temperature=0, stop_ids=()))[0]
    theirs = hf.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=None, min_new_tokens=16)[0, len(ids):]
    assert list(ours) == theirs.tolist()
    assert "Paris" in tok.decode(ours)
    # the tokenizer: llama.cpp's `smollm` split isolates digits; plain words as the file's vocabulary has them
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    text = "The quick brown fox, it's said, jumps over the lazy dog.\n  Twice!"
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    assert [tok.decode([i]) for i in tok.encode("year 2024")][-4:] == ["2", "0", "2", "4"]
    # the default keeps the source's precision: bf16 on disk for a quantised file
    assert main(["import", str(smollm2), "--out", str(tmp_path / "bf16")]) == 0
    assert "stored as bfloat16" in capsys.readouterr().out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_slice("embed_tokens.weight").get_dtype() == "BF16"


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 1.5e-2),
                                       ("q8_0", 2e-2), ("q4_0", 0.25)])
def test_gguf_round_trip_per_type(tmp_path, small_tokenizer, dtype, tol):
    """A run exported in each type and imported again gives its logits within the type's error."""
    run, model = _run(tmp_path, small_tokenizer, tie_embeddings=False)
    out = tmp_path / "m.gguf"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "gguf", "--dtype", dtype]) == 0
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert kinds["blk.0.attn_q.weight"] == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, dtype.upper())
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert main(["import", str(out), "--out", str(tmp_path / "back"), "--dtype", "float32"]) == 0
    back, _ = _load(tmp_path / "back")
    x = torch.randint(0, small_tokenizer.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), back(x)
    assert ((got - want).norm() / want.norm()).item() < tol


# bytes per block and where its float16 scales sit (gguf's block layouts)
K_LAYOUT = {"Q4_1": (20, (0, 2)), "Q5_0": (22, (0,)), "Q5_1": (24, (0, 2)), "Q2_K": (84, (80, 82)),
            "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _random_blocks(kind, rows, cols, rng):
    """Random quantised blocks with sane float16 scales (0.001-0.01), as a real file's are."""
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    data = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    for off in K_LAYOUT[kind][1]:
        scale = rng.uniform(0.001, 0.01, size=(rows, cols // block)).astype(np.float16)
        data[..., off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def test_every_block_type_dequantises_as_gguf_does(tmp_path, small_tokenizer):
    """A file whose matrices are Q4_1, Q5_0, Q5_1 and the K-quants: each imported weight equals the
    gguf package's dequantisation of its bytes (q/k rows put back in rotate-half order)."""
    from gguf.quants import dequantize

    from ownllm.interop.gguf import gguf_metadata, gguf_tensor_names, write_gguf
    from ownllm.interop.gguf_import import unpermute_rope
    from ownllm.tokenizer import Tokenizer

    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, dim=256, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_dim=512, max_seq_len=64, tie_embeddings=False)
    rng = np.random.default_rng(0)
    names, tensors = gguf_tensor_names(1), {}
    matrices = iter(list(K_LAYOUT) * 2)
    for ours, shape in ((k, tuple(v.shape)) for k, v in GPT(cfg).state_dict().items()):
        if len(shape) == 1:
            tensors[names[ours]] = (rng.uniform(0.5, 1.5, shape).astype(np.float32), "F32")
        else:
            kind = next(matrices)
            tensors[names[ours]] = (_random_blocks(kind, *shape, rng), kind)
    path = tmp_path / "k.gguf"
    write_gguf(path, "llama", gguf_metadata(cfg, Tokenizer(small_tokenizer.hf), "k", 0), tensors)
    assert main(["import", str(path), "--out", str(tmp_path / "run"), "--dtype", "float32"]) == 0
    model, _ = _load(tmp_path / "run")
    state = model.state_dict()
    seen = set()
    for ours, theirs in names.items():
        if theirs not in tensors:
            continue
        arr, kind = tensors[theirs]
        want = torch.from_numpy(dequantize(arr, gguf.GGMLQuantizationType[kind]).astype(np.float32).copy())
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            want = unpermute_rope(want, cfg.n_heads if "q_proj" in ours else cfg.n_kv_heads)
        got = state[ours][: want.shape[0]]
        assert torch.equal(got, want.reshape(got.shape)), ours
        seen.add(kind)
    assert seen == set(K_LAYOUT) | {"F32"}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def _patch_meta(tmp_path, small_tokenizer, name, arch="llama", **changes):
    from ownllm.interop.gguf import gguf_metadata, write_gguf
    from ownllm.tokenizer import Tokenizer

    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_dim=160, max_seq_len=64)
    from ownllm.interop.gguf import gguf_tensor_names
    names = gguf_tensor_names(1)
    tensors = {names[k]: (v.numpy(), "F32") for k, v in GPT(cfg).state_dict().items() if k != "lm_head.weight"}
    meta = gguf_metadata(cfg, Tokenizer(small_tokenizer.hf), "x", 0)
    meta = {k.replace("llama.", arch + ".") if k.startswith("llama.") else k: v for k, v in meta.items()}
    meta.update(changes)
    path = tmp_path / name
    write_gguf(path, arch, meta, tensors)
    return path


def _refused(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_hostile_and_unsupported_files_get_one_line(tmp_path, small_tokenizer, capsys):
    out = str(tmp_path / "out")
    good = _patch_meta(tmp_path, small_tokenizer, "good.gguf")
    assert main(["import", str(good), "--out", out]) == 0
    capsys.readouterr()
    out = str(tmp_path / "never")   # every case below fails before writing here
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    _refused(capsys, ["import", str(tmp_path / "cut.gguf"), "--out", out], "cut.gguf")
    # an array that claims 2^60 items, and a string that claims 2^40 bytes
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x"
    (tmp_path / "arr.gguf").write_bytes(head + struct.pack("<IIQ", 9, 0, 1 << 60) + b"\0" * 64)
    _refused(capsys, ["import", str(tmp_path / "arr.gguf"), "--out", out], "arr.gguf", "past the end")
    (tmp_path / "str.gguf").write_bytes(head + struct.pack("<IQ", 8, 1 << 40) + b"\0" * 64)
    _refused(capsys, ["import", str(tmp_path / "str.gguf"), "--out", out], "str.gguf", "past the end")
    # a tensor whose data offset lies past the end of the file
    r = gguf.GGUFReader(good)
    t = r.tensors[0]
    at = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:-1])
    patched = bytearray(data)
    patched[at:at + 8] = struct.pack("<Q", 1 << 40)
    (tmp_path / "off.gguf").write_bytes(bytes(patched))
    _refused(capsys, ["import", str(tmp_path / "off.gguf"), "--out", out], "off.gguf")
    _refused(capsys, ["import", str(_patch_meta(tmp_path, small_tokenizer, "g.gguf", arch="gemma3")), "--out", out],
             "'gemma3'")
    _refused(capsys, ["import", str(_patch_meta(tmp_path, small_tokenizer, "p.gguf", **{"tokenizer.ggml.pre": "mystery"})),
                      "--out", out], "'mystery'", "refused")
    _refused(capsys, ["import", str(_patch_meta(tmp_path, small_tokenizer, "s.gguf", **{"tokenizer.ggml.model": "llama"})),
                      "--out", out], "SentencePiece")
    _refused(capsys, ["import", str(_patch_meta(tmp_path, small_tokenizer, "f.gguf", **{"llama.feed_forward_length": 999})),
                      "--out", out], "blk.0.ffn", "shape")
    # sizes that would need terabytes: checked against the tensors before anything is allocated
    big = _patch_meta(tmp_path, small_tokenizer, "big.gguf", **{"llama.embedding_length": 1 << 20, "llama.block_count": 256})
    _refused(capsys, ["import", str(big), "--out", out], "shape")
    _refused(capsys, ["import", str(_patch_meta(tmp_path, small_tokenizer, "z.gguf", **{"llama.attention.head_count": 0})),
                      "--out", out], "head_count")
    (tmp_path / "notgguf.bin").write_bytes(b"PK\3\4 not a model")
    _refused(capsys, ["import", str(tmp_path / "notgguf.bin"), "--out", out], "not GGUF")
    assert not (tmp_path / "never").exists()


def _hub_cache(root, repo, files):
    """A Hugging Face hub cache holding `files` ({name: bytes}) for `repo` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hub_ids_read_from_the_cache_offline(tmp_path, small_tokenizer):
    run, model = _run(tmp_path, small_tokenizer)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--dtype", "float32"]) == 0
    files = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    files["m.gguf"] = (tmp_path / "m.gguf").read_bytes()
    _hub_cache(tmp_path / "cache", "acme/tiny", files)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}

    def ownllm(*argv):
        return subprocess.run([sys.executable, "-m", "ownllm.cli", *argv], env=env, capture_output=True, text=True,
                              cwd=tmp_path)

    x = torch.randint(0, small_tokenizer.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    for source, name in (("acme/tiny", "dir"), ("acme/tiny@main:m.gguf", "file")):
        r = ownllm("import", source, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        back, _ = _load(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
    r = ownllm("import", "acme/absent", "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in r.stderr
