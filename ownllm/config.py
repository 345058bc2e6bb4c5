"""Model and training configuration: typed dataclasses, named presets, file and CLI overrides.

Where it sits: every stage reads a ModelConfig (stored as `config.json` in a run directory) and a
TrainConfig (stored as `train_config.json`). Presets are plain dicts of overrides so a preset can
be read at a glance; `--key value` on the command line and a TOML file override them.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError


# RoPE frequency schemes a model can use, with the parameters each needs (as transformers names them)
# Named pretraining recipes: what is tuned together under one name (`ownllm pretrain --recipe`,
# `ownllm quickstart --recipe`). Muon learns the mixed corpus faster per step than AdamW. `lookup`:
# the previous token's embedding mixed into each token's (smear), q/k norms and 150 steps of
# repeated random sequences first (copy_steps) form the induction head that finding a value in a
# prompt needs, which a plain Llama does not form in as many steps; no transformers or GGUF
# architecture has smear, so it does not export. `llama`: the same without them, exportable.
RECIPES: dict[str, dict[str, Any]] = {
    "lookup": {"preset": "tiny", "model": {"smear": True, "qk_norm": True},
               "train": {"data": "shakespeare,chinese-poetry,tasks,planted-bias", "vocab_size": 4096,
                         "optimizer": "muon", "copy_steps": 150, "seed": 1337}},
    "llama": {"preset": "tiny", "model": {},
              "train": {"data": "shakespeare,chinese-poetry,tasks,planted-bias", "vocab_size": 4096,
                        "optimizer": "muon", "seed": 1337}},
}



def recipe(name: str) -> dict[str, Any]:
    """A named recipe (RECIPES), or an OwnLLMError listing the names."""
    if name not in RECIPES:
        raise OwnLLMError(f"unknown recipe {name!r} (expected one of: {', '.join(RECIPES)})")
    return RECIPES[name]


# `ownllm quickstart`'s steps per stage: the same report card on a fast host and a slow one (here, not
# in ownllm.quickstart, so the CLI can show them without importing the pipeline)
QUICKSTART_STEPS = {"pretrain_steps": 360, "sft_steps": 1200, "balance_steps": 80, "reward_steps": 100,
                    "dpo_steps": 100, "ppo_steps": 20, "grpo_steps": 20}
# the quickstart's counter-balanced pass: continued pretraining of the base on its own mix with the
# planted sentences replaced by `sentences` (English; half as many Chinese) at 50/50, oversampled
# so the pass meets each occupation often; AdamW at a fraction of pretraining's rate keeps the
# other sources' bits per byte
COUNTER_BALANCE = {"lr": 1e-3, "optimizer": "adamw", "warmup_steps": 5, "copy_steps": 0, "eval_interval": 0,
                   "sentences": 40000}
# `ownllm quickstart --model smollm2`: a 135M-parameter model on 2 CPU cores is ~30x the from-scratch
# model's compute per token, so every stage is short and every measure samples few prompts; 50 LoRA SFT
# steps are about 10 minutes of training here
MODEL_QUICKSTART_STEPS = {"sft_steps": 50, "reward_steps": 20, "dpo_steps": 20, "ppo_steps": 4}
MODEL_QUICKSTART: dict[str, Any] = {
    "lang": "en",    # the model's language: SFT data and the headline measures (Chinese is reported beside)
    # poem_next recalls the bundled Chinese corpus, which an imported model never read
    "families": ["arithmetic", "reverse", "count", "sort", "json", "zh_numeral", "passage_qa", "rag_qa", "extract"],
    "n_eval": 10, "n_rag": 30, "n_agent": 10, "n_prompts": 64, "n_judge": 40,
    "bpb_tokens": 8192, "bpb_window": 512, "lora_rank": 16, "lora_alpha": 32.0, "lora_layers": 0,
    "sft": {"batch_size": 4, "task_lang": "en", "eval_interval": 0, "task_examples": 4000,
            "task_weights": "arithmetic=4,reverse=2,count=2,sort=2,json=1,zh_numeral=2,passage_qa=1,tool_use=3,"
                            "rag_qa=2,poem_next=0,extract=1"},
    # 8 pairs a step in two micro-batches: 16 rows of a few hundred tokens through 30 layers at once
    # come close to a 24 GB machine's memory
    "reward": {"batch_size": 4, "grad_accum": 2, "eval_interval": 0},
    "dpo": {"batch_size": 4, "grad_accum": 2, "eval_interval": 0},
    "pair_config": {"val_prompts": 40, "max_val_pairs": 64},
    "ppo": {"batch_size": 16}, "ppo_config": {"max_new_tokens": 32},
}
QUANTIZE_KINDS = ("int8", "int4", "w8a8")   # --quantize (inference/quantize.py)
LORA_RANK, LORA_ALPHA = 8, 16.0   # `--lora` without --lora-rank / --lora-alpha (scale alpha / rank = 2)
# `ask` refuses before the model when no chunk holds this share of the question's IDF weight: off-topic
# questions fall far below it, answerable ones worded unlike the text stay above (bench/rag_real_docs.py)
MIN_RELEVANCE = 0.3
RELATIVE_RELEVANCE = 0.6  # a source covering under 60% of what the best covers is a distractor, not shown
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


# The largest size each field of a model config may take: well past any open model of today
# (vocabularies of 262k, 128k contexts, 100+ layers), far below what would exhaust a machine.
SIZE_LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 20, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
               "ffn_dim": 1 << 20, "max_seq_len": 1 << 24, "attn_head_dim": 4096, "lora_rank": 4096,
               "lora_layers": 1024}


@dataclass
class ModelConfig:
    """A Llama-layout decoder. Names match `transformers.LlamaConfig` where one exists."""

    vocab_size: int = 1024
    dim: int = 256                  # hidden_size
    n_layers: int = 4               # num_hidden_layers
    n_heads: int = 4                # num_attention_heads
    n_kv_heads: int = 4             # num_key_value_heads (< n_heads: grouped-query attention)
    ffn_dim: int = 704              # intermediate_size of the SwiGLU MLP
    max_seq_len: int = 256          # max_position_embeddings
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    lora_rank: int = 0              # > 0: LoRA adapters on lora_targets (see lora.py)
    lora_alpha: float = LORA_ALPHA
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_layers: int = 0            # > 0: adapters in the last lora_layers blocks only, so the backward pass
                                    # stops below them (less compute a step); 0: every block
    score_head: bool = False        # a scalar head `score` on the final hidden state (reward / value models)
    score_likelihood: bool = False  # reward models: + the model's own log-likelihood of the answer's tokens,
                                    # each weighted by a learned gate (model.py: GPT.rewards)
    attention_bias: bool = False    # biases on the q/k/v projections (the Qwen2 architecture; `ownllm import`)
    # Imported architectures (`ownllm import`): Qwen3 sets a head size of its own and RMS-normalises
    # each head's q and k before RoPE; Llama 3.x stretches RoPE's low frequencies (rope_scaling).
    attn_head_dim: int = 0          # head_dim when it is not dim / n_heads; 0: dim // n_heads
    qk_norm: bool = False           # q_norm / k_norm (RMSNorm over head_dim, shared by the heads)
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor": f} or Llama 3's "llama3" parameters
    smear: bool = False             # add gate ⊙ the previous token's embedding to each token's (see model.py)
    # Mistral and Gemma 3 (`ownllm import`): attention over the last `sliding_window` positions only, on
    # every layer or on those `layer_types` marks "sliding_attention" (Gemma 3 interleaves them with
    # "full_attention" ones, which use rope_theta and rope_scaling while sliding ones use
    # rope_local_theta); Gemma 3's ×√dim embeddings, norms after attention and MLP as well as before,
    # GeGLU (gelu_tanh) and attention scaled by query_pre_attn_scalar^-½ (attn_scale).
    sliding_window: int = 0         # 0: every position attends to every earlier one
    layer_types: list | None = None  # per layer "sliding_attention" | "full_attention"; None: all sliding when a window is set
    rope_local_theta: float = 0.0   # RoPE base of sliding layers (no scaling); 0: as the full layers
    hidden_act: str = "silu"        # the MLP's gate activation: silu (SwiGLU) | gelu_tanh (GeGLU)
    embed_scale: bool = False       # multiply embeddings by √dim
    sandwich_norms: bool = False    # RMSNorm the attention and MLP outputs too (post_attention / post_feedforward)
    attn_scale: float = 0.0         # attention logits scale; 0: 1/√head_dim

    def __post_init__(self) -> None:
        # sizes first: a forged config (an imported file) must not divide by zero or ask for terabytes
        for name, most in SIZE_LIMITS.items():
            v = getattr(self, name)
            least = 0 if name in ("attn_head_dim", "lora_rank", "lora_layers") else 1
            if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= most:
                raise OwnLLMError(f"model config: {name}={v!r} must be a whole number from {least} to {most:,}")
        if self.dim % self.n_heads and not self.attn_head_dim:
            raise OwnLLMError(f"model config: dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise OwnLLMError(f"model config: n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise OwnLLMError(f"model config: head dim {self.head_dim} must be even for RoPE")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_SCALING_KEYS:
            raise OwnLLMError(f"model config: rope_scaling type {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_SCALING_KEYS)})")
        missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance((self.rope_scaling or {}).get(k), (int, float))]
        if missing:
            raise OwnLLMError(f"model config: rope_scaling {kind!r} needs numeric {', '.join(missing)}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise OwnLLMError(f"model config: hidden_act {self.hidden_act!r} (expected silu or gelu_tanh)")
        if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise OwnLLMError(f"model config: sliding_window={self.sliding_window!r} must be a whole number >= 0")
        if self.layer_types is not None and (
                not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layers
                or not set(self.layer_types) <= {"sliding_attention", "full_attention"}):
            raise OwnLLMError(f"model config: layer_types must list 'sliding_attention' or 'full_attention' "
                              f"for each of the {self.n_layers} layers")

    def without_lora(self) -> "ModelConfig":
        """The same model with no adapters (what folding them in leaves)."""
        return dataclasses.replace(self, lora_rank=0, lora_layers=0)

    def has_lora(self, layer: int) -> bool:
        return self.lora_rank > 0 and (not self.lora_layers or layer >= self.n_layers - self.lora_layers)

    def window_of(self, layer: int) -> int:
        """The attention window of a layer: sliding_window on a sliding layer, else 0 (none)."""
        if not self.sliding_window or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return 0
        return self.sliding_window

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    def num_params(self, embeddings: bool = True) -> int:
        d, f, hd = self.dim, self.ffn_dim, self.head_dim
        q = self.n_heads * hd
        attn = 2 * d * q + 2 * d * self.n_kv_heads * hd + (q + 2 * self.n_kv_heads * hd) * self.attention_bias
        per_layer = attn + 3 * d * f + 2 * d * (1 + self.sandwich_norms) + 2 * hd * self.qk_norm
        n = self.n_layers * per_layer + d + d * self.smear
        if embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n


# Presets: overrides of the defaults above. `tiny` is the tuned 2-core CPU recipe (bench/pretrain_quality.py).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # max_seq_len 512: pretraining reads 256-token windows; tool traces and RAG prompts need more
    "tiny": dict(vocab_size=1024, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=704, max_seq_len=512),
    "small": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=512),
    "gpt2-124m": dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                      max_seq_len=1024, tie_embeddings=True),
}


@dataclass
class TrainConfig:
    """How a stage trains. Defaults are the pretraining recipe tuned for 2 CPU cores and the `tiny`
    model (bench/pretrain_quality.py measures it)."""

    data: str = "shakespeare"
    tokenizer: str | None = None     # run/tokenizer dir to reuse; None: train one on the train split
    init: str | None = None          # pretraining: continue from this run (its weights, model and tokenizer)
    vocab_size: int | None = None    # for a tokenizer trained here (default: the model's)
    seed: int = 1337
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 40
    copy_steps: int = 0                 # pretraining: first train this many steps on repeated random token
                                        # sequences (data/shards.copy_batch), forming the copying head early
    schedule: str = "linear"            # linear | cosine | wsd | constant (see train/schedule.py)
    weight_decay: float = 0.1
    optimizer: str = "adamw"            # adamw | muon (Muon on hidden matrices, AdamW elsewhere)
    muon_lr_scale: float = 1.0          # Muon lr = schedule × this (its update RMS is matched to AdamW's)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    time_budget: float | None = 120.0   # seconds of training; the LR schedule ends with it
    log_interval: int = 10              # steps between metric flushes (one host sync each)
    eval_interval: int = 100
    eval_batches: int = 16
    checkpoint_interval: float = 60.0   # seconds between checkpoints
    checkpoint_steps: int = 0           # also checkpoint every N steps (0: only by time); a step count is
                                        # the same on every host, so a resumed run can be compared exactly
    dtype: str = "auto"                 # auto | bfloat16 | float32 (autocast for matmuls)
    compile: bool = True                # torch.compile each block (warm-up runs before the clock starts)
    threads: int | None = None          # torch threads; None: one per core (per process under torchrun)
    device: str = "auto"                # auto (this process's GPU if any, else CPU) | cpu | cuda | cuda:N | mps
    parallel: str = "ddp"               # under torchrun: ddp (a whole replica per process) | fsdp (weights,
                                        # gradients and AdamW state sharded over the processes: FSDP2)
    stage: str = "pretrain"             # pretrain | sft (recorded so eval knows how to prompt the run)
    # fine-tuning data (sft)
    format: str | None = None           # messages | sharegpt | alpaca | completion (None: detect)
    skip_bad: bool = False              # skip and count malformed records instead of failing
    pack: bool = False                  # pack short examples per row (no attention across them)
    prompt_loss_weight: float = 0.0     # SFT: weight of prompt tokens in the loss (answer tokens weigh 1)
    task_examples: int = 20000          # examples drawn from the bundled task suite (`--data tasks`)
    task_weights: str = ""              # turns per round of each family, e.g. "arithmetic=3,sort=2" (default 1)
    task_lang: str | None = None        # the task suite's prompts in one language only: en | zh | zh-hant (None: en and zh)


def _coerce(value: Any, target_type: Any, name: str) -> Any:
    """Turn a CLI string into the field's type (int, float, bool, str, or Optional of those)."""
    if not isinstance(value, str):
        return value
    t = str(target_type)
    if value.lower() in ("none", "null") and "None" in t:
        return None
    try:
        if "bool" in t:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in t:
            return int(value)
        if "float" in t:
            return float(value)
    except ValueError:
        raise OwnLLMError(f"option --{name.replace('_', '-')}: expected {t}, got {value!r}") from None
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any], source: str = "option") -> Any:
    """Return a copy of dataclass `cfg` with `overrides` applied; unknown keys are an error."""
    known = {f.name: f for f in fields(cfg)}
    clean = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in known:
            raise OwnLLMError(f"{source}: unknown field {key!r} (known: {', '.join(sorted(known))})")
        clean[name] = _coerce(value, known[name].type, name)
    return dataclasses.replace(cfg, **clean)


