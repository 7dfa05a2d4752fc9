"""Dataset files: the same rows from jsonl, json, parquet (written by pyarrow) and a `datasets`
directory (written by datasets.save_to_disk); malformed rows fail naming file, row and field."""

import json
import re

import pytest

from r1mega.data.datasets import DataError, load_prompt_dataset, load_sft_dataset, sft_texts
from r1mega.data.templates import render_r1_zero

ROWS = [{"question": "Compute 1 + 2", "solution": "3", "level": 1},
        {"question": "Compute 4 * 5", "solution": 20, "level": 2}]
EXPECTED = [{"question": "Compute 1 + 2", "solution": "3", "level": 1, "prompt": "Compute 1 + 2", "answer": "3"},
            {"question": "Compute 4 * 5", "solution": 20, "level": 2, "prompt": "Compute 4 * 5", "answer": "20"}]


def write_jsonl(path, rows, blank_line=False):
    lines = [json.dumps(r) for r in rows]
    if blank_line:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_json_parquet_and_datasets_dir_agree(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    rows = [dict(r, solution=str(r["solution"])) for r in ROWS]  # one column type for the columnar formats
    files = [write_jsonl(tmp_path / "a.jsonl", ROWS, blank_line=True), tmp_path / "a.json", tmp_path / "a.parquet",
             tmp_path / "saved", tmp_path / "saved_dict"]
    files[1].write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(rows), files[2])
    datasets.Dataset.from_list(rows).save_to_disk(str(files[3]))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(files[4]))
    for file in files[:2]:
        assert load_prompt_dataset(file, prompt_key="question", answer_key="solution") == EXPECTED
    for file in files[2:4]:
        got = load_prompt_dataset(file, prompt_key="question", answer_key="solution")
        assert [(r["prompt"], r["answer"], r["level"]) for r in got] == [(r["prompt"], r["answer"], r["level"])
                                                                      for r in EXPECTED]
    assert [r["answer"] for r in load_prompt_dataset(files[4], "question", "solution")] == ["3"]
    assert [r["answer"] for r in load_prompt_dataset(files[4], "question", "solution", split="test")] == ["20"]
    with pytest.raises(DataError, match=r"saved_dict: no split 'dev'; it has \['test', 'train'\]"):
        load_prompt_dataset(files[4], "question", "solution", split="dev")


@pytest.mark.parametrize("rows,where,message", [
    ([ROWS[0], {"question": "x"}], "line 2", r"missing field 'solution' \(fields: \['question'\]\)"),
    ([ROWS[0], ROWS[1], {"question": "", "solution": "1"}], "line 3", "field 'question' must be a non-empty string"),
    ([{"question": ["a"], "solution": "1"}], "line 1", "field 'question' must be a non-empty string"),
    ([ROWS[0], {"question": "x", "solution": None}], "line 2", "missing field 'solution'"),
    ([ROWS[0], [1, 2]], "line 2", "expected an object, got list"),
])
def test_malformed_prompt_rows_name_file_row_field(tmp_path, rows, where, message):
    file = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(file))}: {where}: {message}"):
        load_prompt_dataset(file, prompt_key="question", answer_key="solution")


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: line 2: not valid JSON"):
        load_prompt_dataset(bad)
    parquet = tmp_path / "fake.parquet"
    parquet.write_text("not parquet")
    with pytest.raises(DataError, match=rf"{re.escape(str(parquet))}: not a readable Parquet file"):
        load_prompt_dataset(parquet)
    json_file = tmp_path / "x.json"
    json_file.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(DataError, match=rf"{re.escape(str(json_file))}: expected a JSON list"):
        load_prompt_dataset(json_file)
    json_file.write_text(json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]))
    with pytest.raises(DataError, match=rf"{re.escape(str(json_file))}: row 2: missing field 'answer'"):
        load_prompt_dataset(json_file)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: no rows"):
        load_prompt_dataset(empty)
    with pytest.raises(DataError, match=r"unknown format '\.csv'"):
        (tmp_path / "a.csv").write_text("prompt,answer\n")
        load_prompt_dataset(tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_prompt_dataset(tmp_path / "missing.jsonl")


def test_sft_pairs_and_conversations(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}]
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Compute 1 + 1", "response": "<think> 2 </think>"},
                                                {"messages": conversation}])
    rows = load_sft_dataset(file)
    assert rows == [{"prompt": "Compute 1 + 1", "response": "<think> 2 </think>"}, {"messages": conversation}]
    assert sft_texts(rows[0], render_r1_zero) == (render_r1_zero("Compute 1 + 1"), "<think> 2 </think>")
    prompt, response = sft_texts(rows[1], render_r1_zero)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert response == "4<|im_end|>"


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"field messages\[1\]\.role must be one of"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"field messages\[0\] must be the assistant's reply"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
     r"field messages\[0\]\.content must be a string"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"prompt": "a"}, "missing field 'response'"),
])
def test_malformed_sft_rows(tmp_path, row, message):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(DataError, match=rf"{re.escape(str(file))}: line 2: {message}"):
        load_sft_dataset(file)
