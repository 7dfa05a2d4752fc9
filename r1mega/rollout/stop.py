"""Stop conditions of one sequence: stop token ids and stop strings.

`StopChecker.check` runs after every generated token. Token ids are checked exactly. Stop strings
are searched in the decoded tail of the generation (the last tokens whose text can hold the longest
stop string, plus slack for tokens that decode to nothing or to part of a character), so a step
costs O(longest stop string), not O(generation). When one matches, `finalize` decodes the whole
generation once and cuts the text right after the earliest match: the stop string is included in
the text, token_ids end with the token that completed it (its text may run past the cut).

Deliberately left out: stop strings matched across the prompt/generation boundary, regexes.
"""

from __future__ import annotations

from typing import Optional, Sequence

# Tokens of tail kept beyond one token per character of the longest stop string: covers tokens that
# decode to "" or to an incomplete UTF-8 sequence.
_SLACK_TOKENS = 8


def validate_stop(stop_token_ids, stop) -> tuple[frozenset[int], tuple[str, ...]]:
    """Normalises a request's stop settings; raises ValueError naming the bad entry."""
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    ids = []
    for t in stop_token_ids or ():
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"stop_token_ids must be integers, got {t!r}")
        ids.append(t)
    return frozenset(ids), tuple(stop)


class StopChecker:
    def __init__(self, stop_token_ids: frozenset[int], stop: tuple[str, ...], tokenizer=None):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode with")
        self.stop_token_ids, self.stop, self.tokenizer = stop_token_ids, stop, tokenizer
        self.window = max((len(s) for s in stop), default=0) + _SLACK_TOKENS

    def check(self, token_ids: Sequence[int]) -> Optional[str]:
        """"stop" if the last token ends the sequence, else None. token_ids: the generation so far."""
        if token_ids[-1] in self.stop_token_ids:
            return "stop"
        if self.stop:
            tail = self.tokenizer.decode(list(token_ids[-self.window:]))
            if any(s in tail for s in self.stop):
                return "stop"
        return None

    def finalize(self, token_ids: list[int]) -> str:
        """The text of a finished generation: without a final stop token, cut after the first stop string."""
        if self.tokenizer is None:
            return ""
        ids = token_ids[:-1] if token_ids and token_ids[-1] in self.stop_token_ids else token_ids
        text = self.tokenizer.decode(list(ids))
        ends = [text.find(s) + len(s) for s in self.stop if s in text]
        return text[:min(ends)] if ends else text
