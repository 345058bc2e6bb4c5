"""A real GGUF file brought in by `ownllm import`, against transformers' own GGUF loading of the
same file: logits, argmax and greedy agreement, import time, peak memory and size on disk, at
float32 and at the default bfloat16.

    python bench/import_real.py [--gguf FILE]     # default: SmolLM2-135M-Instruct from PyPI

Each import runs in its own subprocess, so its peak RSS is its own (reported as the peak minus the
RSS before the file is read, i.e. after the imports of Python modules). Run alone: 2 cores.
Ends with `RESULT max_logit_diff=… argmax_agreement=… greedy_agreement=… import_s=… peak_rss_mb=…
disk_mb=…` (float32) and the same keys with a `bf16_` prefix.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line, setup_threads  # noqa: E402

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a haiku about the sea.",
           "List three prime numbers greater than 50.",
           "Explain in two sentences why the sky is blue."]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_rss_mb() -> float:
    """This process image's high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across fork and exec, so a child of a large parent would report the parent's size."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / 1e6


def child(gguf: str, out: str, dtype: str) -> None:
    from ownllm.interop.hub import import_model  # noqa: F401  (modules loaded before the baseline)
    import ownllm.interop.gguf_import
    import ownllm.model

    del ownllm   # imported for their side effect: loaded before the baseline

    before = rss_mb()
    t0 = time.perf_counter()
    r = import_model(gguf, out, dtype=dtype)
    took = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps({"import_s": took, "peak_rss_mb": peak - before, "disk_mb": r["bytes"] / 1e6}))


def compare(run: Path, hf, new_tokens: int) -> dict:
    import torch

    from ownllm.inference import Engine, SamplingParams
    from ownllm.inference.generate import load_run

    model, tok = load_run(run)
    engine = Engine(model, tok.pad_id)
    diff, agree, total, same, steps = 0.0, 0, 0, 0, 0
    for p in PROMPTS:
        ids = tok.render([{"role": "user", "content": p}], add_generation_prompt=True).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            want = hf(x).logits[0]
            got = model(x)[0, :, : want.shape[-1]]
        diff = max(diff, (got - want).abs().max().item())
        agree += (got.argmax(-1) == want.argmax(-1)).sum().item()
        total += len(ids)
        ours = engine.generate([ids], SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_ids=()))[0]
        # an explicit mask: the file's pad id is its <|im_end|>, which generate would otherwise take
        # for padding wherever the prompt holds it (after the system turn) and mask out
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
        same += sum(a == b for a, b in zip(ours, theirs))
        steps += new_tokens
        print(f"  {p[:40]!r}: {tok.decode(ours, skip_special=True)[:70]!r}")
    return {"max_logit_diff": diff, "argmax_agreement": agree / total, "greedy_agreement": same / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="a GGUF file (default: smollm2, installed from PyPI)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--child", nargs=3, metavar=("GGUF", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup_threads()
    if args.child:
        child(*args.child)
        return
    import torch
    import transformers

    from ownllm.interop.hub import resolve_source

    gguf = resolve_source(args.gguf or "smollm2")
    print(f"{gguf.name}: {gguf.stat().st_size / 1e6:.1f} MB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, prefix in (("float32", ""), ("bfloat16", "bf16_")):
            out = Path(tmp) / dtype
            r = subprocess.run([sys.executable, __file__, "--child", str(gguf), str(out), dtype],
                               capture_output=True, text=True, check=True)
            stats = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{dtype}: import {stats['import_s']:.1f} s, peak RSS +{stats['peak_rss_mb']:.0f} MB, "
                  f"{stats['disk_mb']:.0f} MB on disk")
            stats.update(compare(out, hf, args.tokens))
            print(f"{dtype}: max |logit diff| {stats['max_logit_diff']:.2e}, argmax agreement "
                  f"{stats['argmax_agreement']:.4f}, greedy agreement {stats['greedy_agreement']:.4f}")
            results.update({prefix + k: float(v) for k, v in stats.items()})
    keys = ("max_logit_diff", "argmax_agreement", "greedy_agreement", "import_s", "peak_rss_mb", "disk_mb")
    print(result_line(**{p + k: results[p + k] for p in ("", "bf16_") for k in keys}))


if __name__ == "__main__":
    main()
