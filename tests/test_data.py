"""Training data: every malformed file or row is one line naming the file, line or row and field;
the conversion runs as a cached `Dataset.map`."""

from __future__ import annotations

import json
import os

import pytest

from conftest import conversations, write_jsonl
from iftune import cli
from iftune.data import load_training_data

GOOD = {"prompt": "the sky is", "completion": "blue"}


def line(row: dict) -> bytes:
    return (json.dumps(row) + "\n").encode()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow files and map caches go to this test's folder, not the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.mark.parametrize(
    "name,content,fragments",
    [
        ("empty.jsonl", b"", ["empty.jsonl", "the file is empty"]),
        ("blank.jsonl", b"\n  \n\n", ["blank.jsonl", "no rows", "blank lines"]),
        (
            "latin1.jsonl",
            line(GOOD) + line(GOOD) + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"),
            ["latin1.jsonl:3", "not UTF-8", "0xe9"],
        ),
        (
            "number.jsonl",
            line(GOOD) + line({"prompt": "two plus two", "completion": 42}),
            ["number.jsonl: row 2", "field 'completion'", "got number 42"],
        ),
        (
            "null.jsonl",
            line({"messages": [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": None}]}),
            ["null.jsonl: row 1", "field 'messages', message 2", "'content' must be a string, got null"],
        ),
        ("empty-list.json", b"[]", ["empty-list.json", "no rows"]),
        ("object-line.jsonl", line(GOOD) + b'["a", "b"]\n', ["object-line.jsonl:2", "expected a JSON object"]),
    ],
)
def test_bad_file_is_one_line(capsys, tiny_model_dir, tmp_path, name, content, fragments):
    data = tmp_path / name
    data.write_bytes(content)
    code = cli.main(
        [
            "ift",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert all(f in last for f in fragments), last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "row,fragments",
    [
        ({"prompt": "a", "chosen": "b", "rejected": 7}, ["row 1", "field 'rejected'", "got number 7"]),
        (
            {"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"},
            ["field 'chosen', message 1", "'content'"],
        ),
    ],
)
def test_bad_preference_rows(tmp_path, row, fragments):
    from iftune.errors import UserError

    with pytest.raises(UserError) as err:
        load_training_data([str(write_jsonl(tmp_path / "p.jsonl", [row]))], "dpo")
    assert all(f in str(err.value) for f in fragments), err.value


def test_utf8_bom_is_accepted(tmp_path):
    rows = conversations(4)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_training_data([str(bom)], "ift")[:] == load_training_data([str(plain)], "ift")[:]


def test_conversion_is_a_cached_map(tmp_path):
    """The second load reads the converted rows from the cache `Dataset.map` wrote (what the
    other processes of a distributed run do after the first one): the cache file is not
    written again (a recomputation writes a new file over it), and the rows are the same."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    first = load_training_data([str(data)], "sft")
    (cache,) = {f["filename"] for f in first.cache_files}
    assert cache.startswith(str(tmp_path / "datasets-cache")) and "cache-" in cache
    stamp = os.stat(cache).st_ino, os.stat(cache).st_mtime_ns
    second = load_training_data([str(data)], "sft")
    assert {f["filename"] for f in second.cache_files} == {cache}
    assert (os.stat(cache).st_ino, os.stat(cache).st_mtime_ns) == stamp
    assert second[:] == first[:] == {"messages": [r["messages"] for r in conversations(8)]}
