"""Engine: prefill + incremental decode with a static KV cache, batched sampling, streaming.

Where it sits: `ownllm generate`, the sample printed after pretraining, evaluation and
chat, RLHF rollouts and the server all generate through this. A batch of prompts of different
lengths is left-padded; each row gets its own RoPE positions and a key mask, so a padded row
produces exactly the tokens it would produce alone (tests/test_model.py).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ownllm.cost import count_forward
from ownllm.inference.structured import draw_constrained
from ownllm.model import GPT, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8        # 0: greedy (deterministic)
    top_k: int | None = 50
    top_p: float | None = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    # constrained output (structured.py): a JSON Schema (True: any JSON object), a regex or a Lark
    # grammar (tool calls); the reply then always parses, and ends when the grammar is complete
    json_schema: dict | bool | None = None
    regex: str | None = None
    grammar: str | None = None

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if p.temperature < torch.finfo(logits.dtype).tiny:  # 0, or too small to be a float32 (1e-212): greedy
        return logits.argmax(dim=-1)
    # shifted so the best logit is 0 first: a tiny temperature (1e-38) then tends to greedy instead
    # of overflowing to inf − inf = nan (the softmax below is shift-invariant)
    logits = (logits - logits.amax(-1, keepdim=True)) / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


_COMPILE_DEFAULT: list[bool] = [False]


@contextlib.contextmanager
def compiled_by_default(on: bool | None):
    """Within this block an Engine built without `compile=` compiles its decode step when `on`
    (None: the OWNLLM_COMPILE environment variable, 1 or 0, else off). The CLI wraps commands
    in it: long-lived ones (chat, serve) compile, one-shot ones do not unless asked."""
    if on is None:
        on = os.environ.get("OWNLLM_COMPILE", "0") not in ("", "0", "false", "no")
    before = _COMPILE_DEFAULT[0]
    _COMPILE_DEFAULT[0] = on
    try:
        yield
    finally:
        _COMPILE_DEFAULT[0] = before


def compile_default() -> bool:
    """Whether an engine built without `compile=` compiles (see compiled_by_default)."""
    return _COMPILE_DEFAULT[0]


def cache_bucket(length: int, limit: int) -> int:
    """KV-cache size for a compiled decode step: the next power of two from 256, at most `limit`,
    so requests of different lengths share a handful of graphs instead of one each."""
    return min(max(256, 1 << max(length - 1, 1).bit_length()), limit)


def compile_decode(model: GPT):
    """The model's fixed-shape decode step, torch.compile'd (C++ wrapper, no Python per op). A
    quantised model's weights are frozen into the graph and its int8 products autotuned, which
    lets inductor build weight-only int8 GEMMs from the dequantising layers."""
    options = {"cpp_wrapper": True}
    quantized = getattr(model, "quantized", None) and model.device.type == "cpu"
    if quantized:
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    # one graph per (model, batch, cache bucket) is by design; dynamo's default limit of 8 per code
    # object would stop a long-lived process (fullgraph: an error) at the ninth
    step = torch.compile(model.decode_static, dynamic=False, fullgraph=True, options=options, recompile_limit=256)
    if not quantized:
        return step
    import torch._inductor.config as inductor_config

    def frozen_step(*args):
        # freezing is read from the global config when a graph compiles (compile options do not
        # reach it), and it must not leak into other compiles (training graphs whose weights change)
        with inductor_config.patch(freezing=True):
            return step(*args)
    return frozen_step


class Engine:
    """Generation over a model. With compile=True each decode step runs as one torch.compile'd
    fixed-shape graph, at any batch size and with left-padded rows: compiled once per (batch,
    cache bucket) on first use (a minute or more for a 135M model on 2 cores, seconds when
    PyTorch's compile cache has it). The graph only reads the KV cache and returns the new
    keys/values, which are stored here (writing the cache inside the graph makes inductor copy
    all of it every step, slower than eager). bench/real_model.py measures it against eager, HF
    `generate` and llama.cpp."""

    def __init__(self, model: GPT, pad_id: int = 0, compile: bool | None = None, tokenizer=None):
        """`tokenizer`: needed only for constrained output (SamplingParams.json_schema / regex).
        `compile`: None follows `compiled_by_default`."""
        self.model = model.eval()
        self.cfg = model.config
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self._decode = None
        if compile_default() if compile is None else compile:
            self._decode = compile_decode(model)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_len: int) -> tuple[torch.Tensor, KVCache, torch.Tensor | None]:
        """Run the prompts (left-padded) through the model; returns last-position logits (B, V),
        the filled cache, and per-row positions of the last prompt token (None when unpadded)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, L = len(prompts), max(len(p) for p in prompts)
        if max_len > self.cfg.max_seq_len or L > max_len:
            raise ValueError(f"prompt of {L} tokens + generation exceeds the context of {self.cfg.max_seq_len}")
        dev = self.model.device
        cache = KVCache.empty(self.cfg, B, max_len, dtype=self.model.embed_tokens.weight.dtype, device=dev)
        idx = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            idx[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            cache.valid[i, L - len(p): L] = True
        if all(len(p) == L for p in prompts):
            return self.model.last_logits(idx, cache=cache), cache, None
        valid = cache.valid[:, :L]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        mask = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)  # pad rows see themselves
        logits = self.model.last_logits(idx, cache=cache, positions=positions, mask=mask[:, None])
        return logits, cache, positions[:, -1]

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[int | None]]:
        """Yield, per decode step, one new token per row (None once that row has stopped)."""
        B = len(prompts)
        L = max(len(p) for p in prompts)
        max_len = min(L + params.max_new_tokens, self.cfg.max_seq_len)
        logits, cache, last_pos = self.prefill(prompts, max_len if self._decode is None
                                               else cache_bucket(max_len, self.cfg.max_seq_len))
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.model.device).manual_seed(params.seed)
        stop = torch.tensor(list(params.stop_ids), dtype=torch.long, device=self.model.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.model.device)
        constraints = self._constraints(params, B)
        history = None
        if params.repetition_penalty != 1.0:
            history = torch.full((B, L), self.pad_id, dtype=torch.long, device=self.model.device)
            for i, p in enumerate(prompts):
                history[i, L - len(p):] = torch.tensor(p)
        def draw(lg, rows):
            return sample_next(lg, params, gen, history if history is None or rows is None else history[rows])

        for step in range(max_len - L):
            if constraints:
                live = [None if d else c for c, d in zip(constraints, done.tolist())]
                tok = draw_constrained(logits, live, params, draw)
            else:
                tok = sample_next(logits, params, gen, history)
            out = tok.tolist()
            yield [None if d else t for t, d in zip(out, done.tolist())]
            if stop.numel():
                done |= torch.isin(tok, stop)
            if constraints:
                for row, c in enumerate(live):
                    if c is not None and not done[row]:
                        done[row] = c.finished
            if bool(done.all()) or step == max_len - L - 1:
                return
            if history is not None:
                history = torch.cat([history, tok[:, None]], dim=1)
            if last_pos is not None:  # padded rows: each has its own position
                last_pos = last_pos + 1
            if self._decode is not None:
                pos = last_pos if last_pos is not None else torch.full((B,), cache.length, device=tok.device)
                logits, k, v = self._decode(tok[:, None], pos[:, None], cache.k, cache.v, cache.valid[:, None, None, :],
                                            cache.prev)
                count_forward(self.model, B, 1, cache.length, head_positions=B)   # (the graph cannot count itself)
                if self.cfg.smear:
                    cache.prev = self.model.embed_tokens(tok[:, None])
                at = cache.length
                cache.k[:, :, :, at: at + 1], cache.v[:, :, :, at: at + 1] = k, v
                cache.valid[:, at] = True
                cache.length += 1
                continue
            cache.valid[:, cache.length] = True
            if last_pos is None:
                logits = self.model.last_logits(tok[:, None], cache=cache)
            else:
                logits = self.model.last_logits(tok[:, None], cache=cache, positions=last_pos[:, None],
                                                mask=cache.valid[:, None, None, : cache.length + 1])

    def _constraints(self, params: SamplingParams, batch: int) -> list | None:
        from ownllm.inference.structured import constraint_for

        if not params.constrained:
            return None
        if self.tokenizer is None:
            raise ValueError("constrained output needs the tokenizer: Engine(model, pad_id, tokenizer=tok)")
        return [constraint_for(params, self.tokenizer, self.cfg.vocab_size) for _ in range(batch)]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """New tokens per row, up to and including a stop token."""
        outs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params):
            for row, t in enumerate(step):
                if t is not None:
                    outs[row].append(t)
        return outs
