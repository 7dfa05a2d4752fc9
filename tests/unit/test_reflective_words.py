"""The reflective-word count (metrics.py) uses the paper's word list and counts whole words."""

import re
import string
from pathlib import Path

import pytest

from r1mega.data.reflection import REFLECTIVE_WORDS, reflective_word_count

PAPER = Path(__file__).resolve().parents[3] / "shared" / "paper" / "r1-nature.txt"


def test_word_list_is_the_papers():
    if not PAPER.is_file():
        pytest.skip(f"the paper's text is not beside the checkout ({PAPER})")
    sentence = re.search(r"Reflective terms—including (.*?)—were identified", PAPER.read_text()).group(1)
    assert set(re.findall(r"‘(\w+)’", sentence)) == set(REFLECTIVE_WORDS)


@pytest.mark.parametrize("text", [
    "Wait, let me check: 3 + 4 = 7. But the answer... however, I verify it again!",
    "waiting checks butter errors: none of these count. Retry? WRONG. evaluate; mistake.",
    "",
])
def test_count_matches_a_whole_word_count(text):
    words = [w.strip(string.punctuation).lower() for w in text.split()]
    assert reflective_word_count(text) == sum(w in REFLECTIVE_WORDS for w in words)
