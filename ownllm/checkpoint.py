"""Run directories: save and load them atomically; resume.

Where it sits: every stage writes its outputs through here and the next stage reads them back.

    run/config.json          ModelConfig              run/train_config.json  TrainConfig
    run/tokenizer.json       + tokenizer_config.json  run/metrics.jsonl      one JSON object a line
    run/model.safetensors    weights (metadata: step)  run/state.pt           optimizer, step, RNG
    run/plots/*.png          curves                    run/data/              token shards

A checkpoint is several files that must agree. Each is first written complete to a temporary
name; then a small journal (`commit.json`) listing the renames is itself renamed into place, the
renames are done, and the journal removed. A process killed at any moment leaves either the last
checkpoint or the new one: `recover()` (called by every loader) finishes a journaled commit.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ownllm.config import ModelConfig, from_json_file, to_json
from ownllm.errors import OwnLLMError
from ownllm.files import fsync_dir, fsync_write, write_error
from ownllm.lora import merged_state_dict

JOURNAL = "commit.json"


def recover(run_dir: str | Path) -> None:
    """Finish a commit that was interrupted after its journal was written. Safe to run from
    several processes at once (a server opening a run that is still training): whoever comes
    second finds the renames done and the journal gone."""
    d = Path(run_dir)
    journal = d / JOURNAL
    try:
        renames = json.loads(journal.read_text())
    except FileNotFoundError:
        return
    except ValueError:  # cannot happen (the journal is renamed in whole) unless the disk lost it
        raise OwnLLMError(f"{journal}: unreadable commit journal; remove it to keep the previous checkpoint") from None
    for tmp, final in renames:
        try:
            os.replace(d / tmp, d / final)
        except FileNotFoundError:
            pass  # done already, by us before a crash or by another process
    fsync_dir(d)
    try:
        journal.unlink()
    except FileNotFoundError:
        pass


def commit_files(run_dir: str | Path, files: dict[str, bytes | Any]) -> None:
    """Atomically replace a set of files in run_dir. Values: bytes, or a callable(path) that writes.
    A write that fails (a full disk) removes its temporary files and leaves the last checkpoint
    as it was, and says so in one line."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    recover(d)
    renames, tmps = [], []
    try:
        for name, content in files.items():
            tmp = d / f".{name}.tmp"
            tmps.append(tmp)
            if callable(content):
                content(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            else:
                fsync_write(tmp, content)
            renames.append([tmp.name, name])
        tmps.append(d / f".{JOURNAL}.tmp")
        fsync_write(d / f".{JOURNAL}.tmp", json.dumps(renames).encode())
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        for t in tmps:
            t.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(tmps[-1], e) from None
        raise OwnLLMError(f"{tmps[-1]}: cannot write ({str(e).splitlines()[0][:160]}); the last checkpoint is unchanged") from None
    os.replace(d / f".{JOURNAL}.tmp", d / JOURNAL)
    fsync_dir(d)
    recover(d)


def _clean_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights to save (the model's, or `weights` given for it): tied lm_head is not stored twice;
    tensors made contiguous CPU copies in their own dtype."""
    sd = dict(model.state_dict() if weights is None else weights)
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, state: dict | None = None,
                    step: int = 0, extra_files: dict[str, bytes] | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """`weights`: the model's whole state dict when `model` holds it in shards (FSDP)."""
    def write_weights(path: Path):
        save_file(_clean_state_dict(model, weights), str(path), metadata={"step": str(step), "format": "pt"})

    files: dict[str, Any] = {"model.safetensors": write_weights, "config.json": to_json(model.config).encode()}
    if state is not None:
        def write_state(path: Path):
            torch.save({**state, "step": step}, path)
        files["state.pt"] = write_state
    files.update(extra_files or {})
    commit_files(run_dir, files)


def load_model_config(run_dir: str | Path) -> ModelConfig:
    return from_json_file(ModelConfig, Path(run_dir) / "config.json")


def trained_context(run_dir: str | Path, max_seq_len: int) -> int:
    """The longest prompt the run was trained on: its training windows (`seq_len` in
    train_config.json) when shorter than the model's context. Pretraining reads 256-token windows
    of a 512-token model; positions past 256 are ones it never saw."""
    tc = Path(run_dir) / "train_config.json"
    if tc.exists():
        return min(max_seq_len, int(json.loads(tc.read_text()).get("seq_len") or max_seq_len))
    return max_seq_len


def load_weights(model: torch.nn.Module, run_dir: str | Path, base_only: bool = False) -> int:
    """Load model.safetensors into `model`; returns the step it was saved at. With base_only,
    the run may lack the model's LoRA adapters and scalar head (they keep their fresh
    initialisation), and a scalar head it has that `model` lacks is ignored."""
    d = Path(run_dir)
    recover(d)
    path = d / "model.safetensors"
    if not path.is_file():
        raise OwnLLMError(f"{path}: missing; expected a trained run directory (is {d} the right --run?)")
    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise OwnLLMError(f"{path}: corrupt checkpoint ({str(e)[:160]})") from None
    _load_state_dict(model, sd, path, base_only)
    return int(meta.get("step", 0))


def load_start_weights(model: torch.nn.Module, run_dir: str | Path) -> None:
    """The weights a new stage starts from: run_dir's model with its LoRA adapters folded in (a
    LoRA run's base matrices alone are not the model it trained). As with base_only, `model` may
    add fresh adapters and a scalar head of its own."""
    if load_model_config(run_dir).lora_rank == 0:
        load_weights(model, run_dir, base_only=True)
        return
    _load_state_dict(model, load_plain(run_dir)[1], Path(run_dir) / "model.safetensors", base_only=True)


def saved_step(run_dir: str | Path) -> int | None:
    """The step of the run's last complete checkpoint (weights and training state), read from the
    weights' metadata (cheap: no tensor is loaded); None when there is none."""
    d = Path(run_dir)
    if not ((d / "model.safetensors").is_file() and (d / "state.pt").is_file()):
        return None
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return int((f.metadata() or {}).get("step", 0))


def _load_state_dict(model: torch.nn.Module, sd: dict, path: Path, base_only: bool) -> None:
    if getattr(model.config, "tie_embeddings", False) and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    expected, got = set(model.state_dict()), set(sd)
    if base_only:
        fresh = ("lora_A", "lora_B", "score.weight", "score_gate.weight", "score_gate.bias", "score_scale")
        expected = {k for k in expected if not k.endswith(fresh)}
        got = {k for k in got if not k.endswith(fresh)}
        sd = {k: v for k, v in sd.items() if k in got}
    if expected != got:
        diff = sorted(expected ^ got)[:5]
        raise OwnLLMError(f"{path}: weights do not match config.json (differs at {', '.join(diff)})")
    try:
        model.load_state_dict(sd, strict=not base_only)
    except RuntimeError as e:
        raise OwnLLMError(f"{path}: weights do not match config.json ({str(e).splitlines()[-1][:160]})") from None


def load_state(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "state.pt"
    recover(run_dir)
    if not path.is_file():
        raise OwnLLMError(f"{path}: missing; cannot resume (no checkpoint with training state)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise OwnLLMError(f"{path}: corrupt training state ({str(e)[:160]})") from None


def resumed_train_config(run_dir: str | Path, overrides=None, defaults=None):
    """The TrainConfig saved in run_dir, with the fields `overrides` sets away from `defaults`
    applied on top (e.g. a longer --time-budget or --max-steps to continue further)."""
    import dataclasses

    from ownllm.config import TrainConfig

    d = Path(run_dir)
    recover(d)
    if not (d / "state.pt").is_file():
        raise OwnLLMError(f"{d}: nothing to resume (no state.pt); start it without --resume")
    saved = from_json_file(TrainConfig, d / "train_config.json", ignore=("dtype_used",))
    if overrides is None:
        return saved
    defaults = defaults or TrainConfig()
    changed = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)
               if getattr(overrides, f.name) != getattr(defaults, f.name)}
    return dataclasses.replace(saved, **changed)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Build the GPT described by run_dir/config.json and load its weights (eval mode)."""
    from ownllm.model import GPT

    cfg = load_model_config(run_dir)
    model = GPT(cfg)
    load_weights(model, run_dir)
    return model.to(device).eval()


def is_trained_run(run_dir: str | Path) -> bool:
    d = Path(run_dir)
    return (d / "model.safetensors").is_file() or (d / JOURNAL).is_file()


def refuse_overwrite(run_dir: str | Path, overwrite: bool) -> None:
    """A new run must not land on a trained one unless the user said --overwrite."""
    if is_trained_run(run_dir) and not overwrite:
        raise OwnLLMError(f"{run_dir}: already holds a trained run; pass --resume to continue it or --overwrite to replace it")


def start_run(run_dir: str | Path, tokenizer, model_cfg, train_cfg, overwrite: bool) -> Path:
    """Lay down a fresh run directory: tokenizer, config.json and train_config.json. Call it only
    after every input is validated, so bad input never costs the user the run it would replace."""
    d = Path(run_dir)
    if overwrite and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer.save(d, model_max_length=model_cfg.max_seq_len)
    commit_files(d, {"config.json": to_json(model_cfg).encode(), "train_config.json": to_json(train_cfg).encode()})
    return d


def load_plain(run) -> tuple[ModelConfig, dict[str, torch.Tensor], bool]:
    """(config with lora_rank 0, plain state dict, whether adapters were folded in) for a run
    directory: what `merge-lora` and the exports write."""
    model = load_model(run)
    lora = model.config.lora_rank > 0
    state = merged_state_dict(model) if lora else model.state_dict()
    return model.config.without_lora(), state, lora
