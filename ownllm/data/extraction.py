"""The bundled extraction set: fictional staff notes in English and Chinese, each with its gold record.

Where it sits: `ownllm eval extract` (evaluation/extraction.py) reads a held-out draw of these
notes with `ownllm extract`'s machinery and scores each field against the gold record. Everything
is generated from fixed seeds: people, roles and cities invented from syllables, never the demo
knowledge base's towns (data/world.py), so a model that memorised that world gains nothing. A note
says its four facts in one of several wordings, with a sentence that is not a fact of the record
beside them, so copying the first name-like string is not enough. Notes fall into a train or a
test split by a hash of the note's person, as the task suite's prompts do.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

ROLES = {"en": ["engineer", "teacher", "baker", "pilot", "nurse", "librarian", "chemist", "carpenter"],
         "zh": ["工程师", "教师", "面包师", "飞行员", "护士", "图书管理员", "化学家", "木匠"]}

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "role": {"enum": ROLES["en"] + ROLES["zh"]},
        "year": {"type": "integer", "minimum": 1950, "maximum": 2030},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "role", "year", "city"],
    "additionalProperties": False,
}

_EN_SYL = ["ka", "lo", "mi", "ren", "sa", "tor", "vel", "bri", "dan", "fe", "gu", "ho", "ja", "ne", "pol", "qui"]
_ZH_SURNAMES = "欧柏衡岑郁蔺邵霍阮甘"
_ZH_GIVEN = "明远静宁秋岚晨曦若安思航婉清"
_ZH_CITY = "澜岫汀蔚濠屿泓檀翎砚"

EN_TEMPLATES = [
    "{name} has worked as {a_role} in {city} since {year}. {filler}",
    "Staff card. {filler} Name: {name}. Since {year}, {name} has been the {role} of the {city} office.",
    "In {year} {name} moved to {city} to start as {a_role}. {filler}",
]
ZH_TEMPLATES = [
    "{name}自{year}年起在{city}担任{role}。{filler}",
    "员工卡。{filler}姓名：{name}。{year}年起，{name}是{city}办事处的{role}。",
    "{year}年，{name}搬到{city}，开始做{role}。{filler}",
]
EN_FILLERS = ["The office opens at eight.", "Visitors sign in at the front desk.", "Lunch is served at noon.",
              "The building has three floors."]
ZH_FILLERS = ["办公室八点开门。", "访客请在前台登记。", "午饭在中午供应。", "这栋楼有三层。"]


# The prompt names the fields only: the constraint holds the rest of the schema, and a small model's
# context is better spent on the text.
INSTRUCTION = ("Extract these fields from the text as JSON: {fields}. Copy values exactly as the text writes "
               "them; use null for a field the text does not state.\n\nText:\n{text}")


def field_list(schema: dict) -> str:
    """'name (string), year (integer), role (choice)': what the prompt says of the schema."""
    def kind(spec) -> str:
        if not isinstance(spec, dict):
            return "value"
        return "choice" if "enum" in spec else spec.get("type") if isinstance(spec.get("type"), str) else "value"
    return ", ".join(f"{k} ({kind(v)})" for k, v in schema["properties"].items())


@dataclass(frozen=True)
class Note:
    text: str
    gold: dict
    lang: str


def _city(r: random.Random, lang: str, taken: set[str]) -> str:
    while True:
        c = (r.choice(_EN_SYL) + r.choice(_EN_SYL) + r.choice(["mouth", "ford", "holm", "wick"])).capitalize() \
            if lang == "en" else r.choice(_ZH_CITY) + r.choice(_ZH_CITY) + "城"
        if c not in taken:
            return c


def _person(r: random.Random, lang: str) -> str:
    if lang == "en":
        first = r.choice(_EN_SYL) + r.choice(_EN_SYL)
        return f"{first.capitalize()} {''.join(r.choice(_EN_SYL) for _ in range(3)).capitalize()}"
    return r.choice(_ZH_SURNAMES) + r.choice(_ZH_GIVEN) + r.choice(_ZH_GIVEN)


def note_split(name: str) -> str:
    """'test' for one person in five, by a hash of the name: the same on every machine."""
    return "test" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0 else "train"


@lru_cache(maxsize=1)
def _demo_towns() -> frozenset[str]:
    from ownllm.data.world import make_world

    return frozenset(t.name for t in make_world("demo").towns)


def one_note(r: random.Random, lang: str, name: str | None = None) -> Note:
    """A note about `name` (default: a new person), in one of the wordings, with its gold record."""
    gold = {"name": name or _person(r, lang), "role": r.choice(ROLES[lang]), "year": r.randint(1960, 2025),
            "city": _city(r, lang, _demo_towns())}
    template = r.choice(EN_TEMPLATES if lang == "en" else ZH_TEMPLATES)
    filler = r.choice(EN_FILLERS if lang == "en" else ZH_FILLERS)
    a_role = ("an " if gold["role"][0] in "aeiou" else "a ") + gold["role"]
    return Note(template.format(filler=filler, a_role=a_role, **gold), gold, lang)


def notes(n: int, split: str = "test", seed: int = 0, langs: tuple[str, ...] = ("en", "zh")) -> list[Note]:
    """`n` notes per language of the split, deterministic for a seed."""
    r = random.Random(f"ownllm-extraction-{seed}")
    out: list[Note] = []
    for lang in langs:
        got = 0
        while got < n:
            name = _person(r, lang)
            if note_split(name) == split:
                out.append(one_note(r, lang, name))
                got += 1
    return out
