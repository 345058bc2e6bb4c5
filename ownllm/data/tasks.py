"""A bundled, seeded suite of instruction tasks in English and Chinese.

Where it sits: `--data tasks` for `ownllm sft`, `ownllm data tasks --out FILE` to write it as
OpenAI-messages JSONL, and `ownllm eval tasks` to score a run on the held-out prompts.

Every family is a deterministic function prompt → answer, so exact match is a fair score.
Train and test never share a prompt: a prompt belongs to the test split exactly when a hash of
its text falls in the test bucket, so no generator seed can leak one into the other.

Families: arithmetic (2-digit + and −), reverse (letters), count (a letter), sort (digits),
json (key=value → JSON), zh_numeral (1–999 → 中文数字), poem_next (next line of a given poem
from the bundled corpus), passage_qa (answer from a short passage), rag_qa (answer from
numbered sources and cite one, or say the sources do not say: the grounding RAG relies on),
extract (a staff note's fields as JSON: `ownllm extract`'s prompt).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache

TEST_BUCKETS = 10  # 1 in 10 prompts belongs to the test split


@dataclass(frozen=True)
class Example:
    family: str
    lang: str
    prompt: str
    answer: str
    trace: tuple = ()   # a whole conversation (tool use: tools, question, calls, results, answer)
    bucket: int | None = None   # a converted example keeps its original's (see `traditional`)

    @property
    def split(self) -> str:
        return "test" if (prompt_bucket(self.prompt) if self.bucket is None else self.bucket) == 0 else "train"

    def messages(self) -> list[dict]:
        if self.trace:
            return [dict(m) for m in self.trace]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


def prompt_bucket(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "little") % TEST_BUCKETS


LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ["Tom", "Mia", "Ali", "Zoe", "Sam", "Ivy", "Max", "Eva", "Leo", "Ada", "Ben", "Amy"]
ZH_NAMES = ["小明", "小红", "小刚", "小丽", "阿强", "小芳", "大伟", "小雨", "阿杰", "小林"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Seoul", "Quito", "Accra"]
ZH_CITIES = ["北京", "上海", "广州", "成都", "西安", "杭州", "南京", "武汉", "重庆", "昆明"]
THINGS = ["apples", "books", "cats", "pens", "cups", "kites", "shoes", "maps"]
ZH_THINGS = ["苹果", "书", "猫", "笔", "杯子", "风筝", "鞋", "地图"]
ZH_DIGITS = "零一二三四五六七八九"


def zh_numeral(n: int) -> str:
    """1–999 in Chinese numerals, with 零 for an inner zero (一百零五) and 十 alone for 10–19."""
    if not 0 < n < 1000:
        raise ValueError(n)
    h, t, u = n // 100, n // 10 % 10, n % 10
    out = ""
    if h:
        out += ZH_DIGITS[h] + "百"
        if t == 0 and u:
            return out + "零" + ZH_DIGITS[u]
    if t:
        out += ("" if (t == 1 and not h) else ZH_DIGITS[t]) + "十"
    if u:
        out += ZH_DIGITS[u]
    return out


def _arithmetic(r: random.Random, lang: str) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    op = r.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    ans = a + b if op == "+" else a - b
    q = f"What is {a} {op} {b}?" if lang == "en" else f"计算：{a} {op} {b} 等于多少？"
    return q, str(ans)


def _reverse(r: random.Random, lang: str) -> tuple[str, str]:
    letters = [r.choice(LETTERS) for _ in range(r.randint(3, 6))]
    q = f"Reverse the letters: {' '.join(letters)}" if lang == "en" else f"把这些字母倒过来：{' '.join(letters)}"
    return q, " ".join(reversed(letters))


def _count(r: random.Random, lang: str) -> tuple[str, str]:
    target = r.choice("abc")
    letters = [r.choice("abcd") for _ in range(r.randint(4, 8))]
    seq = " ".join(letters)
    q = f"How many times does {target} appear in: {seq}" if lang == "en" else f"{target} 在这里出现了几次：{seq}"
    return q, str(letters.count(target))


def _sort(r: random.Random, lang: str) -> tuple[str, str]:
    nums = [str(r.randint(0, 9)) for _ in range(r.randint(3, 7))]
    q = f"Sort from smallest to largest: {' '.join(nums)}" if lang == "en" else f"从小到大排序：{' '.join(nums)}"
    return q, " ".join(sorted(nums))


def _json(r: random.Random, lang: str) -> tuple[str, str]:
    name, city, age = r.choice(NAMES), r.choice(CITIES), r.randint(5, 90)
    keys = r.sample([("name", name), ("city", city), ("age", age)], k=r.randint(2, 3))
    src = ", ".join(f"{k}={v}" for k, v in keys)
    q = f"Convert to JSON: {src}" if lang == "en" else f"转换成 JSON：{src}"
    return q, json.dumps(dict(keys), ensure_ascii=False)


def _zh_numeral(r: random.Random, lang: str) -> tuple[str, str]:
    n = r.randint(1, 999)
    q = f"Write {n} in Chinese numerals." if lang == "en" else f"把 {n} 写成中文数字。"
    return q, zh_numeral(n)


@lru_cache(maxsize=1)
def _poems() -> list[list[str]]:
    """Short poems (4–8 lines of at most 16 characters) from the bundled Chinese corpus."""
    from ownllm.data.corpora import bundled_text

    poems = []
    for block in bundled_text("chinese-poetry").split("\n\n"):
        lines = block.split("\n")[2:]  # drop title and author
        if 4 <= len(lines) <= 8 and all(4 <= len(ln) <= 16 and "□" not in ln for ln in lines) \
                and len(set(lines)) == len(lines):
            poems.append(lines)
    return poems


def _poem_next(r: random.Random, lang: str) -> tuple[str, str]:
    poem = r.choice(_poems())
    i = r.randrange(len(poem) - 1)
    body = "\n".join(poem)
    if lang == "en":
        q = f"Here is a poem:\n{body}\nWhich line comes after \"{poem[i]}\"?"
    else:
        q = f"诗：\n{body}\n“{poem[i]}”的下一句是什么？"
    return q, poem[i] + "\n" + poem[i + 1]  # the given line, then its successor, as the poem has them


# The answer is the passage's sentence that holds it ("Ben lives in Lima."): written name first,
# the value follows by matching the passage (see SENTENCES in data/world.py for why).
PASSAGE_QA = {
    "en": dict(names=NAMES, cities=CITIES, things=THINGS, sep=" ", lives="{p} lives in {c}.", has="{p} has {n} {t}.",
               where="{facts}\nQuestion: Where does {p} live?", count="{facts}\nQuestion: How many {t} does {p} have?"),
    "zh": dict(names=ZH_NAMES, cities=ZH_CITIES, things=ZH_THINGS, sep="", lives="{p}住在{c}。", has="{p}有{n}个{t}。",
               where="{facts}\n问题：{p}住在哪里？", count="{facts}\n问题：{p}有几个{t}？"),
}


def _passage_qa(r: random.Random, lang: str) -> tuple[str, str]:
    L = PASSAGE_QA[lang]
    people, cities = r.sample(L["names"], 3), r.sample(L["cities"], 3)
    counts = [r.randint(2, 9) for _ in people]
    thing = r.choice(L["things"])
    lives = [L["lives"].format(p=p, c=c) for p, c in zip(people, cities)]
    has = [L["has"].format(p=p, n=n, t=thing) for p, n in zip(people, counts)]
    order = r.sample(range(3), 3)
    joined = L["sep"].join(s for i in order for s in (lives[i], has[i]))
    k = r.randrange(3)
    if r.random() < 0.5:
        return L["where"].format(facts=joined, p=people[k]), lives[k]
    return L["count"].format(facts=joined, p=people[k], t=thing), has[k]


def _rag_qa(r: random.Random, lang: str) -> tuple[str, str]:
    """Numbered sources (articles of the *train* world of data/world.py) + a question → the answer
    cited as [n], or the refusal when no source says (missing fact, or a town not in the sources)."""
    from ownllm.data.world import ATTRIBUTES, QUESTIONS, make_world
    from ownllm.data.grounded import cited_answer, sources_prompt

    towns = [t for t in make_world("train").towns if t.lang == lang]
    picked = r.sample(towns, 4)
    shown, target = picked[: r.choice((2, 3))], picked[0]
    if r.random() < 0.15:
        target = picked[3]  # asked about a town none of the sources mentions
    r.shuffle(shown)
    attr = r.choice(ATTRIBUTES)
    q = sources_prompt(QUESTIONS[lang][attr].format(n=target.name), [t.article() for t in shown])
    if target in shown and attr in target.facts:
        return q, cited_answer(target.sentence(attr), shown.index(target) + 1, lang)
    return q, cited_answer("", None, lang)


def _tool_use(r: random.Random, lang: str) -> tuple[str, str, tuple]:
    from ownllm.data.traces import tool_trace

    return tool_trace(r, lang)


def _extract(r: random.Random, lang: str) -> tuple[str, str]:
    """Fields of a staff note as JSON, spelled as constrained decoding writes it; the person's
    split (data/extraction.py) agrees with the prompt's, so `eval extract`'s notes stay unseen."""
    from ownllm.data.extraction import INSTRUCTION, SCHEMA, field_list, note_split, one_note

    while True:
        note = one_note(r, lang)
        prompt = INSTRUCTION.format(fields=field_list(SCHEMA), text=note.text)
        if note_split(note.gold["name"]) == ("test" if prompt_bucket(prompt) == 0 else "train"):
            return prompt, json.dumps(note.gold, ensure_ascii=False)


def _closed_book(r: random.Random, lang: str) -> tuple[str, str]:
    """A question about a fictional town with no sources given: nothing the model read holds the
    answer, so the honest reply is "I don't know". Not in the SFT mix: it is the honesty that
    preference learning adds (data/preferences.py), measured by `ownllm eval prefs`."""
    from ownllm.data.world import ATTRIBUTES, QUESTIONS, make_world
    from ownllm.data.grounded import CLOSED_BOOK_REFUSAL

    town = r.choice([t for t in make_world("train").towns if t.lang == lang])
    return QUESTIONS[lang][r.choice(ATTRIBUTES)].format(n=town.name), CLOSED_BOOK_REFUSAL[lang]


# single-turn families, scored by `ownllm eval tasks`
FAMILIES = {
    "arithmetic": _arithmetic, "reverse": _reverse, "count": _count, "sort": _sort, "json": _json,
    "zh_numeral": _zh_numeral, "poem_next": _poem_next, "passage_qa": _passage_qa, "rag_qa": _rag_qa,
    "extract": _extract,
}
# multi-turn traces, trained on by SFT and scored through the agent loop by `ownllm eval agent`
TRACE_FAMILIES = {"tool_use": _tool_use}
ALL_FAMILIES = {**FAMILIES, **TRACE_FAMILIES}
# prompts only preference learning sees (never in the SFT mix)
PREFERENCE_ONLY_FAMILIES = {"closed_book": _closed_book}
_GENERATORS = {**ALL_FAMILIES, **PREFERENCE_ONLY_FAMILIES}


LANGS = ("en", "zh", "zh-hant")


def generate(n: int, split: str = "train", seed: int = 0, families: list[str] | None = None,
             weights: dict[str, int] | None = None, lang: str | None = None) -> list[Example]:
    """`n` examples of `split` ('train' or 'test'), families in turn (a family of weight k takes k
    turns per round), language drawn at random between English and simplified Chinese (`lang`: only
    that one; 'zh-hant': the Chinese examples in traditional characters, each in the split of its
    simplified twin, so a model trained on one script is never tested on a prompt it saw in the
    other). Test prompts are distinct; train prompts may repeat (small families like zh_numeral have
    only ~1,800 train prompts)."""
    if lang not in (None, *LANGS):
        raise ValueError(f"task language {lang!r}: expected one of {', '.join(LANGS)}")
    fams = families or list(FAMILIES)
    unknown = (set(fams) | set(weights or {})) - set(_GENERATORS)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)} (known: {', '.join(_GENERATORS)})")
    if weights:
        fams = [f for f in fams for _ in range(weights.get(f, 1))]
    r = random.Random(f"{split}:{seed}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        fam = fams[len(out) % len(fams)]
        drawn = "en" if r.random() < 0.5 else "zh"
        if lang is not None and drawn != lang.removesuffix("-hant"):   # the other's draws are skipped, not replaced
            continue
        prompt, answer, *trace = _GENERATORS[fam](r, drawn)
        tries += 1
        if tries > 200 * n + 10_000:
            raise RuntimeError(f"could not draw {n} distinct {split} examples")
        ex = Example(fam, drawn, prompt, answer, tuple(trace[0]) if trace else ())
        if ex.split != split or (split == "test" and prompt in seen):
            continue
        seen.add(prompt)
        out.append(traditional(ex) if lang == "zh-hant" else ex)
    return out


def traditional(ex: Example) -> Example:
    """A Chinese example in traditional characters: its prompt, answer and the user's and
    assistant's words of a trace (tool calls and tool results stay as the tools spell them)."""
    from ownllm.data.grounded import to_traditional

    trace = tuple({**m, "content": to_traditional(m["content"])} if m["role"] in ("user", "assistant") and m.get("content")
                  else dict(m) for m in ex.trace)
    return Example(ex.family, "zh-hant", to_traditional(ex.prompt), to_traditional(ex.answer), trace,
                   prompt_bucket(ex.prompt))


def parse_weights(spec: str) -> dict[str, int]:
    """'arithmetic=3,sort=2' → {'arithmetic': 3, 'sort': 2}; a clear error naming a bad entry."""
    out = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, k = (s.strip() for s in part.partition("="))
        if name not in ALL_FAMILIES or not k.isdigit():
            raise ValueError(f"task weights: {part!r} is not FAMILY=INTEGER (families: {', '.join(ALL_FAMILIES)})")
        out[name] = int(k)
    return out


def write_jsonl(examples: list[Example], path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"messages": ex.messages(), "family": ex.family, "lang": ex.lang, "split": ex.split},
                               ensure_ascii=False) + "\n")
