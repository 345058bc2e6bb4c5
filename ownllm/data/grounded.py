"""Grounded prompts: numbered sources + question → an answer that cites them, or a refusal.

Where it sits: the bundled curriculum's prompt format, one shared by training and use, so the model sees at `ownllm ask` exactly
what it learned from: the SFT task family `rag_qa` (data/tasks.py) renders its examples with
`sources_prompt`, and `ask`, the agent's search tool and the server render retrieved chunks
the same way: one line per source, every sentence followed by its number (numbered_sources).
An answer is `<text> [n]`; when the sources hold no answer it is the refusal of
the question's language (`REFUSAL`), which `is_refusal` recognises.
"""
from __future__ import annotations

import re
from functools import lru_cache

# "zh": Chinese in simplified characters; "zh-hant": in traditional ones (Taiwan, Hong Kong)
REFUSAL = {"en": "The sources do not say.", "zh": "资料中没有提到。", "zh-hant": "資料中沒有提到。"}
CLOSED_BOOK_REFUSAL = {"en": "I don't know.", "zh": "我不知道。", "zh-hant": "我不知道。"}
REFUSALS = (*REFUSAL.values(), *CLOSED_BOOK_REFUSAL.values())
PROMPT_HEADS = {"en": ("Sources:", "Question: "), "zh": ("资料：", "问题："), "zh-hant": ("資料：", "問題：")}
_CJK = re.compile(r"[\u4e00-\u9fff]")
# common characters written differently in the two scripts, traditional then simplified, pair by pair
_PAIRS = ("們们這这個个來来時时說说會会對对開开關关為为與与問问題题資资訊讯體体點点處处從从將将實实現现發发經经過过"
          "還还應应當当麼么樣样裡里後后機机電电網网頁页檔档設设計计沒没國国學学語语寫写讀读書书長长門门見见車车東东"
          "無无種种號号碼码統统係系區区數数據据庫库錯错誤误請请嗎吗軟软裝装載载動动態态變变線线單单雙双檢检鍵键盤盘"
          "顯显標标準准備备換换轉转執执權权帳帐戶户組组記记錄录證证聯联絡络認认識识讓让給给夠够該该覺觉話话聽听買买"
          "賣卖錢钱價价貨货歷历鐘钟誰谁幾几兩两萬万億亿預预選选項项擇择鎖锁閱阅覽览連连結结級级層层節节屬属尋寻導导"
          "頭头腦脑務务並并傳传輸输環环亂乱舊旧聲声圖图畫画風风雲云陽阳氣气熱热溫温鄉乡縣县鎮镇園园館馆飯饭魚鱼雞鸡"
          "鳥鸟馬马龍龙紅红綠绿藍蓝黃黄灣湾臺台島岛這这麼么們们員员務务產产業业專专廣广園园區区辦办儲储存存檔档擴扩")
_TRADITIONAL = frozenset(_PAIRS[0::2]) - frozenset(_PAIRS[1::2])
_SIMPLIFIED = frozenset(_PAIRS[1::2]) - frozenset(_PAIRS[0::2])
_CITE = re.compile(r"\s*\[(\d+)\]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])")


def language(text: str) -> str:
    """'en', 'zh' (simplified characters) or 'zh-hant' (traditional: more of its own characters
    than simplified ones)."""
    if not _CJK.search(text):
        return "en"
    trad = sum(c in _TRADITIONAL for c in text)
    return "zh-hant" if trad and trad > sum(c in _SIMPLIFIED for c in text) else "zh"


@lru_cache(maxsize=2)
def _opencc(config: str):
    import opencc

    return opencc.OpenCC(config)


def to_traditional(text: str) -> str:
    """Simplified Chinese in traditional characters (Taiwan's standard forms), by OpenCC's phrase
    and character tables (a character table alone cannot tell 头发 → 頭髮 from 发现 → 發現)."""
    return _opencc("s2tw").convert(text)


def to_simplified(text: str) -> str:
    """Traditional Chinese in simplified characters (OpenCC); other text unchanged."""
    return _opencc("t2s").convert(text) if _CJK.search(text) else text


def numbered_sources(passages: list[str]) -> str:
    """One line per passage, every sentence followed by its passage's number: "The mayor of Fenbel
    is Irdel Fask. [2] The town of Fenbel was founded in 1320. [2]". A grounded answer copies the
    sentence that holds it and the citation comes with the copy; with the number only at the start
    of the line, citing would be a second lookup, which a small model learns poorly."""
    return "\n".join(" ".join(cited_answer(sent, i, "en") for sent in sentences(" ".join(p.split())))
                     for i, p in enumerate(passages, 1))


def sources_prompt(question: str, passages: list[str]) -> str:
    head, ask = PROMPT_HEADS[language(question)]
    return "\n".join([head, numbered_sources(passages), ask + question.strip()])


def cited_answer(answer: str, source: int | None, lang: str) -> str:
    """`answer [source]`, or the refusal of `lang` when no source holds an answer."""
    return REFUSAL[lang] if source is None else f"{answer} [{source}]"


def parse_answer(text: str) -> tuple[str, list[int]]:
    """('answer text', [cited source numbers]) from a model reply like 'Irdel Fask [2]'."""
    cites = [int(m) for m in _CITE.findall(text)]
    return _CITE.sub("", text).strip(), cites


def is_refusal(text: str) -> bool:
    return text.strip() in REFUSALS


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def supported(text: str, passages: list[str]) -> bool:
    """Whether a reply passes the citation check: a refusal always does; an answer does when it
    appears (spacing and case aside) in a source it cites. An answer that cites nothing, or only
    sources that were not shown, does not."""
    ans, cites = parse_answer(text)
    if is_refusal(ans) or is_refusal(text):
        return True
    return any(0 < c <= len(passages) and _holds(passages[c - 1], ans) for c in cites)


def _holds(passage: str, ans: str) -> bool:
    return bool(ans) and _norm(ans) in _norm(passage)


def checked(text: str, passages: list[str]) -> str | None:
    """The reply as the citation check lets it through: unchanged when a source it cites holds the
    answer; with its citation corrected when the answer is in another shown source (the model
    copied the right passage and numbered it wrong); None when no shown source holds it."""
    if supported(text, passages):
        return text
    ans, _ = parse_answer(text)
    return next((cited_answer(ans, i, language(ans)) for i, p in enumerate(passages, 1) if _holds(p, ans)), None)


def sentence_spans(text: str, start: int = 0) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of text[start:], ends included."""
    spans, at = [], 0
    for m in SENTENCE_END.finditer(text):
        if m.start() > at:
            spans.append((start + at, start + m.start()))
        at = m.end()
    if at < len(text):
        spans.append((start + at, start + len(text)))
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of `text` (ends included), as chunking splits them."""
    return [text[a:b] for a, b in sentence_spans(text)]
