from ownllm.cli import build_parser
from ownllm.config import MODEL_QUICKSTART_STEPS, QUICKSTART_STEPS
from ownllm.quickstart import limit


def test_stage_length_is_steps_unless_seconds_are_given():
    assert limit(360, None) == {"max_steps": 360, "time_budget": None}
    assert limit(360, 120.0) == {"max_steps": None, "time_budget": 120.0}


def test_quickstart_cli_passes_only_what_was_set(monkeypatch):
    import torch

    import ownllm.quickstart

    seen = {}
    monkeypatch.setattr(ownllm.quickstart, "quickstart", lambda out, **kw: seen.update(kw, out=out))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.update(threads=n))   # not this process's
    args = build_parser().parse_args(["quickstart", "--sft-budget", "780", "--out", "q"])
    args.func(args)
    assert seen["out"] == "q" and seen["sft_budget"] == 780.0
    assert "pretrain_budget" not in seen and "rlhf_budget" not in seen and "steps" not in seen
    seen.clear()
    args = build_parser().parse_args(["quickstart", "--pretrain-steps", "50", "--ppo-steps", "3", "--threads", "1"])
    args.func(args)
    assert seen["steps"] == {"pretrain_steps": 50, "ppo_steps": 3} and seen["threads"] == 1
    help_text = build_parser()._subparsers._group_actions[0].choices["quickstart"].format_help()
    help_text = " ".join(help_text.split())   # (argparse wraps to the terminal's width)
    assert (f"(default {QUICKSTART_STEPS['sft_steps']}; {MODEL_QUICKSTART_STEPS['sft_steps']} with --model)"
            in help_text)


def test_an_unknown_recipe_is_refused_before_anything_is_written(tmp_path):
    import pytest

    from ownllm.errors import OwnLLMError
    from ownllm.quickstart import quickstart

    with pytest.raises(OwnLLMError, match="unknown recipe 'nope'"):
        quickstart(tmp_path / "q", recipe="nope", log=lambda *a: None)
    assert not (tmp_path / "q").exists()


def test_model_track_cli_takes_its_own_flags(monkeypatch):
    import pytest

    import ownllm.quickstart_model
    from ownllm.errors import OwnLLMError

    seen = {}
    monkeypatch.setattr(ownllm.quickstart_model, "quickstart_model", lambda model, out, **kw: seen.update(kw, model=model, out=out))
    args = build_parser().parse_args(["quickstart", "--model", "smollm2", "--sft-steps", "5"])
    args.func(args)
    assert seen == {"model": "smollm2", "out": "runs/quickstart-smollm2", "steps": {"sft_steps": 5}, "n_eval": None}
    for flags in (["--pretrain-steps", "5"], ["--grpo-steps", "2"], ["--recipe", "llama"], ["--sft-budget", "60"]):
        args = build_parser().parse_args(["quickstart", "--model", "smollm2", *flags])
        with pytest.raises(OwnLLMError, match=flags[0] + ".*from-scratch track"):
            args.func(args)


def test_model_track_end_to_end_on_a_small_imported_model(tmp_path, capsys):
    """Every stage of `quickstart --model` on a tiny random Qwen2 with its own ChatML template: the
    report card, the exports and the served reply are real; the figures of a random model are not."""
    import json

    import pytest

    from ownllm.quickstart_model import quickstart_model
    from tests.conftest import qwen_dir

    pytest.importorskip("transformers")
    from ownllm.config import MODEL_QUICKSTART

    src, _, _ = qwen_dir(tmp_path, max_positions=1024)
    steps = {"sft_steps": 2, "reward_steps": 1, "dpo_steps": 1, "ppo_steps": 1}
    summary = quickstart_model(str(src), tmp_path / "q", steps=steps, n_eval=1,
                               settings={"n_rag": 2, "n_agent": 2, "n_prompts": 4, "n_judge": 4, "bpb_tokens": 256,
                                         "sft": {**MODEL_QUICKSTART["sft"], "task_examples": 64, "compile": False},
                                         "pair_config": {"val_prompts": 4, "max_val_pairs": 8}, "ppo": {"batch_size": 4}})
    out = tmp_path / "q"
    report = json.loads((out / "report.json").read_text())
    assert report["sft"]["step"] == 2 and report == json.loads(json.dumps(summary))
    for when in ("before", "after"):
        assert set(report[when]["tasks"]) >= {"en_0", "zh_0", "zh-hant_0"} and report[when]["bpb"] > 0
        assert "poem_next" not in report[when]["per_family"]["en_0"]   # recalls a corpus an imported model never read
    assert set(report["aligned"]) == {"dpo", "ppo"} and 0 <= report["reward"]["pair_accuracy"] <= 1
    assert report["served"]["status"] == 200 and report["served"]["usage"]["completion_tokens"] > 0
    assert (out / "hf" / "config.json").exists() and (out / "sft.gguf").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| **mean** |" in md and "Shakespeare validation bits per byte" in md and "| DPO |" in md
    assert list(report["cost"]) == ["import", "measure before", "sft", "measure after", "alignment", "export", "serve"]
    assert report["cost"]["sft"]["train_tokens"] > 0 and report["cost"]["import"]["train_tokens"] == 0
    assert "## Cost" in md and "| **total** |" in md and "## Bias probe" in md and "| LoRA SFT |" in md
    assert set(report["bias"]["as imported"]) == {"en", "zh"}
    assert (out / "plots" / "task_accuracy.png").exists() and (out / "plots" / "sft_loss.png").exists()
    result = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")][-1]
    keys = {kv.split("=")[0] for kv in result.split()[1:]}
    assert {"en_zero_shot", "en_four_shot", "sft_en", "bpb_before", "bpb_after", "rag_after", "pair_accuracy",
            "dpo_decided_win_rate", "dpo_decided_share", "ppo_kl", "served", "tokens", "tflops", "energy_wh",
            "wall_s"} <= keys
