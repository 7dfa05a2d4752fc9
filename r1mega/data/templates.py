"""Prompt templates: the R1-Zero template, a plain one and a ChatML chat renderer, chosen by name.

The R1-Zero template is the paper's, character for character (Nature 645, 633-638, Methods, the text
in /work/shared/paper/r1-nature.txt), including "that is," and the full stop after the question; only
the word "prompt" is replaced by the question. R1_SPEC.md quotes the arXiv wording ("i.e.,"); the
published article is the authority. Every template is a function question -> prompt text.

Deliberately left out: Jinja chat templates shipped inside model directories (render those with
transformers when a model's own format is needed); the tokenizer (templates produce text only).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process and answer are enclosed within <think>...</think> and "
    "<answer>...</answer> tags, respectively, that is, <think> reasoning process here </think>"
    "<answer> answer here </answer>. User: {prompt}. Assistant:"
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

Template = Callable[[str], str]


def render_r1_zero(question: str) -> str:
    # str.replace, not str.format: a question may contain braces.
    return R1_ZERO.replace("{prompt}", question)


def render_plain(question: str) -> str:
    return question


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; then `<|im_start|>assistant\\n` when
    `add_generation_prompt`. The same text as the Qwen2.5 / ChatML Jinja template without a default
    system message."""
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise ValueError(f"message {i}: expected {{'role': system|user|assistant|tool, 'content': str}}, "
                             f"got {dict(message)!r}")
        out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def render_chatml_question(question: str) -> str:
    return render_chatml([{"role": "user", "content": question}], add_generation_prompt=True)


TEMPLATES: dict[str, Template] = {
    "r1_zero": render_r1_zero,
    "plain": render_plain,
    "chatml": render_chatml_question,
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
