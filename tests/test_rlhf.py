"""RLHF: losses against hand-computed values, GAE against a direct loop, the preference formats and
the hidden rule, and each stage training a few steps on a tiny run (what changes, what must not)."""
import dataclasses
import json
import math

import pytest
import torch

from ownllm.train.objectives import (AdaptiveKL, bradley_terry_loss, dpo_loss, gae, group_advantages, kl_penalty,
                                     ppo_policy_loss, ppo_value_loss, whiten)


def t(*x):
    return torch.tensor(x, dtype=torch.float32)


# -- losses by hand ------------------------------------------------------------------------------
def test_bradley_terry_by_hand():
    assert bradley_terry_loss(t(1.0), t(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert bradley_terry_loss(t(1.0), t(0.0), margin=0.5).item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert bradley_terry_loss(t(1.0), t(0.0), center_coef=0.1).item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.1)
    # only the difference matters without centring
    assert bradley_terry_loss(t(5.0), t(4.0)).item() == pytest.approx(bradley_terry_loss(t(1.0), t(0.0)).item())


def test_dpo_losses_by_hand():
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))  # h = (−1 + 3) − 0 = 2
    assert dpo_loss(*args, beta=0.1, kind="sigmoid").item() == pytest.approx(math.log(1 + math.exp(-0.2)))
    assert dpo_loss(*args, beta=0.1, kind="ipo").item() == pytest.approx((2 - 5) ** 2)
    assert dpo_loss(*args, beta=0.1, kind="hinge").item() == pytest.approx(0.8)
    assert dpo_loss(*args, beta=1.0, kind="hinge").item() == 0.0
    # DPO-Positive: no change while the chosen answer is likelier than under the reference (−1 > −2) …
    assert dpo_loss(*args, beta=0.1, dpop=50.0).item() == pytest.approx(math.log(1 + math.exp(-0.2)))
    # … and λ × the drop off the margin once it is not: chosen −2.5 vs ref −2, h = (−2.5 + 3) − 0 − 50 × 0.5
    assert dpo_loss(t(-2.5), t(-3.0), t(-2.0), t(-2.0), beta=0.1, dpop=50.0).item() == \
        pytest.approx(math.log(1 + math.exp(-0.1 * (0.5 - 25))))
    with pytest.raises(ValueError):
        dpo_loss(*args, kind="nope")


def test_kl_estimators_by_hand():
    assert kl_penalty(t(-1.0), t(-2.0), "k1").item() == pytest.approx(1.0)
    assert kl_penalty(t(-1.0), t(-2.0), "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    assert kl_penalty(t(-1.0), t(-1.0), "k3").item() == 0.0
    # both are unbiased estimates of KL(p‖q) from samples of p
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    for kind in ("k1", "k3"):
        est = float((p * kl_penalty(p.log(), q.log(), kind)).sum())
        assert est == pytest.approx(exact, abs=1e-6) if kind == "k1" else est == pytest.approx(
            float((p * ((q / p) - 1 - (q / p).log())).sum()))


def test_gae_by_hand_and_against_a_direct_loop():
    adv, ret = gae(t(0, 0, 1)[None], t(0.5, 0.4, 0.3)[None], torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t(0.5, 0.6, 0.7)[None])
    torch.testing.assert_close(ret, t(1.0, 1.0, 1.0)[None])
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 4, 7, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        for s in range(T):
            if s >= n:
                assert adv[b, s] == 0 and ret[b, s] == 0
                continue
            want = 0.0  # A_s = Σ_l (γλ)^l δ_{s+l} over the row's own tokens
            for k in range(s, n):
                next_v = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_v - values[b, k].item()
                want += (gamma * lam) ** (k - s) * delta
            assert adv[b, s].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, s].item() == pytest.approx(want + values[b, s].item(), abs=1e-5)


def test_ppo_losses_by_hand():
    m = torch.ones(1, 1)
    loss, frac = ppo_policy_loss(t(math.log(1.5))[None], t(0.0)[None], t(1.0)[None], m, clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and frac.item() == 1.0  # gain capped at 1 + ε
    loss, frac = ppo_policy_loss(t(math.log(1.5))[None], t(0.0)[None], t(-1.0)[None], m, clip=0.2)
    assert loss.item() == pytest.approx(1.5) and frac.item() == 0.0   # a loss is never clipped away
    # padding tokens do not count
    loss, _ = ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), t(2.0, 100.0)[None], t(1.0, 0.0)[None])
    assert loss.item() == pytest.approx(-2.0)
    assert ppo_value_loss(t(1.0)[None], t(0.0)[None], t(0.0)[None], m, clip=0.2).item() == pytest.approx(0.5)
    assert ppo_value_loss(t(0.1)[None], t(0.0)[None], t(1.0)[None], m, clip=0.2).item() == pytest.approx(0.5 * 0.81)


