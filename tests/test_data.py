import json

import numpy as np
import pytest

from ownllm.data.corpora import BUNDLED, Source, load_sources
from ownllm.data.shards import Shards, pack, sequential_windows
from ownllm.errors import OwnLLMError


def test_bundled_corpora_are_real_and_sized():
    en, zh = load_sources("shakespeare,chinese-poetry")
    assert "ROMEO" in en.text and "To be, or not to be" in en.text and len(en.text) > 4_000_000
    assert "床前明月光" in zh.text or "明月" in zh.text
    assert sum(ord(c) > 0x4E00 for c in zh.text[:10000]) > 5000  # mostly CJK characters
    assert set(BUNDLED) == {"shakespeare", "chinese-poetry"}


def test_split_is_last_ten_percent_of_bytes_at_char_boundary():
    s = Source("x", "字" * 1000 + "ab" * 7)  # 3-byte characters: the cut falls mid-character
    train, val = s.split()
    assert train + val == s.text
    n = len(s.text.encode())
    assert abs(len(val.encode()) - n * 0.1) <= 3


def test_files_dirs_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 30)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("# beta\n" + "beta " * 30)
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"record {i} " * 10}) for i in range(5)))
    srcs = load_sources(f"{tmp_path / 'a.txt'},{sub},{j}")
    assert [s.name for s in srcs] == ["a", "sub", "c"]
    assert "record 4" in srcs[2].text
    whole = load_sources(str(tmp_path))[0]
    assert "alpha" in whole.text and "beta" in whole.text and "record" in whole.text


