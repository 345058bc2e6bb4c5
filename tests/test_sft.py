import json

import pytest
import torch

from ownllm.config import ModelConfig, TrainConfig
from ownllm.data.chat import collate_packed, collate_padded, encode_conversations
from ownllm.train.objectives import masked_lm_step
from ownllm.data.formats import read_chat_jsonl
from ownllm.data.tasks import FAMILIES, generate, prompt_bucket, zh_numeral
from ownllm.errors import OwnLLMError
from ownllm.lora import freeze_base, merged_state_dict
from ownllm.model import GPT
from ownllm.train.trainer import Trainer
from tests.conftest import randomize_

CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse: a b c"},
     {"role": "assistant", "content": "c b a"}],
    [{"role": "user", "content": "床前明月光的下一句？"}, {"role": "assistant", "content": "疑是地上霜。"},
     {"role": "user", "content": "再来一句"}, {"role": "assistant", "content": "举头望明月。"}],
]


@pytest.mark.parametrize("fmt,rec,expected", [
    ("messages", {"messages": CONVS[0]}, CONVS[0]),
    ("sharegpt", {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]}, CONVS[0]),
    ("alpaca", {"instruction": "What is 2 + 2?", "input": "", "output": "4"}, CONVS[0]),
    ("completion", {"prompt": "What is 2 + 2?", "completion": "4"}, CONVS[0]),
])
def test_formats_detected_and_converted(tmp_path, fmt, rec, expected):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    assert read_chat_jsonl(p).conversations == [expected]
    assert read_chat_jsonl(p, fmt=fmt).conversations == [expected]


def test_bad_record_names_file_line_field_and_skip(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"messages": CONVS[0]})
    bad = json.dumps({"messages": [{"role": "user", "content": 5}]})
    p.write_text("\n".join([good, bad, "{oops", good]) + "\n")
    with pytest.raises(OwnLLMError, match=r"d.jsonl:2: field 'messages\[0\].content' must be a string"):
        read_chat_jsonl(p)
    data = read_chat_jsonl(p, skip_bad=True)
    assert len(data.conversations) == 2 and data.skipped == 2 and ":3: invalid JSON" in data.errors[1]


def test_loss_targets_only_assistant_tokens(small_tokenizer):
    tok = small_tokenizer
    ex = encode_conversations(tok, CONVS, max_len=200)
    b = collate_padded(ex, [0, 2], tok.pad_id)
    y0 = b["y"][0][b["y"][0] != -100].tolist()
    assert y0 == tok.encode("4") + [tok.end_id]
    y2 = b["y"][1][b["y"][1] != -100].tolist()
    assert y2 == tok.encode("疑是地上霜。") + [tok.end_id] + tok.encode("举头望明月。") + [tok.end_id]
    assert (b["x"][0][len(ex.ids[0]) - 1:] == tok.pad_id).all()


def test_prompt_loss_weight_targets_prompt_tokens_at_that_weight(small_tokenizer, tiny_cfg):
    tok = small_tokenizer
    ex = encode_conversations(tok, CONVS, max_len=200)
    plain = collate_packed(ex, [0, 1], seq_len=120, pad_id=tok.pad_id)
    weighted = collate_packed(ex, [0, 1], seq_len=120, pad_id=tok.pad_id, prompt_weight=0.25)
    assert "w" not in plain
    real = weighted["positions"].new_zeros(weighted["x"].shape, dtype=torch.bool)
    real[0, : len(ex.ids[0]) - 1 + len(ex.ids[1]) - 1] = True  # both examples, then padding
    answer = plain["y"] != -100
    w = weighted["w"]
    assert (w[answer] == 1).all() and (w[real & ~answer] == 0.25).all() and (w[~real] == 0).all()
    assert (weighted["y"][real] != -100).all() and (weighted["y"][answer] == plain["y"][answer]).all()
    # the weighted loss is the weighted mean of per-token NLLs (checked against a direct loop)
    torch.manual_seed(0)
    model = randomize_(GPT(ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "max_seq_len": 120}))).eval()
    with torch.no_grad():
        s, n = masked_lm_step(model, weighted)
        logp = model(weighted["x"], positions=weighted["positions"], mask=weighted["mask"]).float().log_softmax(-1)
    want = sum(-float(logp[0, t, weighted["y"][0, t]]) * float(w[0, t]) for t in range(120) if w[0, t] > 0)
    assert float(n) == pytest.approx(float(answer.sum()) + 0.25 * float((real & ~answer).sum()))
    assert float(s) == pytest.approx(want, rel=1e-4)
    padded = collate_padded(ex, [0, 1], tok.pad_id, prompt_weight=0.25)
    assert float(padded["w"].sum()) == pytest.approx(float(w.sum()))


