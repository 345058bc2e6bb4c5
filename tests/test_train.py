import json
import math

import pytest
import torch

from ownllm.checkpoint import commit_files, load_model, recover, save_checkpoint
from ownllm.config import TrainConfig
from ownllm.errors import OwnLLMError
from ownllm.metrics import MetricsLog
from ownllm.model import GPT
from ownllm.train.pretrain import pretrain
from ownllm.train.schedule import lr_at

TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)


def _cfg(text_file, **kw):
    base = dict(data=str(text_file), vocab_size=300, batch_size=4, seq_len=32, max_steps=12, time_budget=None,
                eval_interval=6, eval_batches=2, warmup_steps=3, lr=3e-3, dtype="float32", threads=2,
                compile=False)
    return TrainConfig(**{**base, **kw})


def _losses(run):
    return [(r["step"], r["train_loss"]) for r in MetricsLog.read(run / "metrics.jsonl") if "train_loss" in r]


def test_resume_reproduces_uninterrupted_losses(tmp_path, text_file):
    full = tmp_path / "full"
    pretrain(full, _cfg(text_file), model_overrides=TINY, progress=False, log=lambda *a: None)
    part = tmp_path / "part"
    r = pretrain(part, _cfg(text_file), model_overrides=TINY, progress=False, stop_at_step=5, log=lambda *a: None)
    assert set(r) == {"step", "stopped", "elapsed_s"} and r["step"] == 5 and r["stopped"] and r["elapsed_s"] > 0
    pretrain(part, None, resume=True, progress=False, log=lambda *a: None)
    a, b = _losses(full), _losses(part)
    assert [s for s, _ in a] == list(range(1, 13)) and [s for s, _ in b] == list(range(1, 13))
    assert [l for _, l in a] == pytest.approx([l for _, l in b], abs=1e-6)
    wa = load_model(full).state_dict()
    wb = load_model(part).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_run_directory_layout_metrics_and_learning(tmp_path, text_file):
    run = tmp_path / "run"
    res = pretrain(run, _cfg(text_file, max_steps=30, eval_interval=10), model_overrides=TINY, progress=False,
                   log=lambda *a: None)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "train_config.json",
              "metrics.jsonl", "state.pt", "plots/loss.png", "data/train.bin", "data/val.bin", "eval.json"):
        assert (run / f).is_file(), f
    rows = MetricsLog.read(run / "metrics.jsonl")
    steps = [r for r in rows if "train_loss" in r]
    assert {"step", "tokens", "elapsed_s", "lr", "train_loss"} <= set(steps[0])
    evals = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30] and "val_loss" in evals[0]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 1.0  # it learns
    assert steps[-1]["tokens"] == 30 * 4 * 32
    spent = rows[-1]   # what the run cost, as its last row and in the result
    assert spent["event"] == "cost" and spent == {"step": 30, "event": "cost", **res["cost"]}
    assert spent["train_tokens"] >= 30 * 4 * 32 and spent["tokens"] > spent["train_tokens"]   # + the evaluations
    n = sum(p.numel() for p in load_model(run).layers.parameters() if p.dim() == 2)
    assert spent["flops"] > 6 * n * spent["train_tokens"] and spent["peak_rss_mb"] > 50 and spent["energy_wh"] > 0
    assert 0 < res["sources"][0]["val_bpb"] < 8
    assert not list(run.glob(".*.tmp")) and not (run / "commit.json").exists()


def test_every_parameter_changes(tmp_path, text_file):
    torch.manual_seed(0)
    from ownllm.config import ModelConfig

    before = {k: v.clone() for k, v in GPT(ModelConfig(vocab_size=300, **TINY)).state_dict().items()}
    run = tmp_path / "r"
    pretrain(run, _cfg(text_file, max_steps=3, seed=0), model_overrides=TINY, progress=False, log=lambda *a: None)
    after = load_model(run).state_dict()
    for k, v in after.items():
        if k in before and before[k].shape == v.shape:
            assert not torch.equal(before[k], v), f"{k} did not change"


