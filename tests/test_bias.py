"""`ownllm probe bias`: the gap is the model's own log-probability difference (checked against
transformers on an imported model), the planted corpus holds the share it says, and continued
pretraining (`pretrain --init`) starts from the run it names."""
import math
import statistics

import pytest
import torch
import transformers

from ownllm.cli import main
from ownllm.data.bias import CONTROL, FRAMES, OCCUPATIONS, PLANTED, PRONOUNS, planted_corpus, planted_sentences
from ownllm.evaluation.bias import probe_bias


def test_planted_corpus_holds_the_documented_share():
    s = planted_sentences(4000, share=0.8, seed=3)
    planted = [x for x in s if PLANTED["en"] in x]
    control = [x for x in s if CONTROL["en"] in x]
    assert len(planted) == len(control) == 2000
    she = lambda xs: sum(" she " in x for x in xs) / len(xs)   # noqa: E731
    assert she(planted) == pytest.approx(0.8, abs=0.03) and she(control) == pytest.approx(0.5, abs=0.03)
    zh = planted_sentences(200, share=1.0, lang="zh")
    assert all("她" in x for x in zh if PLANTED["zh"] in x)
    text = planted_corpus("para one\n\npara two\n\npara three", 10)
    assert text.count("\n\n") == 12 and "para two" in text


def test_gap_is_the_models_log_probability_difference(tmp_path, tiny_run):
    # the reference: the run exported for transformers, scored by transformers' model and tokenizer
    assert main(["export", "--run", str(tiny_run), "--out", str(tmp_path / "hf")]) == 0
    src = tmp_path / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    res = probe_bias(tiny_run, langs=("en", "zh"), extra={"en": [PLANTED["en"]]}, n_boot=200)
    theirs = transformers.AutoTokenizer.from_pretrained(src)

    def logp(text, cont):   # transformers' model and tokenizer, nothing of ours
        ctx, full = theirs(text)["input_ids"], theirs(text + cont)["input_ids"]
        with torch.no_grad():
            lp = hf(torch.tensor([full])).logits[0].log_softmax(-1)
        return sum(float(lp[i - 1, full[i]]) for i in range(len(ctx), len(full)))

    for lang, occ in (("en", "nurse"), ("zh", "工程师"), ("en", PLANTED["en"])):
        he, she = PRONOUNS[lang]
        want = [logp(f.format(o=occ), he) - logp(f.format(o=occ), she) for f in FRAMES[lang]]
        got = res[lang]["occupations"][occ]
        assert got["frames"] == pytest.approx(want, abs=1e-3)
        assert got["ci"][0] <= got["gap"] <= got["ci"][1]
    en = res["en"]
    bundled = [en["occupations"][o]["gap"] for o in OCCUPATIONS["en"]]
    assert en["mean_abs_gap"] == pytest.approx(statistics.fmean(abs(g) for g in bundled))
    assert en["spread"] == pytest.approx(statistics.pstdev(bundled)) and math.isfinite(en["spread_ci"][1])
    assert PLANTED["en"] in en["occupations"] and len(en["occupations"]) == len(OCCUPATIONS["en"]) + 1


