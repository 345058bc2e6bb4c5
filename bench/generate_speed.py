"""Decode speed with the KV cache: our Engine vs HF `transformers` `generate` on the same weights.

    python bench/generate_speed.py [--presets tiny,small] [--new-tokens 128] [--prompt-len 16]
    python bench/generate_speed.py --presets qwen2.5-0.5b,qwen3-0.6b --new-tokens 32 --reps 1

--presets also takes the shapes of small models people import (qwen2.5-0.5b, qwen3-0.6b; random weights).

Both generate greedily the same number of new tokens (HF with min_new_tokens, ours without stop
tokens) from the same prompts, fp32, in one process; the first tokens are checked to agree.
Each side gets one untimed warm-up call (ours compiles its decode step for that batch there), then the
best of --reps timed calls counts.
Ends with `RESULT ours_b1_tok_s=… hf_b1_tok_s=… speedup_b1=… ours_b8_tok_s=… hf_b8_tok_s=… speedup_b8=…`
for the first preset, then the same keys prefixed with each further preset's name.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from bench.common import result_line, setup_threads  # noqa: E402
from ownllm.config import model_config  # noqa: E402
from ownllm.inference.engine import Engine, SamplingParams  # noqa: E402
from ownllm.interop.hf import hf_config_dict, to_hf_state_dict  # noqa: E402
from ownllm.model import GPT  # noqa: E402


def best_of(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# Shapes of small instruct models people import (`ownllm import`), random weights: the real decode cost.
IMPORTED_SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                         max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, attention_bias=True),
    "qwen3-0.6b": dict(vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072,
                       max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, attn_head_dim=128,
                       qk_norm=True),
}


def bench_preset(preset: str, args, transformers) -> dict[int, tuple[float, float, bool]]:
    from ownllm.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(**IMPORTED_SHAPES[preset]) if preset in IMPORTED_SHAPES else model_config(preset)
    model = GPT(cfg).eval()
    with torch.no_grad():  # fresh models have zero output projections; give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = hf_config_dict(cfg)
    arch = d.pop("architectures")[0]
    for k in ("model_type", "torch_dtype"):
        d.pop(k)
    d["pad_token_id"] = 0
    family = arch.removesuffix("ForCausalLM")
    hf = getattr(transformers, arch)(getattr(transformers, f"{family}Config")(**d)).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    if cfg.tie_embeddings:
        hf.tie_weights()
    engine = Engine(model, pad_id=0, compile=not args.no_compile)
    n = args.new_tokens
    rows = {}
    for batch in (1, 8):
        prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_len))
        params = SamplingParams(max_new_tokens=n, temperature=0)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[:, args.prompt_len:]

        agree = all(o[:8] == h[:8].tolist() for o, h in zip(engine.generate(prompts.tolist(), params), run_hf()))
        t_ours = best_of(lambda: engine.generate(prompts.tolist(), params), args.reps)
        t_hf = best_of(run_hf, args.reps)
        rows[batch] = (batch * n / t_ours, batch * n / t_hf, agree)
    if args.int8:   # weight-only int8 (ownllm.inference.quantize), same prompts
        from ownllm.inference.quantize import quantize_int8

        quantize_int8(model)
        engine = Engine(model, pad_id=0, compile=not args.no_compile)
        for batch in (1, 8):
            prompts = torch.randint(1, cfg.vocab_size, (batch, args.prompt_len))
            t = best_of(lambda: engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=n, temperature=0)), args.reps)
            rows[batch] += (batch * n / t,)
    print(f"preset {preset} ({cfg.num_params() / 1e6:.1f}M params), prompt {args.prompt_len}, {n} new tokens, greedy, "
          f"fp32, transformers {transformers.__version__}")
    print(f"{'batch':>6}{'ownllm tok/s':>14}{'HF tok/s':>12}{'speedup':>10}{'same tokens':>13}"
          + (f"{'ownllm int8 tok/s':>19}" if args.int8 else ""))
    for b, (o, h, agree, *q) in rows.items():
        print(f"{b:>6}{o:>14.1f}{h:>12.1f}{o / h:>10.2f}{str(agree):>13}" + (f"{q[0]:>19.1f}" if q else ""))
    return rows


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,small", help="comma-separated model presets or imported shapes "
                    f"({', '.join(IMPORTED_SHAPES)}); RESULT's unprefixed keys are the first")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also time ownllm with weight-only int8 linears")
    ap.add_argument("--no-compile", action="store_true", help="eager decode (default: Engine(compile=True), "
                    "whose one-off compile happens in the untimed warm-up)")
    args = ap.parse_args()
    print(f"{setup_threads()} threads")
    results = {p: bench_preset(p, args, transformers) for p in args.presets.split(",")}
    keys = {}
    for i, (preset, rows) in enumerate(results.items()):
        prefix = "" if i == 0 else f"{preset.replace('-', '_').replace('.', '_')}_"
        keys.update({f"{prefix}ours_b1_tok_s": rows[1][0], f"{prefix}hf_b1_tok_s": rows[1][1],
                     f"{prefix}speedup_b1": rows[1][0] / rows[1][1], f"{prefix}ours_b8_tok_s": rows[8][0],
                     f"{prefix}hf_b8_tok_s": rows[8][1], f"{prefix}speedup_b8": rows[8][0] / rows[8][1]})
        if args.int8:
            keys.update({f"{prefix}int8_b1_tok_s": rows[1][3], f"{prefix}int8_b8_tok_s": rows[8][3]})
    print(result_line(**keys))


if __name__ == "__main__":
    main()
