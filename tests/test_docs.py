"""The documentation as a newcomer reads it: the commands it shows parse, its links resolve, the
results page is what the stored records render to, and nothing in the tree narrates how it was
built (run numbers, issue numbers, dated lab notes, pointers into a results section)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ownllm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shell_lines(text: str) -> list[str]:
    """The commands of every ```bash block, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            cmd = re.sub(r"\s#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def _ownllm_args(cmd: str) -> list[str] | None:
    """The arguments after `ownllm` (or `-m ownllm`), optional `[...]` parts dropped."""
    cmd = re.sub(r"\s\[[^\]]*\]", "", cmd)
    words = shlex.split(cmd)
    for i, w in enumerate(words):
        if w == "ownllm" and (i == 0 or words[i - 1] == "-m"):
            return words[i + 1:]
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_ownllm_command_shown_parses(doc):
    commands = [a for c in _shell_lines(doc.read_text(encoding="utf-8")) if (a := _ownllm_args(c)) is not None]
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{doc.name}: `ownllm {shlex.join(args)}` does not parse")
    if doc.name == "README.md":
        assert len(commands) >= 20


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
    assert "../" not in readme   # nothing outside the repository


def test_results_page_is_rendered_from_the_store():
    sys.path.insert(0, str(ROOT))
    from bench.record import PAGE, render

    assert PAGE.read_text(encoding="utf-8") == render(), "docs/results.md is stale: python bench/record.py --render"


# How development history shows up in text: numbered stops or sessions, issue numbers, pointers
# into a results section of the README, and dated lab notes. Stop *tokens* and `stop_at_step` do not match.
NARRATION = [r"\bstop[ -]\d+\b", r"\bstops \d+", r"\bissue #?\d+\b", r"\bissues? \d+ ?(and|,)",
             r"README[,:]? *[\"(]?(Measured|what moved|reward model|DPO vs)", r"\(README\b(?!\.md)", r"\bthis session\b",
             r"\bsession \d+\b", r"\(later\)", r"\b(19|20)\d\d-\d\d-\d\d\b"]


def test_nothing_narrates_its_own_making():
    files = subprocess.run(["git", "ls-files", "ownllm", "tests", "bench", "docs", "README.md", "Makefile"],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    skip = {"docs/results.md", "tests/test_docs.py"}   # dated records; the patterns themselves
    found = []
    for name in files:
        if name in skip or name.startswith("docs/results/") or not name.endswith((".py", ".md", "Makefile")):
            continue
        for n, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            for pat in NARRATION:
                if re.search(pat, line, re.I):
                    found.append(f"{name}:{n}: {line.strip()[:100]}")
    assert not found, "development history in the tree:\n" + "\n".join(found)