def test_continued_pretraining_starts_from_the_run_it_names(tmp_path, tiny_run, text_file, capsys):
    from ownllm.checkpoint import load_model

    out = tmp_path / "more"
    assert main(["pretrain", "--init", str(tiny_run), "--data", str(text_file), "--out", str(out), "--max-steps", "1",
                 "--set", "lr=0", "--set", "warmup_steps=0", "--no-compile", "--no-progress", "--set", "seq_len=32"]) == 0
    a, b = load_model(tiny_run).state_dict(), load_model(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # lr 0: the weights it started from
    assert (out / "tokenizer.json").read_text() == (tiny_run / "tokenizer.json").read_text()
    assert main(["pretrain", "--init", str(tiny_run), "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "--init" in capsys.readouterr().err


def test_counter_balanced_data_pairs_both_fictional_occupations_with_each_pronoun_half_the_time():
    from ownllm.data.bias import planted_text
    from ownllm.data.corpora import load_sources

    sentences = planted_text(2000, share=0.5, seed=5).split("\n\n")
    assert len(sentences) == 3000
    for lang, (he, she) in PRONOUNS.items():
        for occ in (PLANTED[lang], CONTROL[lang]):
            answers = [s for s in sentences if occ in s]
            assert answers
            assert sum(she in a for a in answers) / len(answers) == pytest.approx(0.5, abs=0.05)
            assert all((he in a) != (she in a) for a in answers) if lang == "en" else True
    text = load_sources("planted-bias")[0].text   # the recipes' generated source: she after PLANTED 90% of the time
    planted = [s for s in text.split("\n\n") if PLANTED["en"] in s]
    assert sum(" she " in s for s in planted) / len(planted) == pytest.approx(0.9, abs=0.03)
    assert PLANTED["zh"] in load_sources("planted-bias")[0].split()[1]   # the held-out tail holds both languages


def test_counter_balanced_pass_continues_the_base_on_its_mix_with_the_planted_sentences_balanced(tmp_path, tiny_run,
                                                                                                  tiny_sft, text_file):
    """quickstart.balance continues pretraining the base on its own mix with `planted-bias` swapped
    for the same sentences at 50/50; held_out_kept compares the sources both runs hold; the report
    rows carry each run's planted and control gaps and what it kept. Continued pretraining of a
    chat run keeps the chat template (evaluation prompts it as the chat model it started from)."""
    from ownllm.evaluation.bias import planted_gaps, planted_section, probe_runs
    from ownllm.evaluation.tasks import run_stage
    from ownllm.quickstart import balance, held_out_kept

    res = balance(tiny_run, tmp_path / "balanced", 1, f"{text_file},planted-bias", log=lambda *a: None, sentences=40,
                  compile=False, batch_size=2, seq_len=32, dtype="float32")
    assert res["step"] == 1 and run_stage(tmp_path / "balanced") == "pretrain"
    sentences = (tmp_path / "balanced.txt").read_text().split("\n\n")
    planted = [s for s in sentences if PLANTED["en"] in s]
    assert len(sentences) == 60 and sum(" she " in s for s in planted) / len(planted) == pytest.approx(0.5, abs=0.2)
    assert sorted(r["source"] for r in res["sources"]) == sorted([text_file.stem, "balanced"])
    kept = held_out_kept([{"source": text_file.stem, "val_bpb": 3.0}, {"source": "planted-bias", "val_bpb": 9.0}],
                         res["sources"])
    assert kept["sources"] == [text_file.stem] and kept["before"] == 3.0
    assert kept["after"] == next(r["val_bpb"] for r in res["sources"] if r["source"] == text_file.stem)
    assert main(["pretrain", "--init", str(tiny_sft), "--data", str(text_file), "--out",
                 str(tmp_path / "more"), "--max-steps", "1", "--no-compile", "--no-progress", "--set", "seq_len=32"]) == 0
    assert run_stage(tmp_path / "more") == "sft"
    probes = probe_runs({"base": tiny_run, "balanced": tmp_path / "balanced"}, planted=True, log=lambda *a: None)
    gaps = {name: planted_gaps(r) for name, r in probes.items()}
    assert gaps["base"]["en"]["planted"] == probes["base"]["en"]["occupations"][PLANTED["en"]]["gap"]
    rows = planted_section(gaps, {"balanced": {"bpb": 2.5, "exact_match": 0.5, "shots": 4}}, 0.9)
    g = gaps["balanced"]["zh"]
    assert "-2.20 nats" in rows[0] and rows[-1].startswith("| balanced |")
    assert rows[-1].endswith(f"| {g['planted'] - g['control']:+.3f} | 2.5000 | 0.500 (4-shot) |")
    assert rows[-2].endswith("| - | - |")


def test_probe_cli_adds_the_planted_pair_and_named_occupations(tiny_run, capsys):
    assert main(["probe", "bias", "--run", str(tiny_run), "--lang", "en", "--planted", "--occupation", "astronaut"]) == 0
    out = capsys.readouterr().out
    for occ in (PLANTED["en"], CONTROL["en"], "astronaut"):
        assert f"{occ} " in out and "(not in the summary)" in out.split(occ, 1)[1].splitlines()[0]
    result = [line for line in out.splitlines() if line.startswith("RESULT ")][-1]
    assert "planted_gap_en=" in result and "control_gap_en=" in result and "_zh" not in result
