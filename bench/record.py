"""Keep measured results: run a command, store its RESULT line, and render docs/results.md.

    python bench/record.py -- python bench/structured_speed.py       # run, then append to the store
    python bench/record.py -- ownllm eval extract --run runs/sft --n 100
    python bench/record.py --render                                  # docs/results.md from the store
    python bench/record.py --from-log q.log --rev abc1234 -- ownllm quickstart --model smollm2
                                              # a long run made beforehand: its log's RESULT line

A benchmark or evaluation prints one `RESULT key=value …` line at its end. This runs the command
(its output passes through), takes the last such line and appends it to
`docs/results/<name>.jsonl` with the command, the date, the git revision and the host: its CPU
and its float32 / bfloat16 matmul speed measured just before, since on a shared 2-core machine the
same command can run several times faster one day than another. `--render` writes
docs/results.md: for every command its latest record, with everything needed to run it again.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"


def parse_result(line: str) -> dict:
    """'RESULT a=1.5 b=skipped' -> {'a': 1.5, 'b': 'skipped'}."""
    out = {}
    for part in line.split()[1:]:
        k, _, v = part.partition("=")
        try:
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else float(v)
        except ValueError:
            out[k] = v
    return out


def store_name(argv: list[str]) -> str:
    """bench/structured_speed.py -> structured_speed; ownllm eval extract … -> ownllm-eval-extract."""
    for a in argv:
        if a.endswith(".py"):
            return Path(a).stem
    if "ownllm" in [Path(a).name for a in argv[:3]] or argv[:3] == [sys.executable, "-m", "ownllm"]:
        words = [a for a in argv[argv.index(next(a for a in argv if Path(a).name == "ownllm")) + 1:]
                 if not a.startswith("-")][:2]
        return "-".join(["ownllm", *[w for w in words if re.fullmatch(r"[a-z-]+", w)]])
    return re.sub(r"[^a-z0-9]+", "-", " ".join(argv[:2]).lower()).strip("-")


def host() -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.common import matmul_peak

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "fp32_gflops": round(matmul_peak() / 1e9, 1),
            "bf16_gflops": round(matmul_peak(torch.bfloat16, n=512, reps=2) / 1e9, 1)}


def revision() -> str:
    """The short git revision, with + when tracked files differ from it."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/results.md"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()   # (the page this rewrites)
    return rev + ("+" if dirty else "")


def echo(lines):
    for line in lines:
        sys.stdout.write(line)
        yield line


def last_result(lines) -> str | None:
    last = None
    for line in lines:
        if line.startswith("RESULT "):
            last = line.strip()
    return last


def run_and_store(argv: list[str], log: str | None = None, rev: str | None = None) -> int:
    """Run `argv` and store its RESULT line; with `log`, `argv` already ran (at revision `rev`)
    and wrote that file: the host is measured now, after it, and the record says so."""
    machine = host()
    if log:
        last = last_result(Path(log).read_text(encoding="utf-8", errors="replace").splitlines())
        if last is None:
            print(f"record: not stored (no RESULT line in {log})", file=sys.stderr)
            return 1
        machine["measured"] = "after the run"
    else:
        rev = revision()   # the code as the command starts
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT)
        last = last_result(echo(proc.stdout))
        if proc.wait() != 0 or last is None:
            print(f"record: not stored ({'exit ' + str(proc.returncode) if proc.returncode else 'no RESULT line'})",
                  file=sys.stderr)
            return proc.returncode or 1
    rec = {"command": shlex.join(argv), "date": datetime.date.today().isoformat(), "rev": rev, "host": machine,
           "result": parse_result(last)}
    STORE.mkdir(parents=True, exist_ok=True)
    with open(STORE / f"{store_name(argv)}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"record: stored in {STORE.relative_to(ROOT)}/{store_name(argv)}.jsonl")
    return 0


def _value(v) -> str:
    return f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def render() -> str:
    lines = ["# Measured results", "",
             "Written by `python bench/record.py --render` from the records in `docs/results/` (one JSON line per",
             "run: command, date, git revision, host and the command's `RESULT` line); each command's latest run",
             "is shown. Run a command through `python bench/record.py -- COMMAND` to add a record. On a shared",
             "machine speed figures move from day to day: the host's matmul speed at the time is given beside",
             "each. Run benchmarks alone.", ""]
    for path in sorted(STORE.glob("*.jsonl")):
        latest: dict[str, dict] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise SystemExit(f"{path}:{n}: not JSON") from None
                latest[rec["command"]] = rec
        lines += [f"## {path.stem}", ""]
        for rec in latest.values():
            h = rec["host"]
            lines += [f"`{rec['command']}`", "",
                      f"{rec['date']}, revision {rec['rev']}; {h['cpu']}, {h['threads']} threads, matmul "
                      f"{h['fp32_gflops']:g} GFLOP/s fp32, {h['bf16_gflops']:g} bf16"
                      + (f" (measured {h['measured']})" if h.get("measured") else ""), "",
                      "| key | value |", "|---|---:|"]
            lines += [f"| {k} | {_value(v)} |" for k, v in rec["result"].items()]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="write docs/results.md from the store")
    ap.add_argument("--from-log", metavar="FILE", help="COMMAND already ran and wrote FILE: store its RESULT line")
    ap.add_argument("--rev", help="with --from-log: the git revision COMMAND ran at")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND …: run it and store its RESULT line")
    args = ap.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.from_log and not (argv and args.rev):
        ap.error("--from-log needs --rev and -- COMMAND (what wrote the log, at which revision)")
    if argv:
        code = run_and_store(argv, args.from_log, args.rev)
        if code:
            return code
    if args.render or argv:
        PAGE.write_text(render(), encoding="utf-8")
        print(f"record: wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
