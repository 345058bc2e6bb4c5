"""The CLI end to end: exit codes, one-line errors, a tiny pretrain → eval → generate."""
import json
import subprocess
import sys

import pytest

from ownllm.cli import main
from tests.conftest import TINY



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


def test_sft_eval_tasks_and_resume(capsys, tiny_sft, tmp_path):
    capsys.readouterr()
    samples = tmp_path / "samples.jsonl"
    assert main(["eval", "tasks", "--run", str(tiny_sft), "--n", "2", "--samples", str(samples)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("RESULT mean_exact_match=") and "zh_numeral=" in out[-1]
    assert "chat template" in out[0]
    from ownllm.data.tasks import FAMILIES

    lines = samples.read_text().splitlines()
    assert len(lines) == 2 * len(FAMILIES)
    # --seed draws other held-out prompts; the same seed the same ones
    for seed, same in (("1", False), ("0", True)):
        again = tmp_path / f"seed{seed}.jsonl"
        assert main(["eval", "tasks", "--run", str(tiny_sft), "--n", "2", "--seed", seed, "--samples", str(again)]) == 0
        prompts = [[json.loads(x)["prompt"] for x in f] for f in (lines, again.read_text().splitlines())]
        assert (prompts[0] == prompts[1]) == same
    assert main(["eval", "tasks", "--run", str(tiny_sft), "--n", "3", "--families", "arithmetic, count"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "arithmetic=" in last and "count=" in last and "sort=" not in last
    assert main(["eval", "tasks", "--run", str(tiny_sft), "--families", "arithmetic,algebra"]) == 2
    assert "unknown algebra" in capsys.readouterr().err
    hant = tmp_path / "hant.jsonl"
    assert main(["eval", "tasks", "--run", str(tiny_sft), "--n", "1", "--lang", "zh-hant", "--families", "zh_numeral",
                 "--samples", str(hant)]) == 0
    (row,) = [json.loads(x) for x in hant.read_text().splitlines()]
    assert row["lang"] == "zh-hant" and "寫成中文數字" in row["prompt"] and " in zh-hant" in capsys.readouterr().out
    assert main(["sft", "--out", str(tiny_sft), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert "fine-tuned 4 steps" in capsys.readouterr().out


def test_base_few_shot_prompt_is_plain_text(capsys, tiny_run):
    assert main(["eval", "tasks", "--run", str(tiny_run), "--n", "1", "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert "plain Q/A prompt" in out and "2-shot" in out


def test_lora_sft_and_merge(capsys, tiny_run, tmp_path):
    import torch

    from ownllm.checkpoint import load_model

    lora = tmp_path / "lora"
    assert main(["sft", "--base", str(tiny_run), "--out", str(lora), "--lora", "--lora-rank", "2", "--max-steps", "2", "--no-compile",
                 "--no-progress", "--set", "batch_size=2", "--set", "task_examples=16", "--set", "dtype=float32"]) == 0
    assert "trainable" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge-lora", "--run", str(lora), "--out", str(merged)]) == 0
    a, b = load_model(lora), load_model(merged)
    assert b.config.lora_rank == 0
    x = torch.randint(0, a.config.vocab_size, (1, 12))
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    from ownllm.inference.generate import load_run
    from ownllm.inference.quantize import Int8Linear
    from ownllm.lora import LoRALinear

    served = load_run(lora)[0]  # inference folds the adapters in: plain layers (fused, quantizable)
    assert not any(isinstance(m, LoRALinear) for m in served.modules())
    with torch.no_grad():
        torch.testing.assert_close(served(x), a(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, Int8Linear) for m in load_run(lora, quantize="int8")[0].layers.modules())
    code, err = _err(capsys, ["merge-lora", "--run", str(merged), "--out", str(tmp_path / "again")])
    assert code == 2 and "no LoRA" in err[0]


def test_chat_repl_commands_and_turns(tiny_sft):
    from ownllm.chat import repl

    lines = iter(["/system Be brief.", "hello", "/temp 0", "again", "/temp x", "/reset", "/quit"])
    out = []
    repl(str(tiny_sft), max_new_tokens=5, read=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert "system prompt set" in text and "temperature 0.0" in text and "usage: /temp" in text
    assert "conversation reset" in text and text.count("bot> ") == 2


def test_data_tasks_writes_messages_jsonl(tmp_path):
    import json

    out = tmp_path / "tasks.jsonl"
    assert main(["data", "tasks", "--out", str(out), "--n", "24", "--split", "test"]) == 0
    recs = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 24 and all(r["split"] == "test" for r in recs)
    assert recs[0]["messages"][0]["role"] == "user" and recs[0]["messages"][1]["role"] == "assistant"
    from ownllm.data.formats import read_chat_jsonl

    assert len(read_chat_jsonl(out).conversations) == 24  # readable back as SFT data


def test_generate_with_a_json_schema_or_regex(tmp_path, run_dir, capsys):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                    "ok": {"type": "boolean"}},
                                  "required": ["n", "ok"], "additionalProperties": False}))
    capsys.readouterr()
    assert main(["generate", "--run", str(run_dir), "--prompt", "X", "--json-schema", str(schema), "--seed", "3"]) == 0
    obj = json.loads(capsys.readouterr().out.strip()[1:])
    assert set(obj) == {"n", "ok"} and 0 <= obj["n"] <= 9 and isinstance(obj["ok"], bool)
    assert main(["generate", "--run", str(run_dir), "--prompt", "X", "--regex", "[a-c]{4}!", "--seed", "3"]) == 0
    assert __import__("re").fullmatch(r"X[a-c]{4}!", capsys.readouterr().out.strip())
    schema.write_text(json.dumps({"type": "string", "format": "no-such-format"}))
    assert main(["generate", "--run", str(run_dir), "--prompt", "X", "--json-schema", str(schema)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "s.json" in err and "no-such-format" in err


def test_a_named_recipe_sets_its_parts_and_flags_override_them():
    from ownllm.cli import _train_config, build_parser
    from ownllm.config import RECIPES

    args = build_parser().parse_args(["pretrain", "--recipe", "lookup", "--out", "r", "--max-steps", "9"])
    tcfg, model = _train_config(args)
    assert (tcfg.optimizer, tcfg.copy_steps, tcfg.vocab_size, tcfg.max_steps) == ("muon", 150, 4096, 9)
    assert tcfg.data == RECIPES["lookup"]["train"]["data"] and model == {"smear": True, "qk_norm": True}
    assert args.preset == "tiny"
    args = build_parser().parse_args(["pretrain", "--recipe", "llama", "--out", "r", "--data", "shakespeare",
                                      "--set", "copy_steps=5"])
    tcfg, model = _train_config(args)
    assert (tcfg.data, tcfg.copy_steps, model) == ("shakespeare", 5, {})
    assert main(["pretrain", "--recipe", "nope", "--out", "r"]) == 2


def test_every_stage_takes_a_config_file(tmp_path):
    """--config FILE.toml: [train] for sft, [train] and [stage] for the alignment stages; --set and
    flags win over it; an unknown table is an error naming it."""
    from ownllm.cli import _stage_configs, build_parser
    from ownllm.config import DPO_DEFAULTS, DPOConfig

    cfg = tmp_path / "dpo.toml"
    cfg.write_text("[train]\nlr = 1e-5\nbatch_size = 4\n\n[stage]\nbeta = 0.3\n")
    args = build_parser().parse_args(["dpo", "--policy", "p", "--out", "o", "--config", str(cfg), "--batch-size", "2"])
    tcfg, dcfg = _stage_configs(args, DPO_DEFAULTS, DPOConfig)
    assert (tcfg.lr, tcfg.batch_size, dcfg.beta) == (1e-5, 2, 0.3)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndim = 3\n")
    assert main(["sft", "--base", "b", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