def test_truncation_is_counted(small_tokenizer):
    long = [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]
    ex = encode_conversations(small_tokenizer, [long, CONVS[0]], max_len=64)
    assert ex.truncated == 1 and ex.dropped == 1 and len(ex) == 1


@pytest.mark.parametrize("smear", [False, True])
def test_packing_does_not_leak_across_examples(small_tokenizer, tiny_cfg, smear):
    """Neither attention nor the smear (the previous token's embedding) crosses examples in a row."""
    tok = small_tokenizer
    torch.manual_seed(0)
    model = randomize_(GPT(ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "max_seq_len": 160,
                                         "smear": smear}))).eval()
    if smear:
        with torch.no_grad():
            model.smear_gate.add_(0.5)
    ex = encode_conversations(tok, CONVS, max_len=60)
    packed = collate_packed(ex, [0, 1, 2], seq_len=160, pad_id=tok.pad_id)
    assert packed["x"].shape[0] == 1  # all three fit one row
    s_packed, n_packed = masked_lm_step(model, packed)
    s_sep = sum(masked_lm_step(model, collate_padded(ex, [i], tok.pad_id))[0] for i in range(3))
    n_sep = sum(masked_lm_step(model, collate_padded(ex, [i], tok.pad_id))[1] for i in range(3))
    assert int(n_packed) == int(n_sep)
    torch.testing.assert_close(s_packed, s_sep, rtol=1e-4, atol=1e-4)


def test_batch8_accum1_equals_batch1_accum8(small_tokenizer, tiny_cfg, tmp_path):
    tok = small_tokenizer
    convs = [e.messages() for e in generate(8, "train", seed=3, families=["arithmetic", "reverse", "sort", "json"])]
    ex = encode_conversations(tok, convs, max_len=120)
    assert len(ex) == 8 and len({len(i) for i in ex.ids}) > 3  # variable lengths: padding matters
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "max_seq_len": 128})
    grads, losses = [], []
    for bs, accum in ((8, 1), (1, 8)):
        torch.manual_seed(0)
        model = randomize_(GPT(cfg))
        order = iter(range(8))

        def next_batch(gen, bs=bs):
            return collate_padded(ex, [next(order) for _ in range(bs)], tok.pad_id)

        tc = TrainConfig(batch_size=bs, grad_accum=accum, max_steps=1, time_budget=None, dtype="float32",
                         grad_clip=0.0, lr=0.0, warmup_steps=0, threads=2, compile=False)
        tr = Trainer(model, tc, tmp_path / f"r{bs}", next_batch, masked_lm_step, progress=False)
        captured = {}
        orig = tr.optimizer.step
        tr.optimizer.step = lambda: (captured.update({n: p.grad.clone() for n, p in model.named_parameters()}), orig())
        losses.append(float(tr.train_step()))
        grads.append(captured)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora_layers", [0, 1])
def test_lora_trains_adapters_only_and_merges(small_tokenizer, tiny_cfg, tmp_path, lora_layers):
    tok = small_tokenizer
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "lora_rank": 4, "lora_alpha": 8,
                         "lora_layers": lora_layers})
    torch.manual_seed(0)
    model = GPT(cfg)
    adapted = {k.split(".")[1] for k in model.state_dict() if "lora" in k}
    assert adapted == ({"0", "1"} if not lora_layers else {"1"})   # lora_layers=1: the top block only
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    x = torch.randint(0, tok.vocab_size, (2, 10))
    plain = GPT(ModelConfig(**{**cfg.__dict__, "lora_rank": 0}))
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(x), model(x))  # B = 0: a fresh adapter changes nothing
    trainable, total = freeze_base(model)
    assert 0 < trainable < total * 0.5
    ex = encode_conversations(tok, CONVS, max_len=60)
    tc = TrainConfig(batch_size=3, max_steps=5, time_budget=None, dtype="float32", lr=1e-2, warmup_steps=0, threads=2,
                     compile=False)
    Trainer(model, tc, tmp_path / "lora", lambda g: collate_padded(ex, [0, 1, 2], tok.pad_id), masked_lm_step,
            progress=False).run()
    after = model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    assert all(not torch.equal(after[k], v) for k, v in lora_before.items() if k.endswith("lora_B"))
    plain.load_state_dict(merged_state_dict(model))
    model.eval(), plain.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_task_suite_split_never_overlaps_and_is_deterministic():
    train = generate(4000, "train", seed=1)
    test = generate(400, "test", seed=0)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in test})
    assert all(prompt_bucket(e.prompt) == 0 for e in test) and all(prompt_bucket(e.prompt) != 0 for e in train)
    assert generate(50, "train", seed=1) == train[:50]
    assert {e.family for e in test} == set(FAMILIES) and {e.lang for e in test} == {"en", "zh"}
    assert len({e.prompt for e in test}) == 400


