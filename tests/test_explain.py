"""`ownllm explain`: the reply's probabilities are the model's own, the logit lens ends in the
model's output, and the attention maps equal transformers' (eager attention, output_attentions)
on an imported model that never met ownllm. The page itself is opened in Chromium in test_webchat."""
import json

import pytest
import torch
import transformers

from ownllm.cli import main
from ownllm.evaluation.explain import explain, trace, write_explanation
from tests.conftest import qwen_dir


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    src, _, _ = qwen_dir(tmp)
    assert main(["import", "--hf", str(src), "--out", str(tmp / "run")]) == 0
    return src, tmp / "run"


def test_attention_and_logits_match_transformers(imported):
    from ownllm.inference.generate import load_run

    src, run = imported
    model, tok = load_run(run)
    ids = tok.user_turn("Sort the numbers 9 2 7 4.")
    logits, hidden, attention = trace(model, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    vocab = ref.logits.shape[-1]   # (the import added ownllm's chat tokens as rows past the original vocabulary)
    torch.testing.assert_close(logits[:, :vocab], ref.logits[0].float(), atol=1e-4, rtol=1e-4)
    assert len(attention) == len(ref.attentions) == 2
    for ours, theirs in zip(attention, ref.attentions):
        torch.testing.assert_close(ours, theirs[0].float(), atol=1e-5, rtol=1e-4)
    for ours, theirs in zip(hidden[:-1], ref.hidden_states[1:-1]):   # (transformers' last one is after the final norm)
        torch.testing.assert_close(ours, theirs[0].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", ["Sort the numbers 2 4 7 9.", "把 305 写成中文数字。"])
def test_explanation_is_the_models_own_reply_and_probabilities(imported, tmp_path, prompt):
    from ownllm.inference.generate import load_run

    _, run = imported
    res = explain(run, prompt, max_new_tokens=6, top_k=3, token=-1)
    model, tok = load_run(run)
    ids = tok.user_turn(prompt)
    new = [s["id"] for s in res["steps"]]
    with torch.no_grad():
        probs = model(torch.tensor([ids + new]))[0, len(ids) - 1: -1].float().softmax(-1)
    for j, s in enumerate(res["steps"]):   # greedy: every token is the top choice, with the model's probability
        assert s["rank"] == 1 and s["alternatives"][0][0] == s["piece"]
        assert s["prob"] == pytest.approx(float(probs[j, s["id"]]), abs=1e-5)
        assert res["lens"][-1][j]["chosen_prob"] == pytest.approx(s["prob"], abs=1e-5)   # the lens ends at the output
    shown = "".join(s["token"] for s in res["steps"]).replace("…", "").replace("⏎", "\n")
    assert tok.decode(new).startswith(shown)   # whole characters only (a random model may end mid-character)
    assert len(res["lens"]) == 2 and res["attention_token"] == len(new) - 1
    assert len(res["context"]) == len(ids) + len(new) - 1
    for layer in res["attention"]:
        for head in layer:
            assert len(head) == len(res["context"]) and sum(head) == pytest.approx(1.0, abs=1e-3)
    files = write_explanation(res, tmp_path / "out")
    page = files["html"].read_text(encoding="utf-8")
    assert "<script src" not in page and "http" not in page.replace("http-equiv", "")   # self-contained
    assert page.count("data:image/png;base64,") == 2 and prompt.replace("。", "") in page
    assert json.loads(files["json"].read_text(encoding="utf-8"))["reply"] == res["reply"]
    assert files["lens"].read_bytes()[:4] == b"\x89PNG"


def test_explain_cli_and_its_errors(imported, tmp_path, capsys):
    _, run = imported
    assert main(["explain", "--run", str(run), "--prompt", "Sort 2 4", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "x")]) == 0
    assert "p=" in capsys.readouterr().out and (tmp_path / "x" / "explain.html").is_file()
    assert main(["explain", "--run", str(run), "--prompt", "Sort 2 4", "--max-new-tokens", "3", "--token", "9",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--token 9" in capsys.readouterr().err
