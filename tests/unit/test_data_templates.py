"""Prompt templates: the R1-Zero template character for character as printed in the paper (Nature 645,
Methods; the literal below is copied from the article), and the ChatML layout."""

import pytest

from r1mega.data.templates import get_template, render_chatml, render_r1_zero

PAPER = ("A conversation between User and Assistant. The User asks a question and the Assistant solves it. The "
         "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
         "The reasoning process and answer are enclosed within <think>...</think> and <answer>...</answer> tags, "
         "respectively, that is, <think> reasoning process here </think><answer> answer here </answer>. "
         "User: prompt. Assistant:")


def test_r1_zero_is_the_papers_template():
    assert render_r1_zero("prompt") == PAPER
    question = "Compute 2 + {x}"  # braces must survive
    assert render_r1_zero(question) == PAPER.replace("User: prompt.", f"User: {question}.")
    assert render_r1_zero("q").endswith("User: q. Assistant:")
    assert get_template("r1_zero") is render_r1_zero


def test_plain_and_chatml():
    assert get_template("plain")("What is 1 + 1?") == "What is 1 + 1?"
    assert get_template("chatml")("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4<|im_end|>\n")
    assert render_chatml(messages) == expected
    assert render_chatml(messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="message 1"):
        render_chatml([messages[0], {"role": "robot", "content": "x"}])


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown template 'r1'.*'chatml', 'plain', 'r1_zero'"):
        get_template("r1")