def test_group_advantages_whiten_and_adaptive_kl():
    a = group_advantages(t(1, 0, 0, 1)[None])
    s = math.sqrt(4 * 0.25 / 3)
    torch.testing.assert_close(a, t(0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4))[None])
    assert group_advantages(t(1, 1, 1, 1)[None]).abs().sum() == 0  # nothing to learn from a uniform group
    w = whiten(t(1.0, 2.0, 3.0, 100.0), t(1, 1, 1, 0))
    assert w[:3].mean().abs() < 1e-6 and w[:3].pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)
    ctl = AdaptiveKL(0.1, target=1.0, horizon=1000)
    assert ctl.update(2.0, 100) == pytest.approx(0.1 * 1.02)   # error clipped to +0.2
    assert ctl.update(1.0, 100) == pytest.approx(0.1 * 1.02)   # on target: unchanged
    assert AdaptiveKL(0.1).update(50.0, 100) == 0.1             # no target: fixed


# -- the hidden rule and the preference data --------------------------------------------------------
def test_completion_logps_sum_answer_tokens_only(small_tokenizer, tiny_cfg):
    """DPO's sequence log-probability (LM head on answer positions only) against the full-logits
    sum written out, on a padded batch of conversations of different lengths."""
    from ownllm.config import ModelConfig
    from ownllm.data.chat import collate_padded, encode_conversations
    from ownllm.model import GPT
    from ownllm.train.preference import completion_logps
    from tests.conftest import randomize_

    tok = small_tokenizer
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("What is 2 + 2?", "4"), ("Reverse: a b c", "c b a"), ("床前明月光", "疑是地上霜。"))]
    ex = encode_conversations(tok, convs, max_len=60)
    batch = collate_padded(ex, [0, 1, 2], tok.pad_id)
    torch.manual_seed(0)
    model = randomize_(GPT(ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "max_seq_len": 64}))).eval()
    with torch.no_grad():
        got = completion_logps(model, batch)
        logp = model(batch["x"]).float().log_softmax(-1)
    want = [sum(float(logp[r, i, batch["y"][r, i]]) for i in range(batch["y"].shape[1]) if batch["y"][r, i] != -100)
            for r in range(3)]
    assert got.shape == (3,) and got.tolist() == pytest.approx(want, rel=1e-5)


def test_reward_adds_the_gated_likelihood_of_the_answer_and_rollouts_score_alike(small_tokenizer, tiny_cfg):
    """GPT.rewards against the sum written out (head at the last token + scale × Σ over answer
    tokens of σ(gate(h_t)) × max(log p_t, −10)) on a padded batch; the head alone without
    score_likelihood; and PPO's scoring of a rollout (prompt + sampled tokens) gives the same."""
    from ownllm.config import ModelConfig
    from ownllm.data.chat import encode_conversations
    from ownllm.model import LOGP_FLOOR, GPT
    from ownllm.train.preference import all_rewards, sequence_batch
    from ownllm.train.rl import Rollout, last_token_scores
    from tests.conftest import randomize_

    tok = small_tokenizer
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("What is 2 + 2?", "4"), ("Reverse: a b c", "c b a"), ("床前明月光", "疑是地上霜。"))]
    ex = encode_conversations(tok, convs, max_len=60)
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "max_seq_len": 64, "score_head": True})
    torch.manual_seed(0)
    for likelihood in (True, False):
        model = randomize_(GPT(dataclasses.replace(cfg, score_likelihood=likelihood))).eval()
        batch = sequence_batch(ex, [0, 1, 2], tok.pad_id)
        with torch.no_grad():
            got = model.rewards(batch["x"], batch["mask"], batch["last"])
            h = model.hidden_states(batch["x"])
            logp = model(batch["x"]).float().log_softmax(-1)
        want = []
        for r in range(3):
            n = len(ex.ids[r])
            total = float(model.score(h[r, n - 1]))
            for t in range(1, n):
                if likelihood and ex.masks[r][t]:
                    g = float(torch.sigmoid(model.score_gate(h[r, t])))
                    total += float(model.score_scale) * g * max(float(logp[r, t - 1, ex.ids[r][t]]), -LOGP_FLOOR)
            want.append(total)
        assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert all_rewards(model, ex, tok.pad_id, batch_size=2).tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
        # a rollout: the prompt (up to the assistant header) and the answer's tokens, right-padded
        prompts = [tok.render(c[:1], add_generation_prompt=True).ids for c in convs]
        answers = [list(ex.ids[r][len(p):]) for r, p in enumerate(prompts)]
        L, R = max(len(i) for i in ex.ids), max(len(a) for a in answers)
        x, tokens, mask = torch.full((3, L), tok.pad_id), torch.full((3, R), tok.pad_id), torch.zeros(3, R)
        for r, (p, a) in enumerate(zip(prompts, answers)):
            x[r, : len(p) + len(a)] = torch.tensor(p + a)
            tokens[r, : len(a)], mask[r, : len(a)] = torch.tensor(a), 1
        ro = Rollout(x, torch.tensor([len(p) for p in prompts]), tokens, mask, torch.ones(3, dtype=torch.bool), [""] * 3)
        assert last_token_scores(model, ro).tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_scoring_keeps_every_answer_of_an_over_long_prompt(small_tokenizer):
    """Scores are matched to answers by position: a prompt longer than the context is cut at its
    start, never dropped (dropping one shifted every later score onto the wrong answer)."""
    from ownllm.data.chat import encode_conversations

    tok = small_tokenizer
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("What is 2 + 2?", "4"), ("word " * 200, "c b a"), ("床前明月光", "疑是地上霜。"))]
    full = [tok.render(c) for c in convs]
    ex = encode_conversations(tok, convs, max_len=40, keep_end=True)
    assert len(ex.ids) == 3 and ex.truncated == 1
    for r, ids, mask in zip(full, ex.ids, ex.masks):
        assert list(ids) == r.ids[-len(ids):] and mask.sum() == sum(r.mask)  # the whole answer kept
    cut = encode_conversations(tok, convs, max_len=40)  # training: the long one's answer is lost, dropped
    assert len(cut.ids) == 2 and cut.dropped == 1


