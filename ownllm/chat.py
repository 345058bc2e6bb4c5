"""`ownllm chat`: a multi-turn REPL over a fine-tuned run, streaming replies.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /temp X
(sampling temperature), /quit. Ctrl-C while a reply streams stops that reply and keeps the
session; Ctrl-C or Ctrl-D at the prompt leaves. A thinking model's reasoning (`<think>` blocks of
an imported Qwen3 / DeepSeek-R1 template) is shown apart from its answer: dimmed on a terminal,
between "(thinking)" and "(answer)" markers elsewhere.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

from ownllm.inference.engine import Engine, SamplingParams
from ownllm.inference.generate import load_run, stream_text


class ChatSession:
    def __init__(self, run: str, temperature: float = 0.7, max_new_tokens: int = 256, seed: int | None = None,
                 quantize: str | None = None, registry=None, template_kwargs: dict | None = None,
                 json_schema: dict | bool | None = None):
        """`json_schema`: every reply is JSON under it (True: any JSON object)."""
        self.model, self.tok = load_run(run, quantize)
        self.json_schema = json_schema
        self.template_kwargs = template_kwargs or {}   # variables for an imported chat template
        self.registry = registry  # tools (agent/tools.py): each turn runs the agent loop
        if registry is not None:
            from ownllm.agent.loop import require_tool_calls

            require_tool_calls(self.tok)
        self.engine = Engine(self.model, self.tok.pad_id, tokenizer=self.tok)
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.system: str | None = None
        self.history: list[dict] = []
        self._splitter = None  # the current reply's ReasoningSplitter (a thinking template), else None

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's reply; the turn is recorded even if the caller stops early."""
        if self.registry is not None:
            yield from self._agent_reply(user_text)
            return
        self.history.append({"role": "user", "content": user_text})
        ids = self.tok.render(self.messages(), add_generation_prompt=True, template_kwargs=self.template_kwargs).ids
        ctx = self.model.config.max_seq_len
        while len(ids) > ctx - 16 and len(self.history) > 1:  # drop the oldest turns to fit the context
            self.history.pop(0)
            ids = self.tok.render(self.messages(), add_generation_prompt=True, template_kwargs=self.template_kwargs).ids
        ids = ids[-(ctx - 16):]
        params = SamplingParams(max_new_tokens=min(self.max_new_tokens, ctx - len(ids)), temperature=self.temperature,
                                seed=self.seed, stop_ids=self.tok.stop_ids, json_schema=self.json_schema)
        self.history.append({"role": "assistant", "content": ""})
        self._splitter = self.tok.reasoning_splitter(ids)
        for piece in stream_text(self.engine, self.tok, ids, params):
            self.history[-1]["content"] += piece
            if piece:
                yield piece

    def reply_parts(self, user_text: str) -> Iterator[tuple[str, str]]:
        """reply() as ('reasoning' | 'content', text) pieces: a thinking model's `<think>` block
        apart from its answer (everything is 'content' for other models)."""
        split = None
        for piece in self.reply(user_text):
            if split is None:
                split = self._splitter or False
            yield from (split.push(piece) if split else [("content", piece)])
        if split:
            yield from split.flush()

    def _agent_reply(self, user_text: str) -> Iterator[str]:
        """With tools: the agent loop answers; each call and its result is shown before the answer."""
        from ownllm.agent.loop import Agent

        self._splitter = None
        self.history.append({"role": "user", "content": user_text})
        agent = Agent(self.model, self.tok, self.registry, temperature=self.temperature, seed=self.seed,
                      template_kwargs=self.template_kwargs)
        res = agent.run(self.messages())
        for c in res.calls:
            yield f"[{c.raw} → {c.result}]\n"
        self.history = [m for m in res.messages if m.get("role") != "system"]
        yield res.answer

    def command(self, line: str) -> str:
        cmd, _, arg = line.partition(" ")
        if cmd == "/reset":
            self.history = []
            return "(conversation reset)"
        if cmd == "/system":
            self.system = arg.strip() or None
            self.history = []
            return f"(system prompt {'set' if self.system else 'cleared'}; conversation reset)"
        if cmd == "/temp":
            try:
                t = float(arg)
                if t < 0:
                    raise ValueError
            except ValueError:
                return "(usage: /temp X with X >= 0)"
            self.temperature = t
            return f"(temperature {t})"
        return "(commands: /reset, /system TEXT, /temp X, /quit)"


def repl(run: str, temperature: float = 0.7, max_new_tokens: int = 256, seed: int | None = None,
         read: Callable[[str], str] = input, write: Callable[[str], None] = None, quantize: str | None = None,
         registry=None, template_kwargs: dict | None = None, json_schema: dict | bool | None = None) -> None:
    styled = write is None and sys.stdout.isatty()  # dim reasoning with ANSI codes only on a terminal
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    open_mark, close_mark = ("\x1b[2m", "\x1b[0m\n") if styled else ("(thinking) ", "\n(answer) ")
    s = ChatSession(run, temperature, max_new_tokens, seed, quantize=quantize, registry=registry,
                    template_kwargs=template_kwargs, json_schema=json_schema)
    write(f"chatting with {run} (/reset, /system TEXT, /temp X, /quit; Ctrl-C stops a reply)\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            write(s.command(line.strip()) + "\n")
            continue
        write("bot> ")
        thinking = False
        try:
            for kind, piece in s.reply_parts(line):
                if (kind == "reasoning") != thinking:
                    write(open_mark if not thinking else close_mark)
                    thinking = not thinking
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        if thinking and styled:
            write("\x1b[0m")
        write("\n")
