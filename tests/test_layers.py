"""The package's layers: every import, at module level or inside a function, points down (or
sideways within a layer, without a cycle between packages), so a module can be read knowing only
what sits below it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom to top; a module belongs to the longest name that prefixes it
LAYERS = [
    ["ownllm", "ownllm.errors", "ownllm.config", "ownllm.files", "ownllm.metrics", "ownllm.cost"],
    ["ownllm.lora"],
    ["ownllm.model", "ownllm.tokenizer", "ownllm.chat_template"],
    ["ownllm.checkpoint"],
    ["ownllm.agent.calculator", "ownllm.agent.sql", "ownllm.agent.tools"],   # tools: plain functions, no model
    ["ownllm.data"],                              # corpora, shards, chat formats and the bundled curriculum
    ["ownllm.inference"],
    ["ownllm.rag", "ownllm.agent", "ownllm.interop", "ownllm.train"],
    ["ownllm.evaluation"],
    ["ownllm.quickstart", "ownllm.quickstart_model", "ownllm.serve", "ownllm.chat", "ownllm.cli", "ownllm.__main__"],
]


def _layer(module: str) -> tuple[int, str]:
    best = max(((i, n) for i, names in enumerate(LAYERS) for n in names
                if module == n or module.startswith(n + ".")), key=lambda x: len(x[1]))
    return best


def _imports() -> list[tuple[str, str, int]]:
    out = []
    for path in (ROOT / "ownllm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(module, n, node.lineno) for n in names if n == "ownllm" or n.startswith("ownllm.")]
    return out


def test_every_import_points_down():
    up = [f"{m}:{line} imports {t}" for m, t, line in _imports() if _layer(t)[0] > _layer(m)[0]]
    assert not up, "imports against the layer order:\n" + "\n".join(sorted(up))


def test_no_cycle_between_packages_of_one_layer():
    pkg = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    edges = {(pkg(m), pkg(t)) for m, t, _ in _imports() if pkg(m) != pkg(t) and _layer(m)[0] == _layer(t)[0]}
    cycles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not cycles, "packages of one layer import each other:\n" + "\n".join(cycles)


def test_every_module_has_a_layer():
    for path in (ROOT / "ownllm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        _layer(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