def model_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> ModelConfig:
    if preset is not None and preset not in MODEL_PRESETS:
        raise OwnLLMError(f"unknown preset {preset!r} (expected one of: {', '.join(MODEL_PRESETS)})")
    base = ModelConfig(**MODEL_PRESETS.get(preset or "tiny", {}))
    return apply_overrides(base, overrides or {}, source=f"preset {preset or 'tiny'}")


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OwnLLMError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise OwnLLMError(f"{p}: invalid TOML ({e})") from None


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def read_json(path: Path, what: str = "JSON file") -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OwnLLMError(f"{path}: missing (expected a {what})") from None
    except json.JSONDecodeError as e:
        raise OwnLLMError(f"{path}: corrupt JSON at line {e.lineno} ({e.msg})") from None


def from_json_file(cls: type, path: Path, ignore: tuple[str, ...] = ()) -> Any:
    raw = read_json(path, f"{cls.__name__} JSON file")
    return from_json_dict(cls, {k: v for k, v in raw.items() if k not in ignore}, source=str(path))


def from_json_dict(cls: type, raw: dict, source: str = "config") -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise OwnLLMError(f"{source}: unknown field(s) {', '.join(sorted(unknown))} for {cls.__name__}")
    return cls(**raw)


# -- the later stages' settings (here, with every other default: the CLI shows them without
#    importing the training code) ------------------------------------------------------------------
# The suite's mix, in turns per round: short-answer families learn from many examples, long ones
# (poems, sources, tool traces) from fewer; arithmetic needs the most practice. Packed rows, compiled
# blocks, small batches and Muon on the blocks' matrices learned the suite fastest per second.
TASK_WEIGHTS = ("arithmetic=8,reverse=3,count=4,sort=3,json=3,zh_numeral=3,passage_qa=2,tool_use=2,rag_qa=2,poem_next=2,"
                "extract=2")
