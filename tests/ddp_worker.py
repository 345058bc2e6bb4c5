"""Run by tests/test_distributed.py under torchrun (2 processes, Gloo on the CPU): a few Trainer
steps of a tiny model, each rank on its own batches; rank 0 writes the run directory.
Arguments: OUT [ddp|fsdp] [stop3|resume]: with stop3 a 5-step run stops (checkpointed) after
step 3, as if killed; resume continues it to step 5."""
import sys

import torch

from ownllm.config import ModelConfig, TrainConfig
from ownllm.model import GPT
from ownllm.train.objectives import lm_step
from ownllm.train.distributed import finish
from ownllm.train.trainer import Trainer

CFG = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)
TRAIN = dict(max_steps=3, time_budget=None, compile=False, dtype="float32", lr=1e-2, warmup_steps=0,
             grad_accum=2, log_interval=1, eval_interval=0, checkpoint_interval=1e9, seed=5, threads=1)


def draw(gen: torch.Generator, batch: int = 3, T: int = 16):
    """Random tokens; a random share of targets masked, so ranks' token counts differ."""
    x = torch.randint(0, CFG.vocab_size, (batch, T), generator=gen)
    y = torch.randint(0, CFG.vocab_size, (batch, T), generator=gen)
    y[torch.rand(batch, T, generator=gen) < 0.4] = -100
    return x, y


if __name__ == "__main__":
    torch.manual_seed(0)
    try:
        parallel = sys.argv[2] if len(sys.argv) > 2 else "ddp"
        phase = sys.argv[3] if len(sys.argv) > 3 else None
        cfg = TrainConfig(**{**TRAIN, "parallel": parallel, **({"max_steps": 5} if phase else {})})
        trainer = Trainer(GPT(CFG), cfg, sys.argv[1], draw, lm_step, progress=False, resume=phase == "resume")
        if parallel == "fsdp":  # each rank holds half of every weight (and so of its gradients and moments)
            w = trainer.model.layers[0].self_attn.q_proj.weight
            assert w.to_local().shape[0] == w.shape[0] // 2, w.to_local().shape
        trainer.run(stop_at_step=3 if phase == "stop3" else None)
        finish(completed=True)
    finally:
        finish()  # leave the Gloo group before exit, as the CLI does: a live group can abort at teardown
