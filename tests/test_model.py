import pytest
import torch

from ownllm.config import ModelConfig, model_config
from ownllm.errors import OwnLLMError
from ownllm.model import GPT, KVCache
from tests.conftest import randomize_


def _hf_model(model: GPT):
    transformers = pytest.importorskip("transformers")
    from ownllm.interop.hf import hf_config_dict, to_hf_state_dict

    d = hf_config_dict(model.config)
    d.pop("architectures"), d.pop("model_type"), d.pop("torch_dtype")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**d)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied weights are shared, not stored twice
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_llama(tiny_cfg, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "tie_embeddings": tie})
    model = GPT(cfg).eval()
    with torch.no_grad():  # perturb every weight (norms and zero-initialised projections included)
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.05))
    hf = _hf_model(model)
    idx = torch.randint(0, cfg.vocab_size, (3, 37))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(input_ids=idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _smeared(cfg, smear: bool):
    """The config with ModelConfig.smear on or off; with it on the gate is made large (0.5 ± 0.05)
    so that a position fed the wrong previous token changes the logits visibly."""
    return ModelConfig(**{**cfg.__dict__, "smear": smear})


def _model(cfg, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = randomize_(GPT(cfg)).eval()
    if cfg.smear:
        with torch.no_grad():
            model.smear_gate.add_(0.5)
    return model


@pytest.mark.parametrize("smear", [False, True])
def test_kv_cache_decode_equals_full_forward(tiny_cfg, smear):
    tiny_cfg = _smeared(tiny_cfg, smear)
    model = _model(tiny_cfg, 1)
    assert sum(p.numel() for p in model.parameters()) == tiny_cfg.num_params()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.empty(tiny_cfg, batch=2, max_len=32)
        cache.valid[:, :20] = True
        steps = [model(idx[:, :8], cache=cache)]
        for t in range(8, 20):
            steps.append(model(idx[:, t: t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20


@pytest.mark.parametrize("smear", [False, True])
def test_left_padded_batch_matches_unpadded_rows(tiny_cfg, smear):
    """Row-wise positions and a key mask make a left-padded row give the logits it has alone
    (with smear: the first real token gets no pad embedding mixed in)."""
    from ownllm.inference.engine import Engine

    tiny_cfg = _smeared(tiny_cfg, smear)
    model = _model(tiny_cfg, 2)
    a = torch.randint(0, tiny_cfg.vocab_size, (1, 12))
    b = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    with torch.no_grad():
        ref_b = model(b)[0, -1]
        eng = Engine(model, pad_id=0)
        logits, _, _ = eng.prefill([a[0].tolist(), b[0].tolist()], max_len=20)
    torch.testing.assert_close(logits[1], ref_b, rtol=1e-5, atol=1e-5)


def test_presets_and_bad_config():
    for name in ("tiny", "small", "gpt2-124m"):
        assert model_config(name).num_params() > 0
    assert 100e6 < model_config("gpt2-124m").num_params() < 150e6
    with pytest.raises(OwnLLMError, match="unknown preset"):
        model_config("huge")
    with pytest.raises(OwnLLMError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("smear", [False, True])
def test_batched_greedy_generation_equals_one_by_one(tiny_cfg, smear):
    from ownllm.inference.engine import Engine, SamplingParams

    model = _model(_smeared(tiny_cfg, smear), 3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    eng = Engine(model, pad_id=0)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = eng.generate(prompts, params)
    singles = [eng.generate([p], params)[0] for p in prompts]
    assert batched == singles
    assert all(len(o) == 12 for o in batched)


def test_sampling_seed_determinism_and_stop(tiny_cfg):
    from ownllm.inference.engine import Engine, SamplingParams

    torch.manual_seed(4)
    model = randomize_(GPT(tiny_cfg)).eval()
    eng = Engine(model, pad_id=0)
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a, b = eng.generate([[1, 2, 3]], p), eng.generate([[1, 2, 3]], p)
    c = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=8))
    assert a == b and a != c
    stop_tok = a[0][3]
    first = a[0].index(stop_tok)
    stopped = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9,
                                                       seed=7, stop_ids=(stop_tok,)))
    assert stopped[0] == a[0][: first + 1]


def test_a_temperature_near_zero_samples_the_best_token_not_nan():
    """logits / 1e-212 overflowed to inf and the softmax to nan (a 500 from the server, found by
    test_random_bodies_never_5xx); the limit of a vanishing temperature is greedy."""
    from ownllm.inference.engine import SamplingParams, sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0, -5.0], [0.5, -1.0, 0.25, 4.0]])
    for t in (4.0622005835253036e-212, 1e-38, 1e-30, 1e-6):
        for top_k, top_p in ((None, None), (2, 0.9)):
            p = SamplingParams(max_new_tokens=1, temperature=t, top_k=top_k, top_p=top_p)
            assert sample_next(logits, p, torch.Generator().manual_seed(0)).tolist() == [1, 3]


