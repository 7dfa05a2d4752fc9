"""Prompt and SFT datasets from local files: JSON Lines, JSON, Parquet, or a `datasets.save_to_disk` dir.

Prompt rows come back as dicts with "prompt" (the bare question, a non-empty string) and "answer" (a
string; a number in the file is turned into its decimal text), plus every other field of the row
unchanged; the source field names are configurable. SFT rows come back either as {"prompt",
"response"} or as {"messages": [{"role", "content"}, ...]} ending with an assistant message.

A malformed row raises `DataError` naming the file, the row (1-based; for JSON Lines the line number)
and the field. Deliberately left out: the Hugging Face hub (local files only), streaming (the whole
file is read), and templates (rows hold bare text; templates.py renders them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from r1mega.data.templates import IM_END, render_chatml

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A file or row that does not fit the expected schema; the message names file, row and field."""


def _rows(path: Path, split: Optional[str]) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of the file: `where` is "line N" or "row N"."""
    if path.is_dir():
        yield from _hf_rows(path, split)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {number}: not valid JSON ({error})") from error
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        yield from ((f"row {i}", row) for i, row in enumerate(data, 1))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({error})") from error
        yield from ((f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1))
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r}: expected .jsonl, .json, .parquet or a "
                        "directory written by datasets.save_to_disk")


def _hf_rows(path: Path, split: Optional[str]) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as error:  # FileNotFoundError or a format error from inside `datasets`
        raise DataError(f"{path}: not a directory written by datasets.save_to_disk ({error})") from error
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(data)}")
        data = data[split]
    yield from ((f"row {i}", row) for i, row in enumerate(data, 1))


def _open(path: str | os.PathLike) -> Path:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"dataset {file} does not exist")
    return file


def _field(path: Path, where: str, row: Any, key: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where}: expected an object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataError(f"{path}: {where}: missing field {key!r} (fields: {sorted(row)})")
    return row[key]


def _text(path: Path, where: str, row: Any, key: str, numbers: bool = False) -> str:
    value = _field(path, where, row, key)
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: {where}: field {key!r} must be a non-empty string, got {value!r:.80}")
    return value


def load_prompt_dataset(path: str | os.PathLike, prompt_key: str = "prompt", answer_key: str = "answer",
                        split: Optional[str] = None) -> list[dict[str, Any]]:
    """Rows {"prompt", "answer", ...other fields}; `split` picks one of a saved DatasetDict (default train)."""
    file, out = _open(path), []
    for where, row in _rows(file, split):
        prompt = _text(file, where, row, prompt_key)
        answer = _text(file, where, row, answer_key, numbers=True)
        out.append({**row, "prompt": prompt, "answer": answer})
    if not out:
        raise DataError(f"{file}: no rows")
    return out


def _messages(path: Path, where: str, row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}: {where}: field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{path}: {where}: field {field}.role must be one of {ROLES}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{path}: {where}: field {field}.content must be a string")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{path}: {where}: field messages[{len(messages) - 1}] must be the assistant's reply")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_sft_dataset(path: str | os.PathLike, prompt_key: str = "prompt", response_key: str = "response",
                     split: Optional[str] = None) -> list[dict[str, Any]]:
    """Rows {"prompt", "response"} or {"messages"}: whichever of the two the file's row holds."""
    file, out = _open(path), []
    for where, row in _rows(file, split):
        if isinstance(row, dict) and row.get("messages") is not None:
            out.append({"messages": _messages(file, where, row)})
        else:
            out.append({"prompt": _text(file, where, row, prompt_key),
                        "response": _text(file, where, row, response_key)})
    if not out:
        raise DataError(f"{file}: no rows")
    return out


def sft_texts(row: dict[str, Any], template) -> tuple[str, str]:
    """(prompt text, response text) of an SFT row: a prompt/response pair through `template` (a
    templates.py function); a conversation rendered in ChatML up to the last reply, which is the
    response, closed by <|im_end|> so the model learns to stop."""
    if "messages" in row:
        return render_chatml(row["messages"][:-1], add_generation_prompt=True), row["messages"][-1]["content"] + IM_END
    return template(row["prompt"]), row["response"]