def test_existing_run_is_not_overwritten(tmp_path, text_file):
    run = tmp_path / "run"
    pretrain(run, _cfg(text_file, max_steps=2), model_overrides=TINY, progress=False, log=lambda *a: None)
    weights = (run / "model.safetensors").read_bytes()
    with pytest.raises(OwnLLMError, match="already holds a trained run"):
        pretrain(run, _cfg(text_file, max_steps=2), model_overrides=TINY, progress=False, log=lambda *a: None)
    with pytest.raises(OwnLLMError, match="no such file"):  # bad data with --overwrite: old run untouched
        pretrain(run, _cfg(tmp_path / "missing.txt"), overwrite=True, progress=False, log=lambda *a: None)
    assert (run / "model.safetensors").read_bytes() == weights


def test_interrupted_commit_recovers(tmp_path, tiny_cfg):
    model = GPT(tiny_cfg)
    save_checkpoint(tmp_path, model, {"x": 1}, step=1)
    # a second commit that died after its journal was written but before the renames
    (tmp_path / ".model.safetensors.tmp").write_bytes((tmp_path / "model.safetensors").read_bytes())
    (tmp_path / ".state.pt.tmp").write_bytes((tmp_path / "state.pt").read_bytes())
    (tmp_path / "commit.json").write_text(json.dumps([[".model.safetensors.tmp", "model.safetensors"],
                                                      [".state.pt.tmp", "state.pt"]]))
    recover(tmp_path)
    assert not (tmp_path / "commit.json").exists() and not (tmp_path / ".state.pt.tmp").exists()
    load_model(tmp_path)
    # a commit that died before its journal: temp files are ignored, the old checkpoint stands
    (tmp_path / ".model.safetensors.tmp").write_bytes(b"garbage")
    load_model(tmp_path)
    commit_files(tmp_path, {"note.txt": b"hi"})
    assert (tmp_path / "note.txt").read_text() == "hi"


def test_corrupt_checkpoint_errors(tmp_path, tiny_cfg):
    save_checkpoint(tmp_path, GPT(tiny_cfg), step=0)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(OwnLLMError, match="corrupt"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OwnLLMError, match="missing"):
        load_model(tmp_path)


