from ownllm.quickstart import host_speed_hint


def test_host_speed_hint_scales_budgets_only_on_a_slow_host():
    budgets = {"pretrain_budget": 120.0, "sft_budget": 420.0, "rlhf_budget": 240.0}
    speed, hint = host_speed_hint(366, 120.0, budgets)  # stop 25's host
    assert abs(speed - 366 / 120 / 3.0) < 1e-9 and hint is None
    speed, hint = host_speed_hint(196, 120.0, budgets)  # stop 26's host: 0.544x
    assert abs(speed - 196 / 360) < 1e-9
    # each budget / 0.544, rounded up to 10 s: 220.4 -> 230, 771.4 -> 780, 440.8 -> 450
    assert hint.endswith("ownllm quickstart --pretrain-budget 230 --sft-budget 780 --rlhf-budget 450")
    assert "196 steps in 120s, 0.54x" in hint
    assert host_speed_hint(270, 120.0, budgets)[1] is None      # 0.75x: not slow
    assert host_speed_hint(269, 120.0, budgets)[1] is not None