@pytest.mark.parametrize("content,match", [
    (None, "no such file"), (b"", "empty"), (b"\x00\x01\x02binary" * 20, "binary"),
    (b"\xff\xfe\xfa not utf8" * 20, "not UTF-8"), (b"short", "at least 100"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "f.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(OwnLLMError, match=match):
        load_sources(str(p))


def test_bad_jsonl_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(OwnLLMError, match=r"d.jsonl:2: .*'text'"):
        load_sources(str(p))
    p.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(OwnLLMError, match=r"d.jsonl:2: invalid JSON"):
        load_sources(str(p))


def test_unknown_name():
    with pytest.raises(OwnLLMError, match="bundled"):
        load_sources("no-such-corpus")


def test_pack_shards(small_tokenizer, tmp_path, text_file):
    srcs = load_sources(str(text_file))
    meta = pack(small_tokenizer, srcs, tmp_path)
    sh = Shards.open(tmp_path)
    assert sh.train.dtype == np.uint16
    train_text, val_text = srcs[0].split()
    assert small_tokenizer.decode(sh.val[:-1]) == val_text  # last token: the eos separator
    assert sh.val[-1] == small_tokenizer.eos_id
    assert meta["sources"][0]["val"]["bytes"] == len(val_text.encode())
    seen = np.concatenate([y[y != -100].numpy() for _, y in sequential_windows(sh.val, 64, 4)])
    assert np.array_equal(seen, np.asarray(sh.val[1:], dtype=np.int64))  # every target exactly once


def test_tasks_text_source_is_train_split_only():
    from ownllm.data.corpora import load_sources
    from ownllm.data.tasks import generate

    (src,) = load_sources("tasks")
    assert src.name == "tasks" and src.text.startswith("Q: ")
    blocks = src.text.split("\n\nQ: ")
    assert len(blocks) > 30_000
    test_prompts = {e.prompt for e in generate(300, "test")}
    assert not any(f"Q: {p}\nA: " in src.text for p in test_prompts)  # no held-out prompt leaks in


def test_task_text_words_each_run_of_one_task_in_one_answer_style():
    from collections import Counter

    from ownllm.data.corpora import ANSWER_STYLES, task_runs, task_text
    from ownllm.data.tasks import generate

    runs = task_runs(600, seed=3)
    examples = [e for _, run in runs for e in run]
    assert sorted(e.prompt for e in examples) == sorted(e.prompt for e in generate(600, "train", seed=3))
    assert all(1 <= len(run) <= 6 and len({(e.family, e.lang) for e in run}) == 1 for _, run in runs)
    assert all(style in ANSWER_STYLES[run[0].lang] for style, run in runs)
    used = Counter((run[0].lang, style) for style, run in runs)
    assert all(used[(lang, s)] > 10 for lang, styles in ANSWER_STYLES.items() for s in styles)
    text = task_text(600, seed=3)
    for style, run in runs[:50]:   # the text is the runs, each answer worded in its run's style
        for e in run:
            assert f"Q: {e.prompt}\nA: {style.format(a=e.answer)}\n\n" in text
    # without styles: every answer worded as exact match scores it
    plain = task_text(600, seed=3, styles=False)
    assert plain == "".join(f"Q: {e.prompt}\nA: {e.answer}\n\n" for _, run in task_runs(600, 3, False) for e in run)
    assert sorted(plain.split("\n\n")) != sorted(text.split("\n\n"))


def test_copy_batch_targets_only_the_predictable_second_copies():
    import torch

    from ownllm.data.shards import copy_batch

    x, y = copy_batch(3, 50, (16, 200), torch.Generator().manual_seed(0), span=8)
    assert x.shape == y.shape == (3, 50) and int(x.min()) >= 16 and int(x.max()) < 200
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        for t, target in enumerate(row_y):
            if target == -100:
                continue
            # the target is what followed the current token at its earlier (unique) occurrence
            seg = t // 16 * 16
            first = row_x[seg: seg + 8]
            assert t % 16 >= 8 and len(set(first)) == 8 and target == first[first.index(row_x[t]) + 1]
        assert sum(v != -100 for v in row_y) == 3 * 7  # 7 in each of the three whole 16-token segments


def test_the_suite_draws_one_language_when_asked():
    from ownllm.data.tasks import generate

    both = generate(60, "test", seed=2)
    en = generate(30, "test", seed=2, lang="en")
    assert {e.lang for e in both} == {"en", "zh"} and {e.lang for e in en} == {"en"} and len(en) == 30
    assert len({e.prompt for e in en}) == 30 and all(e.split == "test" for e in en)


def test_traditional_chinese_prompts_are_the_simplified_ones_converted_in_their_twins_split():
    """lang='zh-hant': the simplified examples in traditional characters (prompt, answer, the words
    of a tool trace; tool calls and results as the tools spell them), each in its twin's split;
    the judge and the refusals read them as traditional; an unknown language is refused."""
    from ownllm.data.grounded import REFUSAL, language
    from ownllm.data.judge import grade
    from ownllm.data.tasks import generate

    fams = ["arithmetic", "zh_numeral", "passage_qa", "rag_qa"]
    zh = generate(40, "test", seed=3, families=fams, lang="zh")
    hant = generate(40, "test", seed=3, families=fams, lang="zh-hant")
    assert [e.family for e in hant] == [e.family for e in zh] and {e.lang for e in hant} == {"zh-hant"}
    assert all(e.split == "test" for e in hant) and hant[0].prompt.startswith("計算：")
    pairs = {(s.prompt, h.prompt) for s, h in zip(zh, hant) if s.family == "passage_qa"}
    assert pairs and all(language(h) == "zh-hant" and language(s) == "zh" for s, h in pairs)
    num = next(h for h in hant if h.family == "zh_numeral")
    assert "寫成中文數字" in num.prompt and num.answer == next(s.answer for s in zh if s.family == "zh_numeral")
    refused = [h for h in hant if h.family == "rag_qa" and h.answer == REFUSAL["zh-hant"]]
    answered = [h for h in hant if h.family == "rag_qa" and h.answer != REFUSAL["zh-hant"]]
    assert refused and answered and all(language(h.answer) == "zh-hant" for h in answered)
    ex = answered[0]
    assert grade(ex, ex.answer) == (2, 1, 1) and grade(ex, REFUSAL["zh"])[:2] == (1, 0)   # the other script loses
    train = generate(20, "train", seed=1, families=["tool_use"], lang="zh-hant")
    search = next(t for t in train if any(c["function"]["name"] == "search" for m in t.trace for c in m.get("tool_calls", [])))
    user, call, result, answer = (m for m in search.trace if m["role"] != "system")
    assert language(user["content"]) == "zh-hant" and language(result["content"]) == "zh"
    assert language(call["tool_calls"][0]["function"]["arguments"]) == "zh"
    assert language(answer["content"]) == "zh-hant" and all(e.split == "train" for e in train)
    with pytest.raises(ValueError, match="zh-tw"):
        generate(2, "test", lang="zh-tw")