def test_lr_schedule_shapes():
    kw = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0.0, 0, **kw) == pytest.approx(0.1)
    assert lr_at(0.0, 9, **kw) == pytest.approx(1.0)
    assert lr_at(0.5, 50, kind="linear", **kw) == pytest.approx(0.55)
    assert lr_at(1.0, 99, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(0.4, 40, kind="wsd", **kw) == 1.0 and lr_at(1.0, 99, kind="wsd", **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_at(0.5, 50, kind="nope", **kw)


def test_bf16_autocast_trains_finite(tmp_path, text_file):
    run = tmp_path / "bf16"
    res = pretrain(run, _cfg(text_file, max_steps=4, dtype="bfloat16"), model_overrides=TINY, progress=False,
                   log=lambda *a: None)
    assert res["dtype"] == "bfloat16" and math.isfinite(res["train_loss"])


def test_divergence_is_a_clear_error(tmp_path, text_file):
    run = tmp_path / "diverge"
    with pytest.raises(OwnLLMError, match="training diverged"):
        pretrain(run, _cfg(text_file, lr=1e6, warmup_steps=0, max_steps=30, log_interval=1, grad_clip=0.0),
                 model_overrides=TINY, progress=False, log=lambda *a: None)


def test_muon_option_trains_and_resumes(tmp_path, text_file):
    run = tmp_path / "muon"
    pretrain(run, _cfg(text_file, optimizer="muon", max_steps=4), model_overrides=TINY, progress=False,
             log=lambda *a: None)
    losses = [l for _, l in _losses(run)]
    assert len(losses) == 4 and all(math.isfinite(l) for l in losses)
    pretrain(run, _cfg(text_file, optimizer="muon", max_steps=6), resume=True, progress=False, log=lambda *a: None)
    assert [s for s, _ in _losses(run)] == list(range(1, 7))


def test_muon_orthogonalises_in_float32_where_bfloat16_is_slow(monkeypatch):
    """torch's Muon runs Newton–Schulz in bfloat16 only; ours takes float32 on a device whose bf16
    matmuls are slower (emulated on AVX2-only CPUs) and gives the same update to bf16 precision."""
    from ownllm.train import trainer

    assert torch.optim._muon._zeropower_via_newtonschulz is trainer.newton_schulz
    g = torch.randn(96, 40, generator=torch.Generator().manual_seed(0))
    coeffs = (3.4445, -4.7750, 2.0315)
    ref = trainer._torch_newton_schulz(g, coeffs, 5, 1e-7).float()
    monkeypatch.setattr(trainer, "bf16_matmul_fast", lambda device_type: False)
    ours = trainer.newton_schulz(g, coeffs, 5, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    assert (ours - ref).norm() / ref.norm() < 0.03
    s = torch.linalg.svdvals(ours)   # Muon's quintic pushes singular values into roughly [0.7, 1.2]
    assert s.min() > 0.5 and s.max() < 1.3
    monkeypatch.setattr(trainer, "bf16_matmul_fast", lambda device_type: True)
    assert trainer.newton_schulz(g, coeffs, 5, 1e-7).dtype == torch.bfloat16   # torch's own, where bf16 is fast


def test_muon_takes_hidden_matrices_only():
    """Muon gets the blocks' weight matrices; embeddings, the head, a score head, norms and LoRA
    factors stay with AdamW, and a LoRA model (no trainable hidden matrix) is AdamW throughout."""
    from ownllm.config import ModelConfig
    from ownllm.lora import freeze_base
    from ownllm.train.trainer import make_optimizer

    cfg = TrainConfig(optimizer="muon")
    model = GPT(ModelConfig(**TINY, vocab_size=64, score_head=True, tie_embeddings=False))
    opts = make_optimizer(model, cfg).opts
    assert [type(o).__name__ for o in opts] == ["Muon", "AdamW"]
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opts[0].param_groups for p in g["params"]}
    adam = {names[id(p)] for g in opts[1].param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert {"embed_tokens.weight", "lm_head.weight", "score.weight", "norm.weight"} <= adam
    assert muon.isdisjoint(adam) and muon | adam == set(names.values())

    # a reward model's likelihood gate is an output head too: AdamW, never orthogonalised by Muon
    rm = GPT(ModelConfig(**TINY, vocab_size=64, score_head=True, score_likelihood=True))
    names = {id(p): n for n, p in rm.named_parameters()}
    opts = make_optimizer(rm, cfg).opts
    muon = {names[id(p)] for g in opts[0].param_groups for p in g["params"]}
    adam = [names[id(p)] for g in opts[1].param_groups for p in g["params"]]
    assert {"score.weight", "score_gate.weight", "score_gate.bias", "score_scale"} <= set(adam)
    assert muon.isdisjoint(adam) and sorted([*muon, *adam]) == sorted(names.values())

    lora = GPT(ModelConfig(**TINY, vocab_size=64, lora_rank=4))
    freeze_base(lora)
    opts = make_optimizer(lora, cfg).opts
    assert [type(o).__name__ for o in opts] == ["AdamW"]
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)


def test_dtype_probe_stops_early_only_when_the_answer_is_clear(monkeypatch):
    import ownllm.train.trainer as trainer_mod
    from ownllm.train.trainer import measure_dtype

    w = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.w = w
    clock = [0.0]   # a fake clock each micro-batch advances: the test does not depend on machine noise
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(trainer_mod, "bf16_matmul_fast", lambda device_type: True)   # the probe runs (a CPU with bf16)

    def run(fp32_s, bf16_s):
        calls = []

        def loss_fn(m, batch):
            bf16 = torch.is_autocast_enabled("cpu")
            calls.append(bf16)
            clock[0] += bf16_s if bf16 else fp32_s
            return (m.w * 2).sum(), 1
        return measure_dtype(model, loss_fn, None), calls

    (choice, _), calls = run(0.06, 0.01)       # bf16 6x faster: warm-up round + one timed round
    assert choice == "bfloat16" and len(calls) == 4 and w.grad is None
    (choice, _), calls = run(0.02, 0.02)       # a tie: every round, and fp32 kept
    assert choice == "float32" and len(calls) == 8
    monkeypatch.setattr(trainer_mod, "bf16_matmul_fast", lambda device_type: False)   # bf16 emulated: no probe
    (choice, timings), calls = run(0.06, 0.01)
    assert choice == "float32" and calls == [] and timings == {}


# Runs `ownllm pretrain` in a child that SIGKILLs itself at the N-th os.replace onto a name: a kill
# at an exact point of a checkpoint commit, the same on every machine.
KILL_HOOK = """
import os, signal, sys
real, seen = os.replace, {}
name, nth = sys.argv[1], int(sys.argv[2])
def replace(src, dst):
    if os.path.basename(str(dst)) == name:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from ownllm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_kill_9_inside_checkpoint_commits_then_resume_is_bit_identical(tmp_path, text_file):
    """One kill just before a commit's journal lands (the previous checkpoint stands), one just
    after (the next loader finishes the commit); the resumed run ends bit-identical."""
    import subprocess
    import sys

    from bench.kill_resume import compare, pretrain_argv
    from ownllm.checkpoint import saved_step

    def run(out, *kill, resume=False):
        argv = pretrain_argv(text_file, out, steps=12, seed=3)[3:] + (["--resume"] if resume else [])
        return subprocess.run([sys.executable, "-c", KILL_HOOK, *(kill or ("-", "0")), *argv],
                              capture_output=True, text=True, timeout=300).returncode

    assert run(tmp_path / "whole") == 0
    killed = tmp_path / "killed"
    assert run(killed, "commit.json", "3") == -9   # the run's start, step 3, then step 6: its journal not yet in place
    assert saved_step(killed) == 3 and not (killed / "commit.json").exists()
    assert run(killed, "model.safetensors", "1", resume=True) == -9   # step 6 again: journal in, no rename yet
    assert (killed / "commit.json").exists() and saved_step(killed) == 3
    recover(killed)   # what every loader does first: the journaled commit is finished
    assert saved_step(killed) == 6
    assert run(killed, resume=True) == 0
    assert compare(tmp_path / "whole", killed) == (True, 0.0)
    assert not list(killed.glob(".*.tmp")) and not (killed / "commit.json").exists()


def test_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, tiny_cfg, monkeypatch):
    import errno

    model = GPT(tiny_cfg)
    save_checkpoint(tmp_path, model, {"x": 1}, step=1)
    before = (tmp_path / "model.safetensors").read_bytes()

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("ownllm.checkpoint.fsync_write", full)
    with pytest.raises(OwnLLMError, match="the disk is full.*unchanged"):
        save_checkpoint(tmp_path, model, {"x": 2}, step=2)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "state.pt"]


def test_recover_is_safe_when_two_processes_open_a_run_at_once(tmp_path, tiny_cfg):
    import threading

    model = GPT(tiny_cfg)
    for attempt in range(20):
        save_checkpoint(tmp_path, model, {"x": 1}, step=attempt)
        for f in ("model.safetensors", "state.pt"):
            (tmp_path / f".{f}.tmp").write_bytes((tmp_path / f).read_bytes())
        (tmp_path / "commit.json").write_text(json.dumps([[".model.safetensors.tmp", "model.safetensors"],
                                                          [".state.pt.tmp", "state.pt"]]))
        errors = []

        def open_run():
            try:
                recover(tmp_path)
                load_model(tmp_path)
            except Exception as e:  # the race this guards against: FileNotFoundError in the loser
                errors.append(e)
        threads = [threading.Thread(target=open_run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and not (tmp_path / "commit.json").exists()
