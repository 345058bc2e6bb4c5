"""Continuous batching: requests join the running decode batch and leave it when they finish.

Where it sits: the server (serve/app.py) submits every generation here; one background thread
owns the model. The decode batch has `slots` rows over one shared KV cache (model.KVCache):
every step writes one column for all rows, and each row has its own RoPE position and its own
key mask, so rows of different ages share a step. A new request is prefilled on its own and its
keys/values are copied into a free row, right-aligned to the shared write column; when the
cache is full (or a prompt is longer than the column), `_compact` right-aligns every row's real
entries again — keys carry their rotary positions, so moving them changes nothing. A finished,
failed or cancelled request frees its row at the next step. At most `max_waiting` requests wait
for a row: past that `submit` raises QueueFull, so an overloaded server says so at once.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ownllm.inference.engine import SamplingParams, sample_next
from ownllm.inference.structured import draw_constrained
from ownllm.model import GPT, KVCache


@dataclass
class Request:
    ids: list[int]
    params: SamplingParams
    emit: Callable[[int | None, str | None], None]   # (token, None) per token; (None, finish_reason) at the end
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    pos: int = 0                                      # position of the next input token
    last: int = 0                                     # last sampled token (next input)
    gen: torch.Generator | None = None
    history: torch.Tensor | None = None
    constraint: object | None = None                  # structured.Constraint: only tokens that keep the output valid

    def cancel(self) -> None:
        self.cancelled = True


class QueueFull(RuntimeError):
    pass


class ContinuousBatcher:
    def __init__(self, model: GPT, pad_id: int, slots: int = 8, max_waiting: int = 64, tokenizer=None,
                 compile: bool | None = None):
        """`tokenizer`: for requests whose SamplingParams constrain the output (json_schema / regex).
        `compile`: decode steps through the compiled fixed-shape step (engine.compile_decode), one
        graph per cache bucket; None follows engine.compiled_by_default."""
        from ownllm.inference.engine import compile_decode, compile_default

        self.model = model.eval()
        self._decode = compile_decode(model) if (compile_default() if compile is None else compile) else None
        self.cfg = model.config
        self.pad_id = pad_id
        self.slots: list[Request | None] = [None] * slots
        dtype = model.embed_tokens.weight.dtype
        self.cache = KVCache.empty(self.cfg, slots, self.cfg.max_seq_len, dtype=dtype, device=model.device)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.max_waiting = max_waiting
        self.tokenizer = tokenizer
        self.lock = threading.Lock()   # serialises model use with other callers (e.g. embeddings)
        self.steps = 0
        self.rows = 0        # rows the last compiled step ran
        self.max_active = 0
        self.cancelled = 0   # requests dropped because their client went away
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="ownllm-batcher", daemon=True)
        self.thread.start()

    # -- public --------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not req.ids:
            raise ValueError("empty prompt")
        if len(req.ids) >= self.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(req.ids)} tokens does not fit the context of {self.cfg.max_seq_len}")
        if self.waiting.qsize() >= self.max_waiting:
            raise QueueFull(f"{self.waiting.qsize()} requests are already waiting for a slot")
        if req.params.seed is not None:
            req.gen = torch.Generator(device=self.model.device).manual_seed(req.params.seed)
        if req.constraint is None and req.params.constrained:
            from ownllm.inference.structured import constraint_for

            if self.tokenizer is None:
                raise ValueError("constrained output needs the batcher's tokenizer")
            req.constraint = constraint_for(req.params, self.tokenizer, self.cfg.vocab_size)
        self.waiting.put(req)
        return req

    def generate(self, ids: list[int], params: SamplingParams) -> list[int]:
        """Generate for one request and wait for it (from a worker thread, not the batcher's): the
        tokens before the stop token. Shares decode steps with every other request."""
        out: list[int] = []
        done = threading.Event()
        failure: list[str] = []

        def emit(tok, reason):
            if tok is not None:
                out.append(tok)
            else:
                if reason and reason.startswith("error"):
                    failure.append(reason)
                done.set()
        self.submit(Request(list(ids), params, emit))
        done.wait()
        if failure:
            raise RuntimeError(failure[0])
        return out

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queued(self) -> int:
        return self.waiting.qsize()

    def warm_up(self, log=print) -> list[int]:
        """Build the compiled step's graph for every width it runs at (1, 2, 4, … up to the slots)
        over the first cache bucket now, so the first clients of each width do not wait for a compile
        (minutes for a 135M model on 2 cores without PyTorch's cache). Reads the cache, writes nothing.
        Returns the widths; [] when the batcher decodes eagerly."""
        if self._decode is None:
            return []
        import time

        from ownllm.inference.engine import cache_bucket

        bucket = cache_bucket(1, self.cache.max_len)
        widths = sorted({min(len(self.slots), 1 << i) for i in range(len(self.slots).bit_length())})
        for rows in widths:
            t = time.perf_counter()
            with self.lock, torch.inference_mode():   # inference tensors, as _step makes: the same guards
                toks = torch.full((rows, 1), self.pad_id, dtype=torch.long, device=self.model.device)
                self._decode_rows(toks, torch.zeros_like(toks), rows, bucket)
            log(f"decode step compiled for {rows} row(s) in {time.perf_counter() - t:.1f}s")
        return widths

    def close(self) -> None:
        self._stop = True
        self.waiting.put(None)  # type: ignore[arg-type]
        self.thread.join(timeout=5)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            try:
                if self.active == 0:
                    req = self.waiting.get()
                    if req is None:
                        return
                    self._admit_or_fail(req)
                while None in self.slots and not self.waiting.empty():
                    req = self.waiting.get_nowait()
                    if req is None:
                        return
                    self._admit_or_fail(req)
                self._drop_cancelled()
                if self.active:
                    self._step()
            except Exception as e:  # never die silently: fail the requests in flight, keep serving
                for i, r in enumerate(self.slots):
                    if r is not None:
                        r.emit(None, f"error: {type(e).__name__}: {e}")
                        self._free(i)

    def _admit_or_fail(self, req: Request) -> None:
        """A request whose prefill fails gets its answer (an error) and the others keep going."""
        try:
            self._admit(req)
        except Exception as e:
            for i, r in enumerate(self.slots):
                if r is req:
                    self._free(i)
            req.emit(None, f"error: {type(e).__name__}: {e}")

    def _free(self, i: int) -> None:
        self.slots[i] = None
        self.cache.valid[i] = False

    def _finish(self, i: int, reason: str) -> None:
        r = self.slots[i]
        self._free(i)
        r.emit(None, reason)

    def _drop_cancelled(self) -> None:
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._free(i)
                self.cancelled += 1

    def _compact(self, need: int = 0) -> None:
        """Right-align every active row's real cache entries so the write column is as small as
        possible (at least `need`)."""
        c = self.cache
        counts = [int(c.valid[i, : c.length].sum()) if r is not None else 0 for i, r in enumerate(self.slots)]
        new_len = max(counts + [need])
        width = max(c.length, new_len)   # columns past both hold nothing valid: left alone
        k, v = torch.zeros_like(c.k[:, :, :, :width]), torch.zeros_like(c.v[:, :, :, :width])
        valid = torch.zeros_like(c.valid)
        for i, r in enumerate(self.slots):
            if r is None or not counts[i]:
                continue
            cols = c.valid[i, : c.length].nonzero().squeeze(1)
            dst = slice(new_len - counts[i], new_len)
            k[:, i, :, dst] = c.k[:, i, :, cols]
            v[:, i, :, dst] = c.v[:, i, :, cols]
            valid[i, dst] = True
        c.k[:, :, :, :width].copy_(k)
        c.v[:, :, :, :width].copy_(v)
        c.valid.copy_(valid)
        c.length = new_len

    @torch.inference_mode()
    def _admit(self, req: Request) -> None:
        if req.cancelled:
            return
        slot = self.slots.index(None)
        L = len(req.ids)
        with self.lock:
            tmp = KVCache.empty(self.cfg, 1, L, dtype=self.cache.k.dtype, device=self.model.device)
            tmp.valid[:, :L] = True
            logits = self.model.last_logits(torch.tensor([req.ids], device=self.model.device), cache=tmp)
        c = self.cache
        if c.length < L or c.length >= c.max_len:  # prompt longer than the column, or cache full
            self._compact(need=L)
        dst = slice(c.length - L, c.length)
        c.k[:, slot, :, dst] = tmp.k[:, 0]
        c.v[:, slot, :, dst] = tmp.v[:, 0]
        c.valid[slot] = False
        c.valid[slot, dst] = True
        if tmp.prev is not None:  # smear: the prompt's last token's embedding, for the row's next step
            if c.prev is None:
                c.prev = torch.zeros(len(self.slots), 1, self.cfg.dim, dtype=tmp.prev.dtype, device=tmp.prev.device)
            c.prev[slot] = tmp.prev[0]
        req.pos = L
        if req.params.repetition_penalty != 1.0:
            req.history = torch.tensor([req.ids], device=self.model.device)
        self.slots[slot] = req
        self._sampled(slot, logits)
        self.max_active = max(self.max_active, self.active)

    def _sampled(self, i: int, logits: torch.Tensor) -> None:
        """Sample row i's next token from (1, V) logits, emit it, and finish the row if it is done."""
        r = self.slots[i]
        try:
            if r.constraint is not None:
                tok = int(draw_constrained(logits, [r.constraint], r.params,
                                           lambda lg, _: sample_next(lg, r.params, r.gen, r.history))[0])
            else:
                tok = int(sample_next(logits, r.params, r.gen, r.history)[0])
        except Exception as e:   # this request's grammar failed: it ends, the others go on
            self._finish(i, f"error: {type(e).__name__}: {e}")
            return
        if tok in r.params.stop_ids:
            self._finish(i, "stop")
            return
        r.generated.append(tok)
        r.last = tok
        if r.history is not None:
            r.history = torch.cat([r.history, torch.tensor([[tok]], device=r.history.device)], dim=1)
        r.emit(tok, None)
        if r.cancelled:
            self._free(i)
            self.cancelled += 1
        elif r.constraint is not None and r.constraint.finished:
            self._finish(i, "stop")
        elif len(r.generated) >= r.params.max_new_tokens:
            self._finish(i, "length")
        elif r.pos + 1 >= self.cfg.max_seq_len:
            self._finish(i, "length")

    def _compiled_step(self, toks: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step through the compiled graph over the first `rows` slots (a power of two
        past the last busy one: a lone request runs at batch 1, not at the batcher's width) and the
        cache's first `bucket` columns (views: the same strides at every size, so one graph per
        (rows, bucket)). Returns logits for those rows."""
        from ownllm.cost import count_forward
        from ownllm.inference.engine import cache_bucket

        c = self.cache
        if c.length >= 256 and c.length & (c.length - 1) == 0:
            self._compact()   # about to outgrow a bucket: right-align the rows first, maybe it need not
        at = c.length
        bucket = cache_bucket(at + 1, c.max_len)
        last = max((i for i, r in enumerate(self.slots) if r is not None), default=0)
        rows = self.rows = min(len(self.slots), 1 << last.bit_length())   # slots fill from the front
        toks, pos = toks[:rows], pos[:rows]
        with self.lock:
            logits, k, v = self._decode_rows(toks, pos, rows, bucket)
            count_forward(self.model, rows, 1, at, head_positions=rows)
            if self.cfg.smear:
                c.prev[:rows] = self.model.embed_tokens(toks)
        c.k[:, :rows, :, at: at + 1], c.v[:, :rows, :, at: at + 1] = k, v
        c.valid[:rows, at] = True
        c.length += 1
        return logits

    def _decode_rows(self, toks: torch.Tensor, pos: torch.Tensor, rows: int, bucket: int):
        """The compiled step over the cache's first `rows` slots and `bucket` columns (views with the
        full cache's strides, so one graph per (rows, bucket)): (logits, new keys, new values)."""
        c = self.cache
        return self._decode(toks, pos, c.k[:, :rows, :, :bucket], c.v[:, :rows, :, :bucket],
                            c.valid[:rows, None, None, :bucket].clone(), None if c.prev is None else c.prev[:rows])

    @torch.inference_mode()
    def _step(self) -> None:
        c = self.cache
        if c.length >= c.max_len:
            self._compact()
            if c.length >= c.max_len:  # cannot happen: a row at full context has finished
                raise RuntimeError("KV cache full")
        S = len(self.slots)
        toks = torch.full((S, 1), self.pad_id, dtype=torch.long, device=self.model.device)
        pos = torch.zeros((S, 1), dtype=torch.long, device=self.model.device)
        for i, r in enumerate(self.slots):
            if r is not None:
                toks[i, 0], pos[i, 0] = r.last, r.pos
        if self._decode is not None:
            logits = self._compiled_step(toks, pos)
        else:
            c.valid[:, c.length] = True  # each row sees its own new entry (idle rows: only that, no NaN)
            with self.lock:
                logits = self.model.last_logits(toks, cache=c, positions=pos,
                                                mask=c.valid[:, None, None, : c.length + 1])
        self.steps += 1
        for i, r in enumerate(self.slots):
            if r is None:
                c.valid[i] = False
                continue
            r.pos += 1
            self._sampled(i, logits[i: i + 1])
