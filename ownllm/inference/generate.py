"""Text in, text out: load a run for inference and generate with stop strings and streaming.

Where it sits: `ownllm generate`, the sample after pretraining, and chat/serve call
`generate_text`; batch callers use `Engine` directly with token ids.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterator


from ownllm.checkpoint import load_model
from ownllm.errors import OwnLLMError
from ownllm.inference.engine import Engine, SamplingParams
from ownllm.tokenizer import Tokenizer


@lru_cache(maxsize=4)
def _load(run: str, mtime: float, quantize: str | None):
    model = load_model(run)
    if model.config.lora_rank:  # adapters folded in: plain layers decode faster (fused projections) and quantize
        from ownllm.model import fold_adapters

        model = fold_adapters(model)
    if quantize is not None:
        from ownllm.config import QUANTIZE_KINDS
        from ownllm.inference.quantize import quantize as quantize_model

        if quantize not in QUANTIZE_KINDS:
            raise OwnLLMError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE_KINDS)}")
        try:
            quantize_model(model, quantize)
        except ValueError as e:
            raise OwnLLMError(f"--quantize {quantize}: {e}") from None
    return model, Tokenizer.load(run)


def load_run(run: str | Path, quantize: str | None = None):
    """(model, tokenizer) for a run directory, cached until its weights change; a LoRA run's
    adapters are folded into its weights; quantize ('int8', 'int4', 'w8a8') gives quantised linear
    layers (inference/quantize.py)."""
    p = Path(run)
    if not p.is_dir():
        raise OwnLLMError(f"--run {run}: no such run directory")
    weights = p / "model.safetensors"
    return _load(str(p.resolve()), weights.stat().st_mtime if weights.exists() else 0.0, quantize)


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that could still begin a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


class StopStrings:
    """Streamed text in, text safe to show out: holds back a tail that could begin a stop string
    and cuts at the first one (excluded), then sets `hit`. Used by stream_text and the server."""

    def __init__(self, stops) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        self.pending += text
        at = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if at >= 0:
            out, self.pending, self.hit = self.pending[:at], "", True
            return out
        cut = len(self.pending) - _stop_holdback(self.pending, self.stops)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self, text: str = "") -> str:
        """The rest, at the end of the stream (`text`: the decoder's last bytes)."""
        out = self.push(text)
        rest, self.pending = ("" if self.hit else self.pending), ""
        return out + rest


def greedy_texts(model, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 batch_size: int = 16) -> list[str]:
    """Greedy continuations of many prompts (batched by similar length, stopping at end of turn or
    eos), decoded without those tokens; in prompt order. For evaluations."""
    import torch

    engine = Engine(model, tok.pad_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_ids=tok.stop_ids)
    outs: dict[int, str] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            for i, o in zip(idx, engine.generate([prompts[i] for i in idx], params)):
                outs[i] = tok.decode([t for t in o if t not in tok.stop_ids])
    return [outs[i] for i in range(len(prompts))]


def generate_text(run: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = 0.95, repetition_penalty: float = 1.0,
                  seed: int | None = None, stop: list[str] | None = None, stream: bool = False,
                  quantize: str | None = None, json_schema: dict | bool | None = None, regex: str | None = None):
    """Continue `prompt`. With stream=True returns an iterator of text pieces, else the full string.
    `json_schema` / `regex`: the continuation always parses under it (inference/structured.py)."""
    model, tok = load_run(run, quantize)
    ids = tok.encode(prompt) or [tok.bos_id]
    ctx = model.config.max_seq_len
    if len(ids) >= ctx:
        raise OwnLLMError(f"prompt is {len(ids)} tokens; the model's context is {ctx}")
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop_ids=(tok.eos_id, *tok.stop_ids),
                                json_schema=json_schema, regex=regex)
    except ValueError as e:
        raise OwnLLMError(str(e)) from None
    pieces = stream_text(Engine(model, tok.pad_id, tokenizer=tok), tok, ids, params, stop or [])
    return pieces if stream else "".join(pieces)


def stream_text(engine: Engine, tok: Tokenizer, ids: list[int], params: SamplingParams,
                stops: list[str] = ()) -> Iterator[str]:
    """Text pieces of one sequence's continuation, ending at a stop token or stop string (excluded);
    multi-byte characters are never split."""
    dec = tok.stream_decoder()
    text = StopStrings(stops)
    stop_ids = set(params.stop_ids)
    for step in engine.stream([ids], params):
        t = step[0]
        if t is None or t in stop_ids:
            break
        out = text.push(dec.push(t))
        if text.hit:
            yield out
            return
        if out:
            yield out
    yield text.flush(dec.flush())
