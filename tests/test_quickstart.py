from ownllm.cli import build_parser
from ownllm.quickstart import BUDGETS, host_speed_hint


def test_host_speed_hint_scales_the_default_budgets_only_on_a_slow_host():
    assert BUDGETS == {"pretrain_budget": 120.0, "sft_budget": 420.0, "rlhf_budget": 240.0}
    speed, hint = host_speed_hint(366, 120.0)  # stop 25's host
    assert abs(speed - 366 / 120 / 3.0) < 1e-9 and hint is None
    speed, hint = host_speed_hint(196, 120.0)  # stop 26's host: 0.544x
    assert abs(speed - 196 / 360) < 1e-9
    # each default / 0.544, rounded up to 10 s: 220.4 -> 230, 771.4 -> 780, 440.8 -> 450
    assert hint.endswith("ownllm quickstart --pretrain-budget 230 --sft-budget 780 --rlhf-budget 450")
    assert "196 steps in 120s, 0.54x" in hint
    assert host_speed_hint(270, 120.0)[1] is None      # 0.75x: not slow
    assert host_speed_hint(269, 120.0)[1] is not None
    # budgets already raised on a slow host (stop 26: 426 steps in 230 s, 0.62x): more steps than the
    # README rows' 360, so no hint; a short smoke run on that host still gets one, with the defaults scaled
    assert host_speed_hint(426, 230.0)[1] is None
    assert host_speed_hint(49, 30.0)[1].endswith("--pretrain-budget 230 --sft-budget 780 --rlhf-budget 450")


def test_quickstart_cli_leaves_unset_budgets_to_the_function(monkeypatch):
    import ownllm.quickstart

    seen = {}
    monkeypatch.setattr(ownllm.quickstart, "quickstart", lambda out, **kw: seen.update(kw, out=out))
    args = build_parser().parse_args(["quickstart", "--sft-budget", "780", "--out", "q"])
    args.func(args)
    assert seen["out"] == "q" and seen["sft_budget"] == 780.0
    assert "pretrain_budget" not in seen and "rlhf_budget" not in seen
