"""Byte-level BPE tokenizer (HF `tokenizers`), special tokens and the chat template.

Where it sits: `ownllm tokenizer` (or `pretrain` without `--tokenizer`) trains one and writes
`tokenizer.json` + `tokenizer_config.json` into a run directory; every later stage loads it from
there. Byte-level means any UTF-8 string (Chinese, emoji, code, odd whitespace) encodes and
decodes back exactly; digits are split one per token so arithmetic stays learnable.

Special tokens are fixed now so later stages (chat, tools) never need a new tokenizer:
pad (distinct from eos, so the model learns to stop), bos, eos, the three chat roles, an
end-of-turn marker, and tool call / tool result markers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from ownllm.config import read_json
from ownllm.errors import OwnLLMError

if TYPE_CHECKING:
    from ownllm.chat_template import ChatTemplate

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
TOOL_CALL, TOOL_CALL_END = "<|tool_call|>", "<|/tool_call|>"
TOOL, TOOL_RESULT, TOOL_RESULT_END = "<|tool|>", "<|tool_result|>", "<|/tool_result|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_CALL_END,
                  TOOL, TOOL_RESULT, TOOL_RESULT_END] + [f"<|reserved_{i}|>" for i in range(4)]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, every special token, at least one merge

# Jinja chat template for HF tooling (PreTrainedTokenizerFast.apply_chat_template); `render`
# below is the same format in Python and also returns the loss mask. Tools (OpenAI schema) are
# listed in a system turn, one line each: `name(param: type, ...): description`; an assistant
# tool call is `<|tool_call|>{"name": "…", "arguments": {…}}<|/tool_call|>`; a tool result is
# a `<|tool|>` turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>Tools:{% for t in tools %}{% set f = t.function if t.function is defined else t %}{{ '\\n' }}"
    "{{ f.name }}({% for k, v in (f.parameters.properties if f.parameters is defined else {}).items() %}"
    "{{ k }}: {{ v.type }}{% if not loop.last %}, {% endif %}{% endfor %}): {{ f.description }}{% endfor %}"
    "<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] if m['content'] else '' }}"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "{% set f = c.function if c.function is defined else c %}"
    "<|tool_call|>{\"name\": \"{{ f.name }}\", \"arguments\": "
    "{{ f.arguments if f.arguments is string else f.arguments | tojson }}}<|/tool_call|>{% endfor %}{% endif %}"
    "<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tools_text(tools: list[dict]) -> str:
    """The system text that lists tools (OpenAI schema: {"type": "function", "function": {...}})."""
    lines = ["Tools:"]
    for t in tools:
        f = t.get("function", t)
        params = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in f.get("parameters", {}).get("properties", {}).items())
        lines.append(f"{f['name']}({params}): {f.get('description', '')}")
    return "\n".join(lines)


def tool_call_text(call: dict) -> str:
    """`{"name": …, "arguments": …}` of an OpenAI tool call (arguments: a JSON string or an object)."""
    f = call.get("function", call)
    args = f.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return f'{{"name": "{f["name"]}", "arguments": {args}}}'


def _pre_tokenizer():
    # Digits one per token, then GPT-2-style byte-level splitting (no prefix space: exact round trip).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def pre_tokenizer_spec() -> dict:
    """Our pre-tokenizer as tokenizer.json writes it (to tell ownllm's tokenizers from others)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    return json.loads(tok.to_str())["pre_tokenizer"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
    if vocab_size < MIN_VOCAB:
        raise OwnLLMError(f"--vocab-size {vocab_size} is too small: need >= {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return Tokenizer(tok)


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Feed long texts to the trainer in line-aligned pieces (it parallelises over items)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end == -1 else end + 1
            yield text[start:end]
            start = end


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the model is trained to produce the token (assistant text + its end)


class Tokenizer:
    """`template`: an imported model's own chat template (chat_template.py); None for ownllm's."""

    def __init__(self, tok: HFTokenizer, template: "ChatTemplate | None" = None):
        self.hf = tok
        self.template = template
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise OwnLLMError(f"tokenizer lacks special tokens {missing}; train it with `ownllm tokenizer`")
        self.special = ids
        self.pad_id, self.bos_id, self.eos_id, self.end_id = ids[PAD], ids[BOS], ids[EOS], ids[END]
        if template:
            unknown = [t for t in template.stop_tokens if tok.token_to_id(t) is None]
            if unknown:
                raise OwnLLMError(f"{template.origin}: stop tokens {unknown} are not in the vocabulary")
            if not template.stop_tokens:
                raise OwnLLMError(f"{template.origin}: the chat template comes with no token that ends a reply "
                                  "(no eos_token here, no eos_token_id in generation_config.json)")
        # tokens that end an assistant reply: `<|end|>` and eos, or the imported template's own
        self.stop_ids: tuple[int, ...] = (tuple(tok.token_to_id(t) for t in template.stop_tokens) if template
                                          else (self.end_id, self.eos_id))
        # Message text is text: a copy of the tokenizer that reads `<|end|>` in it as characters,
        # and a pattern that finds control-token strings in a message.
        self.hf_text = HFTokenizer.from_str(tok.to_str())
        self.hf_text.encode_special_tokens = True
        control = sorted((t.content for t in tok.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, control + list(MARKS))))

    @property
    def call_markers(self) -> tuple[str, str] | None:
        """The strings around a tool call in a reply: ours, or `<tool_call>`…`</tool_call>` when an
        imported template writes calls that way (Qwen2.5, Hermes) or writes no tools at all (then
        `render` writes them in, chat_template.hermes_messages); None when it writes tools its own way."""
        if not self.template:
            return (TOOL_CALL, TOOL_CALL_END)
        from ownllm.chat_template import HERMES_CALL

        if HERMES_CALL[0] in self.template.source or not self.template.writes_tools:   # (ours written in: render)
            return HERMES_CALL
        return None

    def reasoning_splitter(self, prompt_ids: list[int]):
        """A ReasoningSplitter when an imported template writes `<think>` blocks (Qwen3, DeepSeek-R1),
        starting inside one when the prompt ends in an open block; None otherwise."""
        from ownllm.chat_template import THINK_OPEN, ReasoningSplitter

        if not self.template or THINK_OPEN not in self.template.source:
            return None
        return ReasoningSplitter(in_think=self.decode(prompt_ids[-16:]).rstrip().endswith(THINK_OPEN))

    @property
    def chat_template(self) -> str:
        """The Jinja chat template, for files other tools read (tokenizer_config.json, GGUF)."""
        return self.template.source if self.template else CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return _encode(self.hf, text).ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of message text: a control token's string in it (`<|end|>`, `<|im_start|>`) is
        encoded as the characters it is, so no message can forge a turn."""
        return _encode(self.hf_text, text).ids

    def holds_control_text(self, messages: list[dict], tools: list[dict] | None = None) -> bool:
        """Whether any string in the messages or tools spells a control token."""
        return any(self._control.search(x) for x in _strings([messages, tools or []]))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None, template_kwargs: dict | None = None) -> Rendered:
        """Chat template: bos, the tool list (if any), then `<|role|>content<|end|>` per message, an
        assistant's tool calls before its end; mask marks assistant turns (calls included).
        An imported model's own template renders instead, its mask on each assistant message's
        text up to its stop token; `template_kwargs` are extra variables for it (e.g. Qwen3's
        enable_thinking=False). Ours takes none and ignores them."""
        if self.template:
            if not self.template.writes_tools and (tools or any(m.get("tool_calls") or m.get("role") == "tool"
                                                                for m in messages)):
                from ownllm.chat_template import hermes_messages

                messages, tools = hermes_messages(messages, tools), None
            return self._render_template(messages, add_generation_prompt, tools, template_kwargs or {})
        ids, mask = [self.bos_id], [0]
        if tools:
            body = self.encode_text(tools_text(tools))
            ids += [self.special[SYSTEM], *body, self.end_id]
            mask += [0] * (len(body) + 2)
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLE_TOKENS:
                raise OwnLLMError(f"message {i}: unknown role {role!r} (expected {', '.join(ROLE_TOKENS)})")
            body = self.encode_text(m.get("content") or "")
            for call in m.get("tool_calls") or () if role == "assistant" else ():
                body += [self.special[TOOL_CALL], *self.encode_text(tool_call_text(call)), self.special[TOOL_CALL_END]]
            train = 1 if role == "assistant" else 0
            ids += [self.special[ROLE_TOKENS[role]], *body, self.end_id]
            mask += [0, *([train] * len(body)), train]
        if add_generation_prompt:
            ids.append(self.special[ASSISTANT])
            mask.append(0)
        return Rendered(ids, mask)

    def user_turn(self, text: str, template_kwargs: dict | None = None) -> list[int]:
        """Ids of a conversation of one user message, ending where the assistant's reply begins."""
        return self.render([{"role": "user", "content": text}], add_generation_prompt=True,
                           template_kwargs=template_kwargs).ids

    def _render_template(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                         kwargs: dict) -> Rendered:
        if self.holds_control_text(messages, tools):
            return self._render_template_marked(messages, add_generation_prompt, tools, kwargs)
        text = self.template.text(messages, add_generation_prompt, tools, kwargs)
        enc = _encode(self.hf, text)
        return self._with_mask(messages, text, add_generation_prompt, tools, kwargs, enc.ids, [a for a, _ in enc.offsets])

    def _with_mask(self, messages, text, add_generation_prompt, tools, kwargs, ids, starts) -> Rendered:
        spans = self.template.assistant_spans(messages, text, tools, kwargs) if not add_generation_prompt else []
        return Rendered(ids, [int(any(s <= a < e for s, e in spans)) for a in starts])

    def _render_template_marked(self, messages, add_generation_prompt, tools, kwargs) -> Rendered:
        """An imported template returns one string, so the strings the messages brought are marked
        before rendering (MARKS around each) and encoded as text, the template's own as tokens."""
        from ownllm.chat_template import plain_message

        messages, tools = _unmarked([plain_message(m) for m in messages]), _unmarked(tools)
        text = self.template.text(messages, add_generation_prompt, tools, kwargs)
        marked = self.template.text(_marked(messages), add_generation_prompt, _marked(tools), kwargs)
        pieces = re.split(f"({MARKS[0]}|{MARKS[1]})", marked)
        if "".join(p for p in pieces if p not in MARKS) != text:
            raise OwnLLMError(f"{self.template.origin}: a message holds control-token text and this template "
                              "changes message text as it renders it, so that text cannot be kept apart")
        ids, starts, pos, depth = [], [], 0, 0
        for p in pieces:
            if p in MARKS:
                depth += 1 if p == MARKS[0] else -1
                continue
            enc = _encode(self.hf_text if depth > 0 else self.hf, p)
            ids += enc.ids
            starts += [pos + a for a, _ in enc.offsets]
            pos += len(p)
        return self._with_mask(messages, text, add_generation_prompt, tools, kwargs, ids, starts)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def save(self, directory: str | Path, model_max_length: int = 2048) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
            "additional_special_tokens": SPECIAL_TOKENS[3:],
            "end_of_turn_token": END,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        if self.template:   # an imported model keeps its own template, role of its tokens and stops
            v = self.template.variables
            cfg.update(bos_token=v.get("bos_token"), eos_token=v.get("eos_token"), pad_token=v.get("pad_token", PAD),
                       chat_template=self.template.source, ownllm_stop_tokens=self.template.stop_tokens)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        hf = read_tokenizer_file(directory)
        try:
            return cls(hf, saved_template(Path(directory)))
        except OwnLLMError as e:  # lacks the chat tokens: name the file
            raise OwnLLMError(f"{directory}: {e}") from None


def _encode(hf: HFTokenizer, text: str):
    """One text's encoding. A long text goes through `encode_batch`, which lets go of Python's
    interpreter lock while it works (`encode` holds it: a 1 MB message would stall a server's
    event loop for a second)."""
    if len(text) < 20_000:
        return hf.encode(text, add_special_tokens=False)
    return hf.encode_batch([text], add_special_tokens=False)[0]


# Two Unicode noncharacters (reserved for a program's internal use) mark message text inside a
# rendered template; they are dropped from messages before marking.
MARKS = ("\ufdd0", "\ufdd1")


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _map_strings(x, f, keep_keys=("role", "type")):
    """`x` with `f` applied to every string value (not keys; not the fields templates compare)."""
    if isinstance(x, str):
        return f(x)
    if isinstance(x, dict):
        return {k: v if k in keep_keys else _map_strings(v, f, keep_keys) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_map_strings(v, f, keep_keys) for v in x]
    return x


def _unmarked(x):
    return None if x is None else _map_strings(x, lambda s: s.replace(MARKS[0], "").replace(MARKS[1], ""))


def _marked(x):
    return None if x is None else _map_strings(x, lambda s: f"{MARKS[0]}{s}{MARKS[1]}" if s else s)


def read_tokenizer_file(directory: str | Path) -> HFTokenizer:
    """The `tokenizers` object in `directory`/tokenizer.json (or that file itself), any special
    tokens; a missing or malformed file is a one-line error naming it."""
    d = Path(directory)
    path = d / "tokenizer.json" if d.is_dir() else d
    if not path.is_file():
        raise OwnLLMError(f"{path}: tokenizer not found (expected a tokenizer.json or a directory holding one)")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise OwnLLMError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def saved_template(directory: Path) -> "ChatTemplate | None":
    """The imported template a run keeps in its tokenizer_config.json (marked by
    `ownllm_stop_tokens`); None for ownllm's own."""
    from ownllm.chat_template import ChatTemplate

    path = directory / "tokenizer_config.json"
    if not directory.is_dir() or not path.is_file():
        return None
    cfg = read_json(path, "tokenizer_config.json")
    stops = cfg.get("ownllm_stop_tokens") if isinstance(cfg, dict) else None
    if not stops:
        return None
    return ChatTemplate.from_tokenizer_config(cfg, list(stops), origin=str(path))


class StreamDecoder:
    """Incremental detokenizer: yields text only once its UTF-8 bytes are complete.

    Decodes a short window (from `prefix` to the end) rather than everything so far, so each step
    costs O(window) and multi-byte characters split across tokens never print as '\ufffd'.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # start of the decode window
        self.read = 0     # ids[:read] have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix: self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix: self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