def test_fused_inference_projections_follow_weight_updates(tiny_cfg):
    """q/k/v and gate/up are fused at inference; an in-place update must not leave them stale."""
    torch.manual_seed(5)
    model = randomize_(GPT(tiny_cfg)).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 9))

    def cached_logits():
        cache = KVCache.empty(tiny_cfg, batch=1, max_len=16)
        cache.valid[:, :9] = True
        with torch.no_grad():
            return model(idx, cache=cache)

    before = cached_logits()
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        model.layers[1].mlp.up_proj.weight.add_(0.1)
        full = model(idx)
    after = cached_logits()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, full, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # training path: plain projections, gradients flow
        model.train()
        model(idx).sum().backward()
    assert model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("kv_heads,smear", [(2, False), (4, False), (2, True)])
def test_compiled_static_decode_matches_eager(tiny_cfg, kv_heads, smear):
    """The compiled step (reads the cache, returns new k/v) against eager decoding: one row, and
    a left-padded batch whose rows have their own positions; grouped-query (2 of 4) and not."""
    from ownllm.inference.engine import Engine, SamplingParams

    cfg = ModelConfig(**{**tiny_cfg.__dict__, "n_kv_heads": kv_heads, "smear": smear})
    model = _model(cfg, 6)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    compiled, eager = Engine(model, compile=True), Engine(model)
    for prompts in ([[3, 4, 5, 6, 7]], [[3, 4, 5, 6, 7], [9, 8], [2, 7, 1, 8]]):
        out = compiled.generate(prompts, params)
        assert out == eager.generate(prompts, params)
        assert out[-1] == eager.generate(prompts[-1:], params)[0]  # padding changes nothing


def test_stop_strings_hold_back_and_cut_across_pieces():
    from ownllm.inference.generate import StopStrings

    s = StopStrings(["END", "", "<|x"])
    assert s.push("Hello E") == "Hello "       # "E" could begin END: held back
    assert s.push("N") == "" and not s.hit
    assert s.push("Dgame") == "" and s.hit      # cut at the stop string, the rest dropped
    t = StopStrings(["END"])
    assert t.push("abcE") == "abc" and t.flush("ND!") == "" and t.hit  # completed by the last bytes
    u = StopStrings(["END"])
    assert u.push("abcE") == "abc" and u.flush("x") == "Ex" and not u.hit


def test_long_training_rows_take_the_flash_kernel_with_the_same_loss_and_gradients(tiny_cfg, monkeypatch):
    """Written-out attention keeps (batch, heads, T, T) scores per layer for the backward pass; past
    EXPLICIT_ATTENTION_MAX elements training takes SDPA instead (a real model's long preference
    rows ran a 24 GB machine out of memory), with the same loss and gradients."""
    import ownllm.model as model_mod

    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**tiny_cfg.__dict__, "n_kv_heads": 2}))
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 40))
    calls = []
    explicit = model_mod.explicit_attention
    monkeypatch.setattr(model_mod, "explicit_attention", lambda *a, **k: calls.append(1) or explicit(*a, **k))

    def loss_and_grads():
        model.zero_grad()
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    small_loss, small_grads = loss_and_grads()
    assert calls   # 2 × heads × 40² scores: written out
    calls.clear()
    monkeypatch.setattr(model_mod, "EXPLICIT_ATTENTION_MAX", 2 * tiny_cfg.n_heads * 40 * 40 - 1)
    long_loss, long_grads = loss_and_grads()
    assert not calls   # one element past the limit: SDPA
    torch.testing.assert_close(long_loss, small_loss, rtol=1e-5, atol=1e-6)
    for name, g in small_grads.items():
        torch.testing.assert_close(long_grads[name], g, rtol=1e-4, atol=1e-6)