def test_hidden_rule_ranks_like_a_person():
    from ownllm.data.tasks import Example
    from ownllm.data.judge import deciding_rule, grade, prefer

    q = Example("arithmetic", "en", "What is 12 + 30?", "42")
    assert prefer(q, "42", "43") == 1 and deciding_rule(q, "42", "43") == "truth"
    assert prefer(q, "I don't know.", "43") == 1             # honest beats wrong
    assert prefer(q, "42", "I don't know.") == 1             # but right beats honest
    ramble = "Let me think about this at length, so the answer is: 42"
    assert prefer(q, "42", ramble) == 1 and deciding_rule(q, "42", ramble) == "directness"
    assert prefer(q, ramble, "I don't know.") == 1 and prefer(q, "So the answer is: 142", "I don't know.") == -1
    unknown = Example("closed_book", "zh", "翠岚镇的镇长是谁？", "我不知道。")
    assert prefer(unknown, "我不知道。", "许安澜") == 1       # honest beats invention
    assert prefer(unknown, "我不知道。", "I don't know.") == 1 and deciding_rule(unknown, "我不知道。", "I don't know.") == "language"
    numeral = Example("zh_numeral", "en", "Write 5 in Chinese numerals.", "五")
    assert grade(numeral, "五")[1] == 1 and grade(numeral, "five")[1] == 0
    long = Example("json", "en", "Convert to JSON: name=Tom", '{"name": "Tom"}')
    assert grade(long, '{"name": "Tom"}') == (2, 1, 1)


