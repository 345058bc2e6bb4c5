from ownllm.cli import build_parser
from ownllm.config import QUICKSTART_STEPS
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
    assert f"(default {QUICKSTART_STEPS['sft_steps']})" in help_text


def test_an_unknown_recipe_is_refused_before_anything_is_written(tmp_path):
    import pytest

    from ownllm.errors import OwnLLMError
    from ownllm.quickstart import quickstart

    with pytest.raises(OwnLLMError, match="unknown recipe 'nope'"):
        quickstart(tmp_path / "q", recipe="nope", log=lambda *a: None)
    assert not (tmp_path / "q").exists()
