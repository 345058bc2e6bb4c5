"""The hidden rule: how a person would rank answers to a task prompt. Stands in for human raters.

Where it sits: the bundled preference generator (data/preferences.py) ranks candidate answers with
it, and `ownllm eval prefs` judges head-to-head comparisons with it. Training code never imports
it: the reward model, DPO, PPO and GRPO only ever see the pairs it produced (or a verifier's
exact-match reward), so a rising win rate is learned, not read off the rule.

Preferences, most important first (an answer's grade is the tuple, compared lexicographically):
1. truth: the right answer beats an honest "I don't know", which beats a wrong one; where the
   prompt has no answer (a closed-book question about a fictional town, sources that do not say),
   the honest refusal is the right answer and anything else is an invention;
2. language: answer in the language and script the question expects (a Chinese question gets
   Chinese, in its own simplified or traditional characters);
3. directness: the answer without rambling beats the same answer wrapped in filler.
"""
from __future__ import annotations

import re

from ownllm.data.tasks import Example
from ownllm.data.grounded import REFUSALS, is_refusal, language

_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]{2,}")


def _script(text: str) -> str | None:
    """'zh' or 'zh-hant' if the text has Chinese (grounded.language tells the scripts apart), 'en'
    if it has Latin words and no Chinese, None if neither (digits, symbols): such an answer fits
    either language."""
    if _CJK.search(text):
        return language(text)
    return "en" if _LATIN_WORD.search(text) else None


def expected_language(ex: Example) -> str:
    """The reference answer's script when it has one ('Write 5 in Chinese numerals' expects 五),
    else the question's language."""
    return _script(ex.answer) or ex.lang


def states(text: str, answer: str) -> bool:
    """The response gives exactly the answer, alone or as the conclusion after a colon."""
    return text == answer or (text.endswith(answer) and text[: -len(answer)].rstrip().endswith((":", "：")))


def grade(ex: Example, response: str) -> tuple[int, int, int]:
    """(truth 0–2, language 0–1, directness 0–1) of `response` to `ex`; higher is better."""
    text = response.strip()
    refused = is_refusal(text) or any(states(text, r) for r in REFUSALS)
    if is_refusal(ex.answer):           # the prompt has no answer
        truth = 2 if refused else 0
    else:
        truth = 2 if states(text, ex.answer) else (1 if refused else 0)
    script = _script(text)
    language = int(script is None or script == expected_language(ex))
    direct = int(len(text) <= 2 * len(ex.answer) + 12)
    return truth, language, direct


def prefer(ex: Example, a: str, b: str) -> int:
    """1 if a person prefers `a`, -1 if `b`, 0 if neither."""
    ga, gb = grade(ex, a), grade(ex, b)
    return (ga > gb) - (ga < gb)


def deciding_rule(ex: Example, a: str, b: str) -> str:
    """Which preference separates the two: 'truth', 'language', 'directness' or 'tie'."""
    for name, x, y in zip(("truth", "language", "directness"), grade(ex, a), grade(ex, b)):
        if x != y:
            return name
    return "tie"
