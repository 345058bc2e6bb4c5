"""How many steps a fresh `tiny`-shaped model needs to learn associative recall, per optimizer.

    python bench/recall_probe.py [--steps 800] [--optimizers adamw,muon] [--seeds 0,1,2] [--pairs 4]

Associative recall is the skill the task suite's lookup families wait on (json, passage_qa,
rag_qa, tool results: find a key in the prompt, copy the value beside it). Each example is
`k1 v1 … kn vn ? kq` → `vq` over a small alphabet (26 keys, 10 values), loss on the answer only,
batch 64, constant lr 2e-3, the optimizer split the Trainer uses (`make_optimizer`). Chance is
about 1/n (the values present). Accuracy is taken on each batch before the step that trains on
it (every batch is freshly drawn, so none was seen before), averaged per 100 steps and printed side
by side, then
`RESULT <optimizer>_seed<k>_steps_to_0.6=…` (or `none` within --steps) for each.
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
from ownllm.model import GPT  # noqa: E402
from ownllm.train.trainer import make_optimizer  # noqa: E402

KEYS, VALUES = 26, 10


def batch(gen: torch.Generator, n_pairs: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.stack([torch.randperm(KEYS, generator=gen)[:n_pairs] for _ in range(size)])
    vals = torch.randint(KEYS, KEYS + VALUES, (size, n_pairs), generator=gen)
    pick = torch.randint(0, n_pairs, (size,), generator=gen)
    rows = torch.arange(size)
    x = torch.cat([torch.stack([keys, vals], 2).reshape(size, 2 * n_pairs),
                   torch.full((size, 1), KEYS + VALUES), keys[rows, pick][:, None]], 1)
    return x, vals[rows, pick]


def train(optimizer: str, steps: int, n_pairs: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**MODEL_PRESETS["tiny"], "vocab_size": 64, "max_seq_len": 64})
    model = GPT(cfg)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=2e-3, weight_decay=0.0))
    gen = torch.Generator().manual_seed(seed)
    accs, hits = [], 0
    for step in range(1, steps + 1):
        x, y = batch(gen, n_pairs)
        logits = model(x)[:, -1]
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits += int((logits.argmax(-1) == y).sum())
        if step % 100 == 0:
            accs.append(hits / (100 * len(y)))
            hits = 0
    return accs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--optimizers", default="adamw,muon")
    ap.add_argument("--seeds", default="0", help="comma-separated: the moment it forms varies with the seed")
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    setup_threads()
    results = {}
    for name in args.optimizers.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            t0 = time.perf_counter()
            results[f"{name}_seed{seed}"] = train(name, args.steps, args.pairs, seed)
            print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    print("step   " + "".join(f"{n:>13}" for n in results))
    for i in range(args.steps // 100):
        print(f"{100 * (i + 1):<7}" + "".join(f"{results[n][i]:>13.2f}" for n in results))
    first = {f"{n}_steps_to_0.6": next((100 * (i + 1) for i, a in enumerate(r) if a >= 0.6), "none")
             for n, r in results.items()}
    print(result_line(**first))


if __name__ == "__main__":
    main()
