"""A fictional encyclopedia: towns that exist nowhere else, in English and Chinese.

Where it sits: the bundled curriculum. rag/demo.py indexes the demo world's articles as `--kb
demo`; `ownllm eval rag` asks its questions; the SFT task family `rag_qa` reads the train world.
Every fact is invented by a seeded generator (names from random syllables), so a closed-book
answer can only be a guess: the measure of hallucination. Two disjoint worlds come from it:
the *demo* world (the knowledge base and its held-out questions) and the *train* world (the
passages the model learns to read and cite during SFT); no town name is shared.

Each town has five attributes; every article leaves one out, so some questions about a town
that is in the knowledge base still have no answer there ("the sources do not say"), and
questions about towns of neither world have no answer at all.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

SYLLABLES = ["var", "nok", "quel", "lis", "tor", "mend", "ash", "vel", "dra", "kin", "zor", "bel", "fen",
             "ric", "mor", "ith", "sel", "ost", "gan", "tri", "pol", "wen", "hal", "dun", "bri", "kas"]
ZH_TOWN_CHARS = "翠岚屿澜汐枫潼蓟鹭琅峦苍棠蘅芷沅湄蕖珂璃霁砚楠桦柘"
ZH_SURNAMES = "许柯简宁芮蔺蒲阮戚闵"
ZH_GIVEN = "安澜若汀知远清和慕言景行书瑶星辞"
PRODUCTS = {"en": ["glass bells", "copper kettles", "blue salt", "wool maps", "reed flutes", "amber ink",
                   "stone clocks", "silver thread", "paper lanterns", "iron keys", "plum wine", "clay whistles"],
            "zh": ["琉璃铃", "铜壶", "蓝盐", "羊毛地图", "芦笛", "琥珀墨", "石钟", "银线", "纸灯笼", "铁钥匙",
                   "梅子酒", "陶哨"]}
ATTRIBUTES = ("region", "founded", "population", "known_for", "mayor")

# Every sentence names the town before the attribute and ends with its value, and a grounded
# answer repeats the sentence (Town.sentence): writing "The town of Fenbel was founded in" first,
# the model finds the year by matching what it has just written against the source, the copying
# pattern a small model learns readily (json does), instead of a two-hop lookup (town, then
# attribute, then value) that it did not learn within the quickstart's budget.
SENTENCES = {
    "en": {"region": "The town of {n} lies in the {v} valley.", "founded": "The town of {n} was founded in {v}.",
           "population": "The town of {n} has about {v} people.", "known_for": "The town of {n} is known for its {v}.",
           "mayor": "The mayor of {n} is {v}."},
    "zh": {"region": "{n}是{v}的一个小镇。", "founded": "{n}建于{v}年。", "population": "{n}住着大约{v}人。",
           "known_for": "{n}以{v}闻名。", "mayor": "{n}的镇长是{v}。"},
}
QUESTIONS = {
    "en": {"region": "In which valley is {n}?", "founded": "When was {n} founded?",
           "population": "How many people live in {n}?", "known_for": "What is {n} known for?",
           "mayor": "Who is the mayor of {n}?"},
    "zh": {"region": "{n}在哪个省？", "founded": "{n}建于哪一年？", "population": "{n}住着多少人？",
           "known_for": "{n}以什么闻名？", "mayor": "{n}的镇长是谁？"},
}


@dataclass
class Town:
    name: str
    lang: str
    facts: dict[str, str]          # the attributes the article states (four of five)
    missing: str                   # the one it leaves out

    def sentence(self, attribute: str) -> str:
        """The article's sentence that states `attribute` (the grounded answer's wording)."""
        return SENTENCES[self.lang][attribute].format(n=self.name, v=self.facts[attribute])

    def article(self) -> str:
        return ("" if self.lang == "zh" else " ").join(self.sentence(a) for a in ATTRIBUTES if a in self.facts)

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass(frozen=True)
class Question:
    question: str
    answer: str | None             # None: the knowledge base does not say
    lang: str
    town: str
    attribute: str
    kind: str                      # answerable | missing_fact | unknown_town
    sentence: str | None = None    # the article's sentence stating the answer (also an exact answer)

    @property
    def exact_answers(self) -> tuple[str, ...]:
        """What counts as exactly right: the value, or the article's sentence stating it (the form
        rag_qa teaches)."""
        return tuple(a for a in (self.answer, self.sentence) if a is not None)


@dataclass
class World:
    towns: list[Town]
    strangers: list[Town] = field(default_factory=list)  # towns of no world: only asked about

    def documents(self) -> list[tuple[str, str]]:
        return [(f"{t.lang}/{t.slug}.md", t.article() + "\n") for t in self.towns]

    def questions(self) -> list[Question]:
        out = []
        for t in self.towns:
            for a in ATTRIBUTES:
                q = QUESTIONS[t.lang][a].format(n=t.name)
                if a in t.facts:
                    out.append(Question(q, t.facts[a], t.lang, t.name, a, "answerable", t.sentence(a)))
                else:
                    out.append(Question(q, None, t.lang, t.name, a, "missing_fact"))
        for i, t in enumerate(self.strangers):
            a = ATTRIBUTES[i % len(ATTRIBUTES)]
            out.append(Question(QUESTIONS[t.lang][a].format(n=t.name), None, t.lang, t.name, a, "unknown_town"))
        return out


def slug(name: str) -> str:
    """File stem of a town's article: demo documents are `<lang>/<slug>.md`."""
    return name.lower().replace(" ", "-")


def _en_name(r: random.Random, parts: int) -> str:
    return "".join(r.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _draw_town(r: random.Random, lang: str, taken: set[str]) -> Town:
    while True:
        if lang == "en":
            name = _en_name(r, r.choice((2, 3)))
        else:
            name = "".join(r.sample(ZH_TOWN_CHARS, 3)) + "镇"  # one length: no name inside another
        if name not in taken:
            taken.add(name)
            break
    if lang == "en":
        facts = {"region": _en_name(r, 2), "founded": str(r.randint(1100, 1950)),
                 "population": str(r.randint(200, 99999)), "known_for": r.choice(PRODUCTS["en"]),
                 "mayor": f"{_en_name(r, 2)} {_en_name(r, 2)}"}
    else:
        facts = {"region": "".join(r.sample(ZH_TOWN_CHARS, 2)) + "省", "founded": str(r.randint(1100, 1950)),
                 "population": str(r.randint(200, 99999)), "known_for": r.choice(PRODUCTS["zh"]),
                 "mayor": r.choice(ZH_SURNAMES) + "".join(r.sample(ZH_GIVEN, 2))}
    missing = r.choice(ATTRIBUTES)
    return Town(name, lang, {k: v for k, v in facts.items() if k != missing}, missing)


@lru_cache(maxsize=4)
def make_world(which: str = "demo", n_per_lang: int = 120) -> World:
    """'demo' (the knowledge base) or 'train' (SFT passages); disjoint town names."""
    if which not in ("demo", "train"):
        raise ValueError(which)
    taken: set[str] = set()
    demo_r = random.Random("ownllm-demo-kb")
    demo = [_draw_town(demo_r, lang, taken) for lang in ("en", "zh") for _ in range(n_per_lang)]
    strangers = [_draw_town(demo_r, lang, taken) for lang in ("en", "zh") for _ in range(n_per_lang // 6)]
    if which == "demo":
        return World(demo, strangers)
    train_r = random.Random("ownllm-train-world")
    return World([_draw_town(train_r, lang, taken) for lang in ("en", "zh") for _ in range(n_per_lang * 10)])