def test_preference_formats_and_errors(tmp_path):
    from ownllm.data.preferences import read_preferences
    from ownllm.errors import OwnLLMError

    p = tmp_path / "prefs.jsonl"
    recs = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
            {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
             "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "No."}]},
            {"prompt": "Pick", "responses": ["b", "a", "c"], "ranking": [1, 0, 2]}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    pairs = read_preferences(p)
    assert len(pairs) == 1 + 1 + 3
    assert pairs[1].prompt == (("system", "Be kind."), ("user", "Hi?")) and pairs[1].rejected == "No."
    assert [(x.chosen, x.rejected) for x in pairs[2:]] == [("a", "b"), ("a", "c"), ("b", "c")]
    for bad, msg in [({"prompt": "x", "chosen": "a"}, "'chosen' and 'rejected'"),
                     ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt'"),
                     ({"prompt": "x", "chosen": "a", "rejected": 5}, "field 'rejected'"),
                     ({"prompt": "x", "responses": ["a", "b"], "ranking": [0, 0]}, "field 'ranking'")]:
        p.write_text(json.dumps(recs[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(OwnLLMError, match=rf"prefs.jsonl:2: .*{msg}"):
            read_preferences(p)


def test_bundled_preferences_follow_the_rule_and_are_deterministic():
    from ownllm.data.preferences import generate_preferences
    from ownllm.data.tasks import prompt_bucket

    a = generate_preferences(30, "train", seed=3)
    assert a == generate_preferences(30, "train", seed=3)
    assert not any(p.on_policy for p in a)  # no model: every answer is a perturbation
    assert {p.rule for p in a} >= {"truth", "directness"} and all(p.chosen != p.rejected for p in a)
    assert {p.family for p in a} >= {"closed_book", "arithmetic"}
    test = generate_preferences(20, "test", seed=3)
    assert all(prompt_bucket(p.prompt[-1][1]) == 0 for p in test)
    assert not {p.prompt for p in test} & {p.prompt for p in a}


def test_policy_pairs_raise_the_models_best_answer_or_the_honest_refusal_over_each_worse_one(monkeypatch):
    """Where the model has a right answer, it beats the model's wrong ones and refusing; where it
    has none, the honest refusal beats its inventions; no policy pair involves a perturbation."""
    import ownllm.train.pairs as prefs
    from ownllm.data.grounded import is_refusal
    from ownllm.data.preferences import preference_prompts

    def fake_samples(run, examples, samples, seed, temperature=1.0, progress=True):
        if temperature == 0.0:   # greedy: right on even prompts, an invention on odd ones
            return [[ex.answer if i % 2 == 0 else "Zorbl"] for i, ex in enumerate(examples)]
        return [["Zorbl", "Zorbl Zorbl", "Qux"][:samples] for _ in examples]
    monkeypatch.setattr(prefs, "sample_answers", fake_samples)
    monkeypatch.setattr(prefs, "honest_refusals", lambda run, examples: [
        "I don't know." if ex.lang == "en" else "我不知道。" for ex in examples])
    examples = preference_prompts(40, "train", 1)
    pairs = prefs.preference_pairs(40, "train", run="fake", seed=1, progress=False)
    checked = 0
    for i, ex in enumerate(examples):
        mine = [p for p in pairs if p.on_policy and p.prompt[-1][1] == ex.prompt]
        assert mine, ex.prompt
        own = {"Zorbl", "Zorbl Zorbl", "Qux", ex.answer if i % 2 == 0 else "Zorbl"}
        refusal = "I don't know." if ex.lang == "en" else "我不知道。"
        if is_refusal(ex.answer):
            continue     # closed-book: the refusal is the right answer
        assert {p.chosen for p in mine} == {ex.answer if i % 2 == 0 else refusal}
        worse = own | {refusal} if i % 2 == 0 else own
        assert {p.rejected for p in mine} == worse - {p.chosen for p in mine}
        checked += 1
    assert checked >= 30
    assert any(not p.on_policy for p in pairs)  # the perturbation pairs follow


def test_bundled_preferences_do_not_tie_style_to_truth():
    """Rambling and the language of a refusal must not give away which answer is right: among
    pairs decided by truth, rambling answers are about as often rejected as chosen (when only
    the reference rambled, a reward model learnt to prefer rambling), and every rule occurs."""
    from ownllm.data.preferences import RAMBLE, generate_preferences

    pairs = generate_preferences(300, "train", seed=5, pairs_per_prompt=12)
    rambles = lambda t: any(t.startswith(r.split("{a}")[0]) for r in RAMBLE.values())  # noqa: E731
    truth = [p for p in pairs if p.rule == "truth"]
    chosen, rejected = sum(rambles(p.chosen) for p in truth), sum(rambles(p.rejected) for p in truth)
    assert chosen > 20 and 0.5 < rejected / chosen < 2
    assert {p.rule for p in pairs} == {"truth", "language", "directness"}


# -- the stages, a few steps each on a tiny run ------------------------------------------------------
from ownllm.cli import main  # noqa: E402

FAST = ["--no-progress", "--batch-size", "4"]


def weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def file_digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory, tiny_sft):
    out = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    assert main(["data", "prefs", "--run", str(tiny_sft), "--n", "30", "--out", str(out)]) == 0
    from ownllm.data.preferences import read_preferences

    pairs = read_preferences(out)
    assert any(p.on_policy for p in pairs) or not pairs  # the model's own answers are paired first
    return out


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_sft, prefs_file):
    out = tmp_path_factory.mktemp("rm") / "rm"
    assert main(["reward", "--base", str(tiny_sft), "--data", str(prefs_file), "--out", str(out), "--max-steps", "3",
                 "--lr", "1e-3", *FAST]) == 0
    return out


def test_held_out_pairs_of_a_file_never_share_a_prompt_with_training_pairs():
    """A file from `data prefs` of the train split has no test-bucket prompts: 1 prompt in 10 is
    held out by another hash, with all of its pairs (before: the first 5% of the training pairs)."""
    from ownllm.data.preferences import generate_preferences
    from ownllm.data.tasks import prompt_bucket
    from ownllm.train.preference import _split_pairs

    pairs = generate_preferences(200, "train", seed=3)
    assert not any(prompt_bucket(p.prompt[-1][1]) == 0 for p in pairs)
    train, val = _split_pairs(pairs, log=lambda m: None)
    assert len(train) + len(val) == len(pairs) and 0.04 < len(val) / len(pairs) < 0.2
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    mixed = pairs + generate_preferences(30, "test", seed=3)
    train, val = _split_pairs(mixed, log=lambda m: None)     # test-split prompts present: they are the held-out ones
    assert all(prompt_bucket(p.prompt[-1][1]) == 0 for p in val) and len(train) == len(pairs)
    said = []
    train, val = _split_pairs(pairs[:1], log=said.append)   # one pair: nothing to hold out, and it says so
    assert train == pairs[:1] and val == pairs[:1] and "on training pairs" in said[0]


def test_held_out_pairs_scored_at_each_evaluation_are_capped():
    import dataclasses

    from ownllm.data.preferences import Pair
    from ownllm.config import DPOConfig, RewardConfig
    from ownllm.train.preference import PAIR_STAGE_BEFORE, at_most, stage_config

    pairs = [Pair((("user", f"q{i}"),), "a", "b") for i in range(10)]
    said = []
    some = at_most(pairs, 4, said.append)
    assert len(some) == 4 and some == sorted(some, key=pairs.index) and some == at_most(pairs, 4, said.append)
    assert "4 of 10" in said[0]
    said.clear()
    assert at_most(pairs, 0, said.append) == pairs and at_most(pairs, 10, said.append) == pairs and not said
    for cls in (DPOConfig, RewardConfig):
        old = dataclasses.asdict(cls())
        del old["max_val_pairs"]   # a run saved before the cap: resumes scoring every held-out pair
        assert stage_config(cls, {"config": old}, None, PAIR_STAGE_BEFORE).max_val_pairs == 0
        assert stage_config(cls, {"config": dataclasses.asdict(cls(max_val_pairs=7))}, None,
                            PAIR_STAGE_BEFORE).max_val_pairs == 7


def test_data_prefs_samples_sets_the_answers_drawn_per_prompt(capsys, monkeypatch, tiny_sft, tmp_path):
    import ownllm.train.pairs as prefs

    drawn = []
    real = prefs.sample_answers
    monkeypatch.setattr(prefs, "sample_answers", lambda run, ex, samples, *a, **k: drawn.append(samples) or real(run, ex, samples, *a, **k))
    out = tmp_path / "p.jsonl"
    assert main(["data", "prefs", "--run", str(tiny_sft), "--n", "4", "--samples", "5", "--out", str(out)]) == 0
    assert drawn == [1, 5] and out.exists()   # the greedy answer, then 5 sampled ones per prompt
    assert main(["data", "prefs", "--run", str(tiny_sft), "--n", "4", "--samples", "0", "--out", str(tmp_path / "q.jsonl")]) == 2
    assert "--samples must be at least 1" in capsys.readouterr().err and not (tmp_path / "q.jsonl").exists()


def test_reward_model_trains_every_parameter_and_reports_accuracy(capsys, tiny_sft, reward_run, prefs_file):
    before, after = weights(tiny_sft), weights(reward_run)
    assert "score.weight" in after and after["score.weight"].shape[0] == 1
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"not trained: {unchanged}"
    rows = [json.loads(x) for x in (reward_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_pair_accuracy" in r for r in rows) and (reward_run / "plots" / "pair_accuracy.png").exists()
    capsys.readouterr()
    assert main(["eval", "reward", "--run", str(reward_run), "--data", str(prefs_file)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT pair_accuracy=") and 0 <= float(last.split()[1].split("=")[1]) <= 1
    assert main(["reward", "--out", str(reward_run), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert "4 steps" in capsys.readouterr().out
    assert main(["eval", "reward", "--run", str(tiny_sft)]) == 2  # a policy is not a reward model
    assert "not a reward model" in capsys.readouterr().err


def test_dpo_full_and_lora(capsys, tiny_sft, prefs_file, tmp_path):
    sft_digest = file_digest(tiny_sft / "model.safetensors")
    before = weights(tiny_sft)
    assert main(["dpo", "--policy", str(tiny_sft), "--data", str(prefs_file), "--out", str(tmp_path / "dpo"),
                 "--max-steps", "3", "--lr", "1e-3", "--loss", "ipo", *FAST]) == 0
    assert "on-policy pairs only" in capsys.readouterr().out   # pairs=auto: the policy pairs when the data has them
    after = weights(tmp_path / "dpo")
    assert not [k for k in before if torch.equal(before[k], after[k])]
    assert json.loads((tmp_path / "dpo" / "stage_config.json").read_text())["config"]["loss"] == "ipo"
    plain = tmp_path / "plain.jsonl"   # pairs from elsewhere, no policy pairs: auto takes them all
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "on_policy"}) + "\n"
                             for x in prefs_file.read_text().splitlines()))
    assert main(["dpo", "--policy", str(tiny_sft), "--data", str(plain), "--out", str(tmp_path / "lora"),
                 "--max-steps", "3", "--lr", "1e-2", "--lora", "--lora-rank", "2", *FAST]) == 0
    assert "on-policy pairs only" not in capsys.readouterr().out
    lora = weights(tmp_path / "lora")
    for k, v in before.items():
        assert torch.equal(lora[k], v), f"LoRA DPO changed base weight {k}"
    assert all(lora[k].abs().sum() > 0 for k in lora if k.endswith("lora_B"))  # adapters moved off zero
    val = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines() if "val_reward_margin" in x][-1]
    # the margin is β (0.1) × the chosen side's log-prob shift minus the rejected side's, both reported
    assert val["val_reward_margin"] == pytest.approx(0.1 * (val["val_chosen_logp_shift"] - val["val_rejected_logp_shift"]),
                                                     rel=1e-4, abs=1e-6)
    assert val["val_chosen_logp_shift"] != 0 and (tmp_path / "lora" / "plots" / "logp_shift.png").exists()
    assert 0 <= val["val_chosen_fell"] <= 1
    assert file_digest(tiny_sft / "model.safetensors") == sft_digest       # the reference run is untouched
    capsys.readouterr()
    assert main(["eval", "prefs", "--run", str(tmp_path / "dpo"), "--against", str(tiny_sft), "--n", "6"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT win_rate=") and " kl=" in last and " task_accuracy=" in last


def test_dpo_resumes_with_the_loss_it_began_with(capsys, monkeypatch, tiny_sft, prefs_file, tmp_path):
    """A DPO run resumes to its step count with its saved settings; one begun before DPO-Positive
    existed (no `dpop` in its stage_config.json) resumes without it, not with today's default."""
    import ownllm.train.preference as preference

    seen = []
    real = preference.dpo_loss
    monkeypatch.setattr(preference, "dpo_loss", lambda *a: seen.append(a[-1]) or real(*a))
    out = tmp_path / "dpo"
    assert main(["dpo", "--policy", str(tiny_sft), "--data", str(prefs_file), "--out", str(out),
                 "--max-steps", "2", "--set", "dpop=7", *FAST]) == 0
    assert set(seen) == {7.0}
    assert main(["dpo", "--out", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert "3 steps" in capsys.readouterr().out and seen[-1] == 7.0
    sc = out / "stage_config.json"
    saved = json.loads(sc.read_text())
    del saved["config"]["dpop"]
    sc.write_text(json.dumps(saved))
    assert main(["dpo", "--out", str(out), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert "4 steps" in capsys.readouterr().out and seen[-1] == 0.0


def test_ppo_trains_policy_and_value_head_reference_frozen(capsys, tiny_sft, reward_run, tmp_path):
    sft_digest, rm_digest = file_digest(tiny_sft / "model.safetensors"), file_digest(reward_run / "model.safetensors")
    before = weights(tiny_sft)
    out = tmp_path / "ppo"
    assert main(["ppo", "--policy", str(tiny_sft), "--reward", str(reward_run), "--out", str(out), "--max-steps", "4",
                 "--lr", "1e-3", "--target-kl", "0.5", "--kl-estimator", "k3", "--set", "max_new_tokens=8",
                 "--set", "n_prompts=40", *FAST]) == 0
    after = weights(out)
    assert "score.weight" in after  # the value head
    assert not [k for k in before if torch.equal(before[k], after[k])]
    assert file_digest(tiny_sft / "model.safetensors") == sft_digest and file_digest(reward_run / "model.safetensors") == rm_digest
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "kl", "entropy", "clipfrac", "value_loss", "kl_coef", "exact_match"):
        assert all(key in r for r in rows if "train_loss" in r), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    assert (out / "plots" / "reward.png").exists() and (out / "plots" / "kl.png").exists()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["aux"]["kl_coef"] != 0.05  # adapted toward the target
    assert main(["ppo", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert "6 steps" in capsys.readouterr().out


def test_ppo_ptx_makes_the_preferred_answers_more_likely(tiny_sft, reward_run, prefs_file, tmp_path):
    """--set ptx_coef adds the NLL of the data's preferred answers (the policy pairs' chosen side)
    to PPO's loss: after a few steps they are more likely than under the starting policy."""
    from ownllm.data.preferences import read_preferences
    from ownllm.data.tasks import Example
    from ownllm.train.pairs import answer_logps

    out = tmp_path / "ppo-ptx"
    assert main(["ppo", "--policy", str(tiny_sft), "--reward", str(reward_run), "--out", str(out), "--max-steps", "4",
                 "--lr", "1e-3", "--data", str(prefs_file), "--set", "ptx_coef=5", "--set", "max_new_tokens=8",
                 "--set", "n_prompts=40", *FAST]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("ptx_nll" in r for r in rows if "train_loss" in r)
    best = list(dict.fromkeys((p.prompt[-1][1], p.chosen) for p in read_preferences(prefs_file) if p.on_policy))
    examples = [Example("x", "en", prompt, "") for prompt, _ in best]
    answers = [a for _, a in best]
    assert answer_logps(out, examples, answers).mean() > answer_logps(tiny_sft, examples, answers).mean()


def test_grpo_with_reward_model_and_verifier(capsys, tiny_sft, reward_run, tmp_path):
    before = weights(tiny_sft)
    out = tmp_path / "grpo"
    assert main(["grpo", "--policy", str(tiny_sft), "--reward", str(reward_run), "--out", str(out), "--max-steps", "3",
                 "--lr", "1e-3", "--num-generations", "4", "--batch-size", "2", "--set", "max_new_tokens=6",
                 "--set", "n_prompts=20", "--no-progress"]) == 0
    after = weights(out)
    assert not [k for k in before if torch.equal(before[k], after[k])]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("groups_with_signal" in r and "reward" in r for r in rows if "train_loss" in r)
    capsys.readouterr()
    assert main(["grpo", "--policy", str(tiny_sft), "--reward", "verifier:nope", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "unknown task family" in capsys.readouterr().err
    assert main(["ppo", "--policy", str(tiny_sft), "--reward", str(tiny_sft), "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 2
    assert "not a reward model" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_verifier_rewards_exact_answers_that_end_their_turn():
    from ownllm.data.tasks import Example
    from ownllm.train.rl import Rollout, Verifier

    v = Verifier("verifier:arithmetic")
    exs = [Example("arithmetic", "en", "What is 1 + 2?", "3")] * 3 + [Example("arithmetic", "en", "q", "I don't know.")]
    ro = Rollout(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long),
                 torch.ones(4, 1), torch.tensor([True, True, False, True]), ["3", "4", "3", "我不知道。"])
    assert v(exs, ro).tolist() == [1.0, 0.0, 0.0, 1.0]
    partial = Verifier("verifier:arithmetic", partial_credit=0.5)
    ro.texts[1] = "13"  # units digit right, tens wrong
    assert partial(exs, ro).tolist() == [1.0, 0.25, 0.0, 1.0]
    from ownllm.train.rl import digit_share

    assert digit_share("123", "123") == 1 and digit_share("-5", "5") == 0 and digit_share("abc", "12") == 0
    assert digit_share("1123", "123") == 0.75


def test_generation_sees_weights_updated_by_the_trainers_fused_optimizer(tiny_cfg):
    """The fused q/k/v weight cached for generation must follow every optimizer step (fused AdamW
    does not bump version counters by itself): otherwise RL would sample a stale policy."""
    from ownllm.config import TrainConfig
    from ownllm.model import GPT
    from ownllm.train.trainer import make_optimizer
    from tests.conftest import randomize_

    model = randomize_(GPT(tiny_cfg)).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 8))
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    with torch.inference_mode():
        model(x)  # builds the fused cache
    model.train()
    model(x).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    with torch.inference_mode():
        cached = model(x)
    with torch.no_grad():
        fresh = model.train()(x)  # unfused path
    torch.testing.assert_close(cached, fresh)


def test_quickstart_alignment_stage_runs_every_step_and_reports(tiny_sft, tmp_path):
    from ownllm.quickstart import _rlhf_report, align

    steps = {"reward_steps": 3, "dpo_steps": 3, "ppo_steps": 2, "grpo_steps": 2}
    res = align(tmp_path, tiny_sft, steps, None, n_eval=1, sft_accuracy=0.0, n_prompts=12, n_judge=8, log=lambda *a: None)
    for run in ("rm", "dpo", "ppo", "grpo"):
        assert (tmp_path / run / "model.safetensors").exists() and (tmp_path / run / "metrics.jsonl").exists()
    assert 0 <= res["reward"]["pair_accuracy"] <= 1 and res["dpo"]["wins"] + res["dpo"]["ties"] + res["dpo"]["losses"] == 8
    report = _rlhf_report(res)
    assert "Reward model: pairwise accuracy" in report and "| PPO |" in report and "GRPO" in report
    # the ceiling (the reference answer every time) is at least what any sampled policy got
    assert res["dpo"]["win_rate"] <= res["dpo"]["ceiling"] + 1e-9 and "policy" in res["reward"]["by_kind"]


def test_stages_started_from_a_lora_run_start_from_it_with_its_adapters(tiny_sft, tmp_path):
    """Reward, DPO, PPO and GRPO (open_run) and SFT started from a LoRA run begin from that run's
    model — its adapters folded in — not from the base weights under them, with or without adapters
    of their own (fresh ones change nothing until trained)."""
    import dataclasses

    from ownllm.checkpoint import load_model_config, load_weights, save_checkpoint
    from ownllm.config import TrainConfig
    from ownllm.model import GPT
    from ownllm.tokenizer import Tokenizer
    from ownllm.train.preference import open_run
    from ownllm.checkpoint import load_start_weights

    lora = GPT(dataclasses.replace(load_model_config(tiny_sft), lora_rank=4))
    load_weights(lora, tiny_sft, base_only=True)
    with torch.no_grad():  # trained adapters: B away from zero
        for n, p in lora.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    run = tmp_path / "sft-lora"
    Tokenizer.load(tiny_sft).save(run, model_max_length=lora.config.max_seq_len)
    save_checkpoint(run, lora)
    idx = torch.randint(3, lora.config.vocab_size, (2, 12))
    with torch.no_grad():
        want, base = lora.eval()(idx), GPT(load_model_config(tiny_sft)).eval()
        load_weights(base, tiny_sft)
        assert not torch.allclose(base(idx), want, atol=1e-3)  # the adapters matter
        for rank in (0, 4):
            model = open_run(run, tmp_path / f"dpo{rank}", TrainConfig(), TrainConfig(), resume=False, overwrite=False,
                             lora_rank=rank)[0]
            torch.testing.assert_close(model.eval()(idx), want, rtol=1e-4, atol=1e-4)
        plain = GPT(load_model_config(tiny_sft))
        load_start_weights(plain, run)
        torch.testing.assert_close(plain.eval()(idx), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_raises_a_known_reward(stage, tiny_sft, reward_run, tmp_path, monkeypatch):
    """The optimisation works end to end, not only moves weights: with the reward model's score
    replaced by a known function (the share of answer tokens with an id in the lower half of the
    vocabulary, about half of a barely trained model's), PPO and GRPO raise it — measured on 128
    fresh answers from the policy before and after, same prompts and seed (0.52 → 0.67 and 0.65
    when written; 100 steps gave +0.08 / +0.07, too near the bar)."""
    import ownllm.train.rl as rl
    from ownllm.checkpoint import load_model
    from ownllm.data.tasks import generate
    from ownllm.tokenizer import Tokenizer

    def lower_half(reward_model, ro):
        half = reward_model.config.vocab_size // 2
        return ((ro.tokens < half).float() * ro.mask).sum(1) / ro.mask.sum(1).clamp(min=1)

    monkeypatch.setattr(rl, "last_token_scores", lower_half)
    out = tmp_path / stage
    extra = (["--num-generations", "4", "--batch-size", "4"] if stage == "grpo" else  # one rollout of 16 per step
             ["--batch-size", "16", "--kl-coef", "0", "--set", "missing_end_penalty=0", "--set", "ppo_epochs=1",
              "--set", "minibatches=1"])
    assert main([stage, "--policy", str(tiny_sft), "--reward", str(reward_run), "--out", str(out), "--max-steps", "150",
                 "--lr", "1e-3", "--set", "max_new_tokens=8", "--set", "n_prompts=40", *extra, "--no-progress"]) == 0
    tok = Tokenizer.load(tiny_sft)
    prompts = rl.prompt_ids(tok, generate(128, "test", seed=5), 200)
    params = rl.SamplingParams(max_new_tokens=8, temperature=1.0, top_k=None, top_p=None, seed=3, stop_ids=tok.stop_ids)
    share = {}
    for name, run in (("before", tiny_sft), ("after", out)):
        model = load_model(run)
        share[name] = float(lower_half(model, rl.rollout(model, tok, prompts, params)).mean())
    assert share["after"] > share["before"] + 0.05, share
