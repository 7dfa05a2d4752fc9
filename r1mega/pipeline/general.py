"""Synthetic general (non-reasoning) data for the embedded default: "Say the word X" requests.

Each row holds the bare "prompt", a helpful "response" in the R1 layout (`<think>` a one-line reading
of the request `</think><answer>` the word `</answer>`) and a "rejected" one (a refusal or another
word). The responses feed stage 3's non-reasoning share; the (prompt, chosen, rejected) triples train
stage 4's helpful reward model; the prompts are stage 4's general prompts. Rows have no "answer", so
the rule rewards skip them and the reward models score them (r1mega/rewards/reward_model.py).

Deliberately left out: anything resembling real chat data; point `pipeline.*.path` at files for that.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = ("apple", "river", "green", "house", "music", "light", "stone", "cloud", "bread", "water", "table",
         "paper", "horse", "night", "sugar", "plant", "smile", "ocean", "train", "chair", "dream", "grass",
         "honey", "lemon", "money", "north", "piano", "queen", "snake", "tiger", "voice", "world")
_REFUSALS = ("I cannot help with that.", "I do not know.", "No.")


def general_rows(size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"general/{seed}")
    rows = []
    for _ in range(size):
        word = rng.choice(WORDS)
        if rng.random() < 0.5:
            rejected = f"<think> {rng.choice(_REFUSALS)} </think><answer> no </answer>"
        else:
            other = rng.choice([w for w in WORDS if w != word])
            rejected = f"<think> The user wants a word. </think><answer> {other} </answer>"
        rows.append({"prompt": f"Say the word {word}",
                     "response": f"<think> The user asks me to say the word {word}. </think><answer> {word} </answer>",
                     "rejected": rejected})
    return rows
