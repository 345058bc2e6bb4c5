import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ownllm.config import TrainConfig
from ownllm.model import GPT
from ownllm.train.distributed import LossModule, resolve_device, to_device
from ownllm.train.objectives import lm_step
from ownllm.train.trainer import Trainer
from tests.ddp_worker import CFG, TRAIN, draw

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "ddp_worker.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _one_process_on_both_ranks_batches(out, steps: int = TRAIN["max_steps"], stop_at: int | None = None):
    """The reference: one process, each step on rank 0's next batch and rank 1's as one batch.
    With stop_at: the weights at that step, then (resumed in this process) at the last."""
    g0, g1 = torch.Generator().manual_seed(TRAIN["seed"]), torch.Generator().manual_seed(TRAIN["seed"] + 7919)

    def both(_gen):
        (x0, y0), (x1, y1) = draw(g0), draw(g1)
        return torch.cat([x0, x1]), torch.cat([y0, y1])

    torch.manual_seed(0)
    cfg = TrainConfig(**{**TRAIN, "max_steps": steps})
    Trainer(GPT(CFG), cfg, out, both, lm_step, progress=False).run(stop_at_step=stop_at)
    if stop_at is None:
        return load_file(str(out / "model.safetensors"))
    at_stop = load_file(str(out / "model.safetensors"))
    Trainer(GPT(CFG), cfg, out, both, lm_step, progress=False, resume=True).run()
    return at_stop, load_file(str(out / "model.safetensors"))


def _assert_same_weights(got_dir, want: dict) -> None:
    got = load_file(str(got_dir / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:  # (Adam magnifies summation-order noise on near-zero gradients a little)
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4)


def test_fsdp_two_processes_train_save_and_resume_like_one_process(tmp_path):
    """`--set parallel=fsdp` under torchrun (2 processes, Gloo, CPU): each holds half of every
    weight and its AdamW moments; after 3 steps the gathered weights equal one process training on
    both ranks' batches, the checkpoint holds whole tensors (moments too), and resuming it under
    torchrun for the last 2 of 5 steps lands where one process does."""
    at_3, at_5 = _one_process_on_both_ranks_batches(tmp_path / "ref", steps=5, stop_at=3)
    _torchrun(str(tmp_path / "fsdp"), "fsdp", "stop3")
    _assert_same_weights(tmp_path / "fsdp", at_3)
    state = torch.load(tmp_path / "fsdp" / "state.pt", weights_only=True)
    moments = state["optimizer"]["fsdp"]["state"]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert moments[q]["exp_avg"].shape == GPT(CFG).layers[0].self_attn.q_proj.weight.shape  # whole, not a shard
    assert len(state["data_rngs"]) == 2
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert len(losses) == 3
    from ownllm.errors import OwnLLMError

    with pytest.raises(OwnLLMError, match="saved with --set parallel=fsdp"):  # one process cannot take the shards' state
        Trainer(GPT(CFG), TrainConfig(**TRAIN), tmp_path / "fsdp", draw, lm_step, resume=True, progress=False)
    _torchrun(str(tmp_path / "fsdp"), "fsdp", "resume")
    _assert_same_weights(tmp_path / "fsdp", at_5)


def test_ddp_two_processes_equal_one_process_on_both_batches(tmp_path):
    """torchrun, 2 processes (Gloo, CPU): the weights after 3 steps (2 micro-batches each) equal one
    process training on both ranks' batches at once — every token of every rank weighs the same —
    and only rank 0 wrote metrics (the loss over both ranks) and the checkpoint."""
    _torchrun(str(tmp_path / "ddp"))
    want = _one_process_on_both_ranks_batches(tmp_path / "ref")
    _assert_same_weights(tmp_path / "ddp", want)
    # Adam is blind to a gradient's scale; its moments are not: the gradients themselves agree
    moments = [torch.load(tmp_path / run / "state.pt", weights_only=True)["optimizer"]["optimizers"][0]["state"]
               for run in ("ddp", "ref")]
    for i in moments[1]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[0][i][key], moments[1][i][key], rtol=1e-3, atol=1e-7)
    torch.manual_seed(0)  # the weights the runs started from: training moved them
    assert not torch.equal(GPT(CFG).state_dict()["layers.0.self_attn.q_proj.weight"], want["layers.0.self_attn.q_proj.weight"])
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == 3 and losses == pytest.approx([r["train_loss"] for r in ref_rows if "train_loss" in r], rel=1e-5)
    state = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    assert len(state["data_rngs"]) == 2  # both ranks' data positions, for an exact resume
    from ownllm.errors import OwnLLMError

    with pytest.raises(OwnLLMError, match="saved by 2 processes.*--nproc_per_node 2"):
        Trainer(GPT(CFG), TrainConfig(**TRAIN), tmp_path / "ddp", draw, lm_step, resume=True, progress=False)


def test_device_resolution_and_batch_moves():
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    from ownllm.errors import OwnLLMError

    with pytest.raises(OwnLLMError, match="not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(OwnLLMError, match="no CUDA"):
            resolve_device("cuda")
    b = {"x": torch.ones(2), "pair": (torch.zeros(1), 3), "name": "a"}
    moved = to_device(b, torch.device("cpu"))
    assert moved["name"] == "a" and moved["pair"][1] == 3 and torch.equal(moved["x"], b["x"])
    m = GPT(CFG)
    x, y = draw(torch.Generator().manual_seed(0))
    torch.testing.assert_close(LossModule(m, lm_step)((x, y))[0], lm_step(m, (x, y))[0])
