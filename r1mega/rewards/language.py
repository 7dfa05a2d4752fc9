"""Language consistency (R1 stage 2 and later): the share of the chain of thought's words that are in
the target language, a score in [0, 1].

The chain of thought is the text of the single `<think>...</think>` block; a completion without one
scores 0. The target language is `sample["language"]` (default "en").

What a word is, precisely:
- a CJK word is one CJK ideograph (Unified Ideographs, Extensions A-F, Compatibility Ideographs): Chinese
  is not segmented, each character counts once;
- a Latin word is a maximal run of two or more Latin letters (ASCII letters and the Latin-1 Supplement /
  Latin Extended-A/B letters, including accented ones); a lone letter is taken for a maths variable
  ("x", "n") and ignored, and so is a LaTeX command name (a backslash and the letters after it);
- an other-script word is a maximal run of any other Unicode letters (Cyrillic, Greek, Arabic, kana,
  Hangul, ...), counted as a word of no supported language;
- digits, punctuation, symbols, whitespace and maths operators are not words and are ignored.
"en" (and the other Latin-script codes below) counts Latin words as its own; "zh" counts CJK words.
The paper's score is the proportion of target-language words in the CoT, which has no value for a CoT
without words; the two such cases are scored by what the reward is for (readable, single-language
reasoning):
- an empty chain of thought (`<think></think>`, or only whitespace) scores 0: it holds no
  target-language word, and a full score would pay the policy for dropping its reasoning;
- a chain of thought of maths alone ("7 + 9 = 16.") scores 1: it is reasoning, and nothing in it is in
  another language.

Deliberately left out: telling Latin-script languages apart (English vs French), word segmentation of
Chinese, and Japanese/Korean targets.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from r1mega.rewards.format import think_summary
from r1mega.rewards.registry import RewardOutput, register_reward

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
# Alternatives in order: a LaTeX command (skipped), a CJK ideograph, a Latin run, a run of other letters.
_TOKEN = re.compile(rf"\\[A-Za-z]+|([{_CJK}])|([{_LATIN}]+)|((?:(?![{_CJK}{_LATIN}])[^\W\d_])+)")
LATIN_LANGUAGES = frozenset({"en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "ro", "tr", "id", "vi"})
CJK_LANGUAGES = frozenset({"zh", "zh-cn", "zh-tw", "zh-hans", "zh-hant"})


def count_words(text: str) -> dict[str, int]:
    """Words of `text` by script: {"cjk": n, "latin": n, "other": n} (see the module docstring)."""
    counts = {"cjk": 0, "latin": 0, "other": 0}
    for match in _TOKEN.finditer(text):
        cjk, latin, other = match.groups()
        if cjk:
            counts["cjk"] += 1
        elif latin and len(latin) >= 2:
            counts["latin"] += 1
        elif other:
            counts["other"] += 1
    return counts


def language_share(text: str, language: str) -> float | None:
    """Share of `text`'s words in `language`; None when `text` has no words."""
    language = language.lower()
    if language in LATIN_LANGUAGES:
        script = "latin"
    elif language in CJK_LANGUAGES:
        script = "cjk"
    else:
        raise ValueError(f"unsupported target language {language!r}: expected one of "
                         f"{sorted(LATIN_LANGUAGES | CJK_LANGUAGES)}")
    counts = count_words(text)
    total = sum(counts.values())
    return counts[script] / total if total else None


@register_reward("language_consistency")
def language_consistency(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    parts = think_summary(completion)
    if parts is None:
        return RewardOutput(0.0, "no single <think>...</think> block")
    if not parts[0].strip():
        return RewardOutput(0.0, "empty chain of thought")
    share = language_share(parts[0], str(sample.get("language") or "en"))
    if share is None:
        return RewardOutput(1.0, "no words in the chain of thought")
    return RewardOutput(share, None if share == 1.0 else f"{share:.0%} of the words in the target language")
