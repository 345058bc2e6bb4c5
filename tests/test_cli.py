"""The CLI end to end: exit codes, one-line errors, a tiny pretrain → eval → generate."""
import subprocess
import sys

import pytest

from ownllm.cli import main

TINY = ["--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set",
        "model.n_kv_heads=1", "--set", "model.ffn_dim=64", "--set", "seq_len=32", "--set", "batch_size=4",
        "--set", "dtype=float32", "--vocab-size", "300", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("cli") / "base"
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), "--max-steps", "6", *TINY]) == 0
    return out


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv,match", [
    (["pretrain", "--data", "/nonexistent/x.txt", "--out", "{tmp}/o"], "no such file"),
    (["pretrain", "--data", "nope-corpus", "--out", "{tmp}/o"], "bundled"),
    (["pretrain", "--preset", "huge", "--out", "{tmp}/o"], "unknown preset"),
    (["pretrain", "--set", "lr=fast", "--out", "{tmp}/o"], "--lr"),
    (["pretrain", "--set", "colour=red", "--out", "{tmp}/o"], "unknown field"),
    (["tokenizer", "--data", "shakespeare", "--vocab-size", "100", "--out", "{tmp}/t"], "too small"),
    (["eval", "--run", "{tmp}/missing"], "missing"),
    (["generate", "--run", "{tmp}/missing", "--prompt", "x"], "no such run"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, match):
    code, err = _err(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert len(err) == 1 and match in err[0] and err[0].startswith("ownllm ")


def test_corrupt_checkpoint_cli(capsys, tmp_path, tiny_run):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    (bad / "model.safetensors").write_bytes(b"not a checkpoint")
    code, err = _err(capsys, ["generate", "--run", str(bad), "--prompt", "x"])
    assert code == 2 and "corrupt" in err[0]
    (bad / "config.json").write_text("{")
    code, err = _err(capsys, ["eval", "--run", str(bad)])
    assert code == 2 and "config.json" in err[0]


def test_pretrain_eval_generate(capsys, tiny_run):
    capsys.readouterr()
    assert main(["eval", "--run", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "RESULT val_bpb=" in out.strip().splitlines()[-1]
    args = ["generate", "--run", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "20"]
    outs = []
    for extra in (["--temperature", "0"], ["--temperature", "0"], ["--seed", "3"], ["--seed", "3"], ["--seed", "4"]):
        assert main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] == outs[3]
    assert all(o.startswith("ROMEO:") for o in outs)


def test_resume_and_refuse_overwrite(capsys, tiny_run, text_file):
    code, err = _err(capsys, ["pretrain", "--data", str(text_file), "--out", str(tiny_run), "--max-steps", "6", *TINY])
    assert code == 2 and "--resume" in err[0]
    assert main(["pretrain", "--out", str(tiny_run), "--resume", "--max-steps", "8", "--no-progress"]) == 0
    assert "trained 8 steps" in capsys.readouterr().out


def test_module_entry_point_and_data_list():
    r = subprocess.run([sys.executable, "-m", "ownllm", "data", "list"], capture_output=True, text=True, check=True)
    assert "shakespeare" in r.stdout and "chinese-poetry" in r.stdout
