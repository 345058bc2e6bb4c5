"""Continuous batching gives every request exactly the tokens it would get alone."""
import threading

import pytest
import torch

from ownllm.config import ModelConfig
from ownllm.inference.batcher import ContinuousBatcher, Request
from ownllm.inference.engine import Engine, SamplingParams
from ownllm.model import GPT
from tests.conftest import randomize_


def _collect(batcher, ids, params, started=None):
    out, done = [], threading.Event()
    reason = []

    def emit(tok, finish):
        if finish is None:
            out.append(tok)
        else:
            reason.append(finish)
            done.set()
    req = batcher.submit(Request(ids, params, emit))
    return req, out, reason, done


@pytest.mark.parametrize("smear", [False, True])
def test_joining_requests_match_solo_generation(tiny_cfg, smear):
    """(With smear each row also carries its last token's embedding into its next step.)"""
    tiny_cfg = ModelConfig(**{**tiny_cfg.__dict__, "smear": smear})
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_cfg), 0.3).eval()
    if smear:
        with torch.no_grad():
            model.smear_gate.add_(0.5)
    engine = Engine(model, pad_id=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, tiny_cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3, 12)]
    lengths = [20, 8, 30, 25, 40, 15]
    solo = [engine.generate([p], SamplingParams(max_new_tokens=n, temperature=0))[0] for p, n in zip(prompts, lengths)]
    batcher = ContinuousBatcher(model, pad_id=0, slots=3)  # fewer slots than requests: some wait, rows are reused
    runs = []
    for p, n in zip(prompts, lengths):
        runs.append(_collect(batcher, p, SamplingParams(max_new_tokens=n, temperature=0)))
    for (_, out, reason, done), ref, n in zip(runs, solo, lengths):
        assert done.wait(30)
        assert out == ref[:n]
        assert reason == ["length"]
    assert batcher.max_active == 3
    # contexts fill up (max_seq_len 64): compaction kicks in and results stay identical
    long_prompts = [torch.randint(3, tiny_cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 10, 25)]
    solo = [engine.generate([p], SamplingParams(max_new_tokens=60, temperature=0))[0] for p in long_prompts]
    runs = [_collect(batcher, p, SamplingParams(max_new_tokens=60, temperature=0)) for p in long_prompts]
    for (_, out, reason, done), ref, p in zip(runs, solo, long_prompts):
        assert done.wait(30)
        assert out == ref and reason == ["length"]
        assert len(out) == min(60, tiny_cfg.max_seq_len - len(p))  # stopped by the context, not the budget
    batcher.close()


def test_stop_tokens_cancel_and_seeded_sampling(tiny_cfg):
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_cfg), 0.3).eval()
    batcher = ContinuousBatcher(model, pad_id=0, slots=2)
    ref = Engine(model, 0).generate([[5, 6, 7]], SamplingParams(max_new_tokens=12, temperature=0))[0]
    stop = ref[4]
    _, out, reason, done = _collect(batcher, [5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0, stop_ids=(stop,)))
    assert done.wait(30) and reason == ["stop"] and stop not in out and out == ref[: ref.index(stop)]
    a = _collect(batcher, [9, 9], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3))
    b = _collect(batcher, [9, 9], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3))
    assert a[3].wait(30) and b[3].wait(30) and a[1] == b[1]
    req, out, reason, done = _collect(batcher, [1, 2], SamplingParams(max_new_tokens=10_000, temperature=0))
    req.cancel()
    for _ in range(200):
        if batcher.active == 0:
            break
        threading.Event().wait(0.01)
    assert batcher.active == 0  # the slot is free again
    batcher.close()


def test_compiled_steps_match_eager_across_cache_buckets(tiny_cfg):
    """The compiled decode step (the server's default): each request gets the tokens it would get
    alone, eagerly, while the shared write column outgrows its first 256-column bucket (the rows
    are right-aligned first) and rows of different ages share steps."""
    torch.manual_seed(0)
    model = randomize_(GPT(ModelConfig(**{**tiny_cfg.__dict__, "max_seq_len": 1024})), 0.3).eval()
    engine = Engine(model, pad_id=0, compile=False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, tiny_cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 20, 4, 11, 9, 5)]
    params = SamplingParams(max_new_tokens=100, temperature=0)
    want = [engine.generate([p], params)[0] for p in prompts]
    batcher = ContinuousBatcher(model, pad_id=0, slots=2, compile=True)
    try:
        got = []
        for pair in (prompts[:2], prompts[2:4], prompts[4:]):   # three waves: the column passes 256
            runs = [_collect(batcher, p, params) for p in pair]
            for _, out, reason, done in runs:
                assert done.wait(300) and reason == ["length"]
                got.append(out)
        assert batcher.steps > 256 and batcher.cache.length < batcher.steps   # the rows were right-aligned
        assert got == want
    finally:
        batcher.close()


def test_warm_up_builds_every_width_so_requests_compile_nothing(tiny_cfg):
    """`serve --warm-up`: the compiled step's graphs for widths 1, 2, 4 are built before any
    request; requests at those widths then compile nothing new and get their eager tokens."""
    from torch._dynamo.utils import counters

    torch.manual_seed(2)
    model = randomize_(GPT(tiny_cfg), 0.3).eval()
    params = SamplingParams(max_new_tokens=6, temperature=0)
    prompts = [[5, 9, 13, 2], [7, 7, 21], [3, 4]]
    want = [Engine(model, pad_id=0, compile=False).generate([p], params)[0] for p in prompts]
    assert ContinuousBatcher(model, pad_id=0, slots=4, compile=False).warm_up() == []   # eager: nothing to build
    batcher = ContinuousBatcher(model, pad_id=0, slots=4, compile=True)
    try:
        lines: list[str] = []
        assert batcher.warm_up(log=lines.append) == [1, 2, 4] and len(lines) == 3 and "4 row(s)" in lines[-1]
        graphs = counters["stats"]["unique_graphs"]
        runs = [_collect(batcher, p, params) for p in prompts]
        assert all(r[3].wait(300) for r in runs) and [r[1] for r in runs] == want
        assert batcher.rows in (2, 4) and counters["stats"]["unique_graphs"] == graphs
    finally:
        batcher.close()


def test_a_lone_compiled_request_runs_at_batch_one(tiny_cfg):
    """A request alone in a wide batcher steps through a one-row graph (rows: a power of two past
    the last busy slot), and a second request widens it; each gets its eager tokens."""
    torch.manual_seed(1)
    model = randomize_(GPT(tiny_cfg), 0.3).eval()
    engine = Engine(model, pad_id=0, compile=False)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    prompts = [[5, 9, 13, 2], [7, 7, 21]]
    want = [engine.generate([p], params)[0] for p in prompts]
    batcher = ContinuousBatcher(model, pad_id=0, slots=8, compile=True)
    try:
        _, out, reason, done = _collect(batcher, prompts[0], params)
        assert done.wait(300) and out == want[0] and batcher.rows == 1
        runs = [_collect(batcher, p, SamplingParams(max_new_tokens=12 + 20 * i, temperature=0)) for i, p in enumerate(prompts)]
        assert all(r[3].wait(300) for r in runs) and runs[0][1] == want[0] and runs[1][1][:12] == want[1]
        assert batcher.rows == 2
    finally:
        batcher.close()
