"""ownllm.cost: the FLOP estimate against PyTorch's own FLOP counter, per-stage peak memory, the
energy figure's method, and the cost row every training run writes."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ownllm import cost
from ownllm.config import ModelConfig
from ownllm.lora import freeze_base
from ownllm.model import GPT, KVCache

CFG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)


def _counted(fn) -> tuple[float, float]:
    """(our estimate, torch.utils.flop_counter's count) of what fn runs."""
    before = cost.totals()["flops"]
    with FlopCounterMode(display=False) as fc:
        fn()
    return cost.totals()["flops"] - before, fc.get_total_flops()


@pytest.mark.parametrize("mode", ["train", "lora", "lora-top", "forward", "prefill+decode"])
def test_flop_estimate_agrees_with_torch_flop_counter(mode):
    torch.manual_seed(0)
    lora = {"lora": {"lora_rank": 4}, "lora-top": {"lora_rank": 4, "lora_layers": 1}}.get(mode, {})
    model = GPT(ModelConfig(**{**CFG.__dict__, **lora}))
    x = torch.randint(0, CFG.vocab_size, (2, 48))
    if lora:
        freeze_base(model)

    def run():
        if mode in ("train", "lora", "lora-top"):
            model(x).logsumexp(-1).mean().backward()
        elif mode == "forward":
            with torch.no_grad():
                model(x)
        else:
            with torch.no_grad():
                cache = KVCache.empty(CFG, 2, 64)
                model.last_logits(x, cache=cache)
                for _ in range(8):
                    model.last_logits(x[:, :1], cache=cache)

    ours, reference = _counted(run)
    if mode == "prefill+decode":   # the flop counter does not see SDPA on CPU: add the attention it computes
        reference += 4 * CFG.n_layers * CFG.n_heads * CFG.head_dim * 2 * (48 * 48 + sum(48 + i for i in range(1, 9)))
    assert ours == pytest.approx(reference, rel=0.03), (mode, ours, reference)
    if mode == "lora":   # the frozen weights get no weight gradient: ~4N per token, not 6N
        full, _ = _counted(lambda: GPT(CFG)(x).logsumexp(-1).mean().backward())
        assert 0.6 < ours / full < 0.8
    if mode == "lora-top":   # adapters in the top block only: the backward pass stops below it
        assert not any(p.requires_grad for p in model.layers[0].parameters())
        assert any(p.requires_grad for p in model.layers[1].parameters())


def test_peak_memory_belongs_to_its_own_stage_and_to_the_scopes_around_it():
    stages = cost.Stages()
    with cost.measure("outer") as outer:
        stages.start("big")
        big = torch.ones(64 * 2**20 // 4 * 4)   # 256 MB, touched
        big += 1
        del big
        stages.start("small")
        small = torch.ones(1024)
        del small
        stages.stop()
    big, small = stages.costs["big"]["peak_rss_mb"], stages.costs["small"]["peak_rss_mb"]
    assert big > small + 200, stages.costs     # the second stage does not inherit the first one's peak
    assert outer.result["peak_rss_mb"] >= big  # the enclosing scope keeps it
    assert outer.result["wall_s"] >= stages.costs["big"]["wall_s"] + stages.costs["small"]["wall_s"] - 1e-3


def test_energy_is_measured_where_a_package_counter_is_readable(tmp_path, monkeypatch):
    counter = tmp_path / "energy_uj"
    counter.write_text("1000")
    monkeypatch.setattr(cost, "RAPL", counter)
    with cost.measure() as m:
        counter.write_text(str(1000 + 3_600_000_000))   # one watt-hour in microjoules
    assert m.result["energy_wh"] == pytest.approx(1.0) and "measured" in m.result["energy_method"]
    monkeypatch.setattr(cost, "RAPL", tmp_path / "absent")
    monkeypatch.setenv("OWNLLM_WATTS_PER_CORE", "36")
    with cost.measure() as m:
        sum(i * i for i in range(300_000))
    assert m.result["energy_wh"] == pytest.approx(m.result["cpu_s"] * 36 / 3600, rel=0.05, abs=1e-5)
    assert m.result["energy_method"] == "estimated: 36 W per busy core"


def test_cost_table_adds_stages_up():
    a = dict(tokens=10, train_tokens=10, flops=1e9, wall_s=60, cpu_s=100, peak_rss_mb=500, peak_gpu_mb=None,
             energy_wh=0.5, energy_method="estimated: 10 W per busy core")
    b = {**a, "tokens": 5, "train_tokens": 0, "peak_rss_mb": 900}
    rows = cost.cost_table({"pretrain": a, "eval": b})
    assert rows[-3] == "| **total** | 15 | 10 | 2e+09 | 2.0 min | 200 | 900 MB | 1 Wh |"
    assert "estimated: 10 W per busy core" in rows[-1]
