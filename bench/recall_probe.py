"""How many steps a fresh `tiny`-shaped model needs to learn content-addressed copying, per
optimizer and architecture.

    python bench/recall_probe.py [--task recall|copy] [--arch plain,smear+qk] [--optimizers adamw,muon]
                                 [--steps 800] [--seeds 0] [--pairs 4]

Finding a value in the prompt by its key is what the task suite's lookup families wait on
(passage_qa, rag_qa, poem_next, tool results). Two probes of it, printed side by side per 100
steps (accuracy on each freshly drawn batch before the step that trains on it), then
`RESULT <arch>_<optimizer>_seed<k>_steps_to_0.6=…` (or `none` within --steps):
- `recall`: `k1 v1 … kn vn ? kq` → `vq` over 26 keys and 10 values, loss on the answer, batch 64;
- `copy`: 32 distinct random ids from a 4,096-token vocabulary, then the same 32 again (what
  `pretrain --set copy_steps=N` trains on), loss on the second copy after its first token, batch 32.
Architectures: `plain` (Llama), `smear` (ModelConfig.smear: the previous token's embedding mixed
in), `qk` (q/k RMSNorm, as Qwen3), `smear+qk`. Constant lr 2e-3, the Trainer's optimizer split.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import result_line, setup_threads  # noqa: E402
from ownllm.config import MODEL_PRESETS, ModelConfig, TrainConfig  # noqa: E402
from ownllm.data.shards import copy_batch  # noqa: E402
from ownllm.model import GPT  # noqa: E402
from ownllm.train.trainer import make_optimizer  # noqa: E402

KEYS, VALUES = 26, 10
COPY_VOCAB, COPY_SPAN = 4096, 32


def recall_batch(gen: torch.Generator, n_pairs: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.stack([torch.randperm(KEYS, generator=gen)[:n_pairs] for _ in range(size)])
    vals = torch.randint(KEYS, KEYS + VALUES, (size, n_pairs), generator=gen)
    pick = torch.randint(0, n_pairs, (size,), generator=gen)
    rows = torch.arange(size)
    x = torch.cat([torch.stack([keys, vals], 2).reshape(size, 2 * n_pairs),
                   torch.full((size, 1), KEYS + VALUES), keys[rows, pick][:, None]], 1)
    y = torch.full_like(x, -100)
    y[:, -1] = vals[rows, pick]
    return x, y


def train(task: str, arch: str, optimizer: str, steps: int, n_pairs: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    vocab = 64 if task == "recall" else COPY_VOCAB
    cfg = ModelConfig(**{**MODEL_PRESETS["tiny"], "vocab_size": vocab, "max_seq_len": 2 * COPY_SPAN + 1,
                         "smear": "smear" in arch, "qk_norm": "qk" in arch})
    model = GPT(cfg)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=2e-3, weight_decay=0.0))
    gen = torch.Generator().manual_seed(seed)
    accs, hits, total = [], 0, 0
    for step in range(1, steps + 1):
        if task == "recall":
            x, y = recall_batch(gen, n_pairs)
        else:
            x, y = copy_batch(32, 2 * COPY_SPAN - 1, (16, COPY_VOCAB), gen, span=COPY_SPAN)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        keep = y != -100
        hits += int((logits.argmax(-1)[keep] == y[keep]).sum())
        total += int(keep.sum())
        if step % 100 == 0:
            accs.append(hits / total)
            hits = total = 0
    return accs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("recall", "copy"), default="recall")
    ap.add_argument("--arch", default="plain,smear+qk", help="comma-separated: plain, smear, qk, smear+qk")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--optimizers", default="adamw,muon")
    ap.add_argument("--seeds", default="0", help="comma-separated: the moment it forms varies with the seed")
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    setup_threads()
    results = {}
    for arch in args.arch.split(","):
        for name in args.optimizers.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                t0 = time.perf_counter()
                results[f"{arch}_{name}_seed{seed}"] = train(args.task, arch, name, args.steps, args.pairs, seed)
                print(f"{arch} {name} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    width = max(len(n) for n in results) + 2
    print("step   " + "".join(f"{n:>{width}}" for n in results))
    for i in range(args.steps // 100):
        print(f"{100 * (i + 1):<7}" + "".join(f"{results[n][i]:>{width}.2f}" for n in results))
    first = {f"{n.replace('+', '_')}_steps_to_0.6": next((100 * (i + 1) for i, a in enumerate(r) if a >= 0.6), "none")
             for n, r in results.items()}
    print(result_line(**first))


if __name__ == "__main__":
    main()