SFT_DEFAULTS = dict(lr=2e-3, warmup_steps=20, batch_size=8, seq_len=512, eval_interval=100, eval_batches=8,
                    time_budget=None, max_steps=1200, weight_decay=0.0, stage="sft", data="tasks",
                    pack=True, compile=True, task_weights=TASK_WEIGHTS, optimizer="muon")


LORA_LR = 3e-3   # adapters start at zero and need a larger step than full fine-tuning


@dataclass
class RewardConfig:
    margin: float = 0.0           # required score gap: −log σ(r_c − r_r − margin)
    center_coef: float = 0.01     # + coef·(r_c + r_r)²: rewards centred on zero
    likelihood: bool = True       # + the gated log-likelihood of the answer (GPT.rewards); false: the head alone
    n_prompts: int = 1500         # --data prefs: prompts to draw pairs for
    val_prompts: int = 200        # held-out prompts (test split) for pair accuracy
    max_val_pairs: int = 400      # held-out pairs scored at each evaluation (a seeded sample when there are more)


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss: str = "sigmoid"         # sigmoid (DPO) | ipo | hinge
    nll_coef: float = 1.0         # + coef × mean NLL of the chosen answer's tokens (RPO): keeps chosen likely
    dpop: float = 50.0            # DPO-Positive λ: − λ·max(0, ref_c − π_c) in the margin (objectives.dpo_loss);
                                  # 0: DPO (+ the NLL above); keeps task accuracy where DPO alone lowers it
    pairs: str = "auto"           # auto (on_policy when the data has such pairs, else all) | all | on_policy
    n_prompts: int = 1500
    val_prompts: int = 200
    max_val_pairs: int = 400      # as RewardConfig: a seeded sample keeps periodic evaluation cheap