def test_task_weights_set_each_familys_share():
    from collections import Counter

    from ownllm.data.tasks import parse_weights

    w = parse_weights("arithmetic=3, sort=0")
    assert w == {"arithmetic": 3, "sort": 0}
    counts = Counter(e.family for e in generate(400, "train", seed=1, families=list(FAMILIES), weights=w))
    assert counts["arithmetic"] == 3 * counts["reverse"] and "sort" not in counts
    for bad in ("arithmetic", "arithmetic=x", "nope=2"):
        with pytest.raises(ValueError, match="FAMILY=INTEGER"):
            parse_weights(bad)


def test_task_answers_are_right():
    assert [zh_numeral(n) for n in (1, 10, 15, 20, 101, 110, 999, 300, 305)] == [
        "一", "十", "十五", "二十", "一百零一", "一百一十", "九百九十九", "三百", "三百零五"]
    for e in generate(200, "train", seed=2):
        if e.family == "arithmetic":
            import re

            a, op, b = re.search(r"(\d+) ([+-]) (\d+)", e.prompt).groups()
            assert int(e.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        if e.family == "sort":
            assert e.answer.split() == sorted(e.prompt.split("：")[-1].split(": ")[-1].split())
        if e.family == "json":
            json.loads(e.answer)
        if e.family in ("passage_qa", "poem_next"):
            assert e.answer in e.prompt  # answerable from the prompt alone


HOSTILE_RECORDS = [
    ({"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}, "role"),
    ({"messages": [{"role": {"r": 1}, "content": "a"}]}, "role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]}, "content"),
    ('{"messages": [{"role": "user", "content": "a"}], "n": ' + "9" * 5000 + "}", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize("record,field", HOSTILE_RECORDS)
def test_sft_reader_errors_are_one_line_with_file_and_line_and_skippable(tmp_path, tiny_run, capsys, record, field):
    from ownllm.cli import main

    good = json.dumps({"messages": CONVS[0]})
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join([good, record if isinstance(record, str) else json.dumps(record), good]) + "\n")
    capsys.readouterr()
    argv = ["sft", "--base", str(tiny_run), "--data", str(p), "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat.jsonl:2: " in err and field in err and "Traceback" not in err, err
    data = read_chat_jsonl(p, skip_bad=True)
    assert len(data.conversations) == 2 and data.skipped == 1


def test_jsonl_keeps_line_separators_inside_strings_and_reads_json_arrays_and_bom(tmp_path):
    """ShareGPT text often holds U+2028, U+0085 or a form feed inside a string; sets are shared as
    one JSON array as often as JSONL; Windows editors write a BOM."""
    from ownllm.data.preferences import Pair, read_preferences, write_preferences

    text = "line\u2028separator\x85next\x0cpage\u2029end"
    recs = [{"conversations": [{"from": "human", "value": f"{text} {i}"}, {"from": "gpt", "value": "ok"}]} for i in range(3)]
    p = tmp_path / "share.jsonl"
    p.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    convs = read_chat_jsonl(p).conversations
    assert [c[0]["content"] for c in convs] == [f"{text} {i}" for i in range(3)]
    arr = tmp_path / "share.json"
    arr.write_text(json.dumps(recs, ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_chat_jsonl(arr).conversations == convs
    arr.write_text("[\n" + json.dumps(recs[0]) + ",\n" + json.dumps({"instruction": 5, "output": "x"}) + "\n]")
    with pytest.raises(OwnLLMError, match=r"share.json:3: .*cannot tell the format|share.json:3: field"):
        read_chat_jsonl(arr, fmt=None)
    arr.write_text("[\n" + json.dumps(recs[0]) + "\n" + json.dumps(recs[0]) + "]")
    with pytest.raises(OwnLLMError, match=r"share.json:3: expected ','"):
        read_chat_jsonl(arr)
    pairs = [Pair((("user", text),), f"a{text}", "b")]   # what the project writes, it reads back
    write_preferences(pairs, tmp_path / "p.jsonl")
    assert read_preferences(tmp_path / "p.jsonl")[0].chosen == f"a{text}"


def test_mixed_ranking_is_a_file_line_error(tmp_path):
    from ownllm.data.preferences import read_preferences

    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "ranking": [0, "1"]}) + "\n")
    with pytest.raises(OwnLLMError, match=r"r.jsonl:1: field 'ranking'"):
        read_preferences(p)
