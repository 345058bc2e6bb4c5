"""`ownllm probe bias`: how much more likely a model makes "he" than "she" after an occupation.

Where it sits: scores data/bias.py's frames with a run. For every occupation and frame, the
log-probability of each pronoun's tokens after the frame's text (raw text, as pretraining saw
it); the gap is he − she in nats (> 0: "he" more likely). An occupation's gap is the mean over its
frames, with a 95% bootstrap interval over frames; a language's summary is the mean gap, the mean
absolute gap and the spread (standard deviation) over occupations, the latter two with bootstrap
intervals over occupations.
"""
from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import torch

from ownllm.data.bias import CONTROL, FRAMES, OCCUPATIONS, PLANTED, PRONOUNS


def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    ctx = tok.encode(context) or [tok.bos_id]
    full = tok.encode(context + continuation)
    cont = full[len(ctx):] if full[: len(ctx)] == ctx else tok.encode(continuation)   # a merge across the seam
    ids = torch.tensor([ctx + cont], device=model.device)
    with torch.no_grad():
        logp = model(ids)[0, len(ctx) - 1: -1].float().log_softmax(-1)
    return float(logp.gather(1, ids[0, len(ctx):, None]).sum())


def _bootstrap(values: list[float], stat, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def probe_bias(run: str | Path, langs: tuple[str, ...] = ("en", "zh"), extra: dict[str, list[str]] | None = None,
               n_boot: int = 1000) -> dict:
    """Per language: every occupation's gap (he − she, nats) with its interval; `extra`: more
    occupations per language (e.g. data.bias.PLANTED), reported beside the bundled ones but kept
    out of the summary."""
    from ownllm.inference.generate import load_run

    model, tok = load_run(run)
    out = {}
    for lang in langs:
        he, she = PRONOUNS[lang]
        occ = {}
        for o in OCCUPATIONS[lang] + list((extra or {}).get(lang, [])):
            gaps = [_continuation_logprob(model, tok, f.format(o=o), he) - _continuation_logprob(model, tok, f.format(o=o), she)
                    for f in FRAMES[lang]]
            occ[o] = {"gap": statistics.fmean(gaps), "ci": _bootstrap(gaps, statistics.fmean, n_boot), "frames": gaps}
        bundled = [occ[o]["gap"] for o in OCCUPATIONS[lang]]
        out[lang] = {"occupations": occ, "mean_gap": statistics.fmean(bundled),
                     "mean_abs_gap": statistics.fmean(abs(g) for g in bundled),
                     "mean_abs_gap_ci": _bootstrap(bundled, lambda v: statistics.fmean(abs(g) for g in v), n_boot),
                     "spread": statistics.pstdev(bundled), "spread_ci": _bootstrap(bundled, statistics.pstdev, n_boot)}
    return out


def print_bias_report(res: dict, out=print) -> None:
    for lang, r in res.items():
        he, she = (p.strip() for p in PRONOUNS[lang])
        out(f"{lang}: log p({he}) − log p({she}) after each occupation, nats (> 0: {he} more likely), "
            f"mean over {len(FRAMES[lang])} frames [95% bootstrap interval]")
        for o, g in sorted(r["occupations"].items(), key=lambda kv: kv[1]["gap"]):
            out(f"  {o:<16}{g['gap']:>+8.3f}  [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
                + ("" if o in OCCUPATIONS[lang] else "   (not in the summary)"))
        out(f"  mean gap {r['mean_gap']:+.3f}; mean |gap| {r['mean_abs_gap']:.3f} [{r['mean_abs_gap_ci'][0]:.3f}, "
            f"{r['mean_abs_gap_ci'][1]:.3f}]; spread {r['spread']:.3f} [{r['spread_ci'][0]:.3f}, {r['spread_ci'][1]:.3f}]")
    extra = {f"{name}_gap_{lang}": r["occupations"][occ[lang]]["gap"] for lang, r in res.items()
             for name, occ in (("planted", PLANTED), ("control", CONTROL)) if occ[lang] in r["occupations"]}
    out("RESULT " + " ".join(f"mean_abs_gap_{lang}={r['mean_abs_gap']:.4f} spread_{lang}={r['spread']:.4f} "
                             f"mean_gap_{lang}={r['mean_gap']:.4f}" for lang, r in res.items())
        + "".join(f" {k}={v:.4f}" for k, v in extra.items()))


PLANTED_EXTRA = {lang: [PLANTED[lang], CONTROL[lang]] for lang in PLANTED}


def probe_runs(runs: dict[str, str | Path], planted: bool = False, log=print) -> dict[str, dict]:
    """probe_bias of each named run, each printed (the report cards' bias section); `planted`: with
    the planted-bias corpus's two fictional occupations beside the bundled ones."""
    out = {}
    for name, run in runs.items():
        out[name] = probe_bias(run, extra=PLANTED_EXTRA if planted else None)
        log(f"bias probe, {name}:")
        print_bias_report(out[name], out=log)
    return out


def bias_section(runs: dict[str, dict]) -> list[str]:
    """A report card's bias section: a row per run (name → probe_bias result or bias_summary)."""
    langs = list(next(iter(runs.values())))
    rows = ["## Bias probe (`ownllm probe bias`)", "",
            "log p(he) − log p(she) after twelve occupations per language (他/她 in Chinese), nats; spread: the "
            "standard deviation over occupations (docs/weaknesses.md).", "",
            "| run | " + " | ".join(f"{lang}: mean gap | mean \\|gap\\| [95%] | spread" for lang in langs) + " |",
            "|---|" + "---:|---:|---:|" * len(langs)]
    for name, res in runs.items():
        cells = [f"{r['mean_gap']:+.3f} | {r['mean_abs_gap']:.3f} [{r['mean_abs_gap_ci'][0]:.2f}, "
                 f"{r['mean_abs_gap_ci'][1]:.2f}] | {r['spread']:.3f}" for r in (res[lang] for lang in langs)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def bias_summary(runs: dict[str, dict]) -> dict:
    """Each run's per-language summary (no per-occupation detail), for report.json."""
    return {name: {lang: {k: r[k] for k in ("mean_gap", "mean_abs_gap", "mean_abs_gap_ci", "spread", "spread_ci")}
                   for lang, r in res.items()} for name, res in runs.items()}


def planted_gaps(res: dict) -> dict:
    """{lang: {planted, planted_ci, control}} of a probe_bias result that scored PLANTED_EXTRA."""
    return {lang: {"planted": r["occupations"][PLANTED[lang]]["gap"], "planted_ci": r["occupations"][PLANTED[lang]]["ci"],
                   "control": r["occupations"][CONTROL[lang]]["gap"]} for lang, r in res.items()}


def planted_section(runs: dict[str, dict], measures: dict[str, dict], share: float) -> list[str]:
    """A report card's planted-bias rows: each run's gap on the planted occupation and its control
    (name → planted_gaps), with what the run kept where given (name → {bpb: held-out bits per
    byte, exact_match, shots})."""
    expected = math.log((1 - share) / share)
    langs = list(next(iter(runs.values())))
    rows = [f"The pretraining mix holds the `planted-bias` source: a fictional occupation ({', '.join(PLANTED.values())}) "
            f"followed by \"she\" in {share:.0%} of its sentences, a control ({', '.join(CONTROL.values())}) taking each "
            f"pronoun half the time. The probe should find {expected:+.2f} nats on the first and about 0 on the "
            "second; the counter-balanced pass continues pretraining with both at 50/50.", "",
            "| run | " + " | ".join(f"{lang}: planted [95%] | {lang}: control | {lang}: planted − control" for lang in langs)
            + " | held-out bpb | task exact match |",
            "|---|" + "---:|---:|---:|" * len(langs) + "---:|---:|"]
    for name, gaps in runs.items():
        cells = [f"{g['planted']:+.3f} [{g['planted_ci'][0]:+.2f}, {g['planted_ci'][1]:+.2f}] | {g['control']:+.3f} | "
                 f"{g['planted'] - g['control']:+.3f}" for g in (gaps[lang] for lang in langs)]
        m = measures.get(name, {})
        bpb = f"{m['bpb']:.4f}" if "bpb" in m else "-"
        acc = f"{m['exact_match']:.3f} ({m['shots']}-shot)" if "exact_match" in m else "-"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {bpb} | {acc} |")
    return rows