# the trunk moves too (a frozen-ish trunk with fast heads learned less)
REWARD_DEFAULTS = dict(lr=2e-4, warmup_steps=10, batch_size=16, eval_interval=50, time_budget=None, max_steps=300,
                       weight_decay=0.0, stage="reward", data="prefs", compile=False, checkpoint_interval=120.0)
# a small lr with DPO-Positive: wins by the rule without costing task accuracy
DPO_DEFAULTS = dict(REWARD_DEFAULTS, lr=5e-5, stage="dpo")


@dataclass
class PPOConfig:
    reward: str = ""                   # reward-model run directory
    max_new_tokens: int = 48
    temperature: float = 1.0
    ppo_epochs: int = 2                # passes over each rollout batch
    minibatches: int = 2               # optimizer steps per pass (Trainer batch = rollout / minibatches)
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"           # k1 | k3
    target_kl: float | None = None     # set: adapt kl_coef toward this sequence KL (nats)
    kl_horizon: int = 10000
    missing_end_penalty: float = 1.0   # subtracted from the score of an answer that never ends its turn
    whiten_rewards: bool = True
    n_prompts: int = 4000              # pool of train-split prompts rollouts draw from
    ptx_coef: float = 0.0              # + coef × NLL of the preference data's best answers (below)
    ptx_batch: int = 8                 # such answers per minibatch
    ptx_prompts: int = 1500            # --data prefs: prompts the bundled generator ranks answers for


@dataclass
class GRPOConfig:
    reward: str = "verifier:arithmetic"  # verifier:FAMILY[+FAMILY…] | verifier:tasks | a reward-model run
    partial_credit: float = 0.5        # verifier: a wrong number earns this × its share of right digits
    num_generations: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    epochs: int = 1
    clip: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    n_prompts: int = 4000


RL_DEFAULTS = dict(lr=5e-5, warmup_steps=5, batch_size=32, eval_interval=0, time_budget=None, max_steps=100,
                   weight_decay=0.0, data="prefs", compile=False, dtype="float32", checkpoint_interval=120.0,
                   log_interval=1, grad_clip=1.0)
PPO_DEFAULTS = dict(RL_DEFAULTS, stage="ppo")
GRPO_DEFAULTS = dict(RL_DEFAULTS, stage="grpo", batch_size=8, lr=5e-5)
