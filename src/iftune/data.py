"""Loading and checking training data: hub ids or local files, mixtures, one format per method.

SFT and IFT train on SFT-format data; a preference set (`prompt`/`chosen`/`rejected`) given
to them trains on `chosen`, as the paper does. DPO and ORPO need the preference triple.
Every problem is reported as one line naming the source, the row and the field.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, concatenate_datasets, load_dataset
from datasets.utils import logging as ds_logging

from iftune.errors import UserError

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PREFERENCE_METHODS = ("dpo", "orpo")


def load_source(source: str, split: str = "train", config: str | None = None) -> Dataset:
    """One data source: a local .jsonl/.json/.parquet file, a local folder, or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise UserError(f"{source}: unsupported file type '{path.suffix}'; expected .jsonl, .json or .parquet")
        if path.stat().st_size == 0:
            raise UserError(f"{source}: the file is empty")
        if fmt == "json":
            check_utf8(path)
        try:
            with quiet_datasets():
                return load_dataset(fmt, data_files=str(path), split="train")
        except Exception as err:  # datasets' errors name neither the file nor the line
            if fmt == "json":
                diagnose_json(path)
            raise UserError(f"{source}: cannot be read as {fmt} ({_first_line(err)})") from None
    if path.is_dir():
        try:
            return load_dataset(str(path), name=config, split=split)
        except Exception as err:  # datasets raises many types for a bad folder
            raise UserError(f"{source}: cannot read the folder as a dataset ({_first_line(err)})") from None
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_FORMATS:
        raise UserError(f"{source}: no such file or folder")
    try:
        return load_dataset(source, name=config, split=split)
    except Exception as err:
        raise UserError(
            f"dataset '{source}' could not be loaded: not a local path, and the hub gave: {_first_line(err)}"
        ) from None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hold back the error `datasets` logs before it raises: the user gets our one line instead."""
    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_utf8(path: Path, block: int = 1 << 24) -> None:
    """The file decodes as UTF-8 (a leading BOM is fine): checked in blocks at C speed; the line
    of the first bad byte is found only when there is one."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines = 0
    with path.open("rb") as fh:
        while chunk := fh.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line = lines + err.object[: err.start].count(b"\n") + 1
                raise UserError(
                    f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the file as UTF-8"
                ) from None
            lines += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path}:{lines + 1}: not UTF-8 text (the file ends inside a character)") from None


def diagnose_json(path: Path) -> None:
    """Raise one line naming the line of `path` that `datasets` could not read; returns when no
    single line is to blame."""
    if path.suffix.lower() != ".jsonl":
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if rows == [] or rows == {}:
            raise UserError(f"{path}: no rows (the file holds an empty {type(rows).__name__})")
        return
    rows = 0
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {_kind(row)}")
    if rows == 0:
        raise UserError(f"{path}: no rows (the file holds only blank lines)")


# ---------------------------------------------------------------- formats


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _as_turns(value: Any, role: str) -> list[dict]:
    return value if _is_messages(value) else [{"role": role, "content": value}]


def _kind(value: Any) -> str:
    """`value`'s JSON type, as a user reads it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def check_field(row: dict, key: str, where: str) -> None:
    """`row[key]` is a string or a list of messages whose 'role' and 'content' are strings."""
    value = row[key]
    if isinstance(value, str):
        return
    if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        raise UserError(
            f"{where}: field '{key}' must be a string or a list of {{role, content}} messages, got {_kind(value)}"
        )
    for number, message in enumerate(value, 1):
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise UserError(
                    f"{where}: field '{key}', message {number}: '{part}' must be a string, "
                    f"got {_kind(message.get(part)) if part in message else 'nothing'}"
                )


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def to_sft_row(row: dict, where: str) -> dict:
    """One row in SFTTrainer's terms: {'messages'}, {'prompt', 'completion'} or {'text'}."""
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        check_field(row, "messages", where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise UserError(f"{where}: field 'messages' has no non-empty assistant turn to train on")
        return {"messages": msgs}
    target = "chosen" if "chosen" in row else "completion" if "completion" in row else None
    if target is not None:
        answer = row[target]
        if _empty(answer):
            raise UserError(f"{where}: field '{target}' is empty")
        check_field(row, target, where)
        prompt = row.get("prompt")
        if prompt is not None:
            check_field(row, "prompt", where)
        if _is_messages(answer) or _is_messages(prompt):
            turns = _as_turns(answer, "assistant")
            if turns[0]["role"] == "assistant":  # explicit prompt; otherwise it is the conversation's start
                if prompt is None:
                    raise UserError(f"{where}: field 'prompt' is missing (needed with '{target}')")
                turns = _as_turns(prompt, "user") + turns
            return to_sft_row({"messages": turns}, where)
        if prompt is None:
            raise UserError(f"{where}: field 'prompt' is missing (needed with '{target}')")
        return {"prompt": prompt, "completion": answer}
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"{where}: field 'text' must be a non-empty string, got {_kind(row['text'])}")
        return {"text": row["text"]}
    raise UserError(
        f"{where}: no training fields; expected 'messages', 'prompt'+'completion', "
        f"'prompt'+'chosen'(+'rejected') or 'text', got {sorted(row)}"
    )


def to_preference_row(row: dict, where: str) -> dict:
    """One row in DPOTrainer's terms: {'prompt', 'chosen', 'rejected'}, or without 'prompt'
    when chosen/rejected are conversations that start with it."""
    for key in ("chosen", "rejected"):
        if _empty(row.get(key)):
            raise UserError(f"{where}: field '{key}' is missing or empty (DPO/ORPO need prompt, chosen, rejected)")
        check_field(row, key, where)
    out = {"chosen": row["chosen"], "rejected": row["rejected"]}
    implicit = _is_messages(row["chosen"]) and row["chosen"][0]["role"] != "assistant"
    if row.get("prompt") is not None and not implicit:  # an implicit prompt is extracted by TRL
        check_field(row, "prompt", where)
        out["prompt"] = row["prompt"]
    elif not _is_messages(row["chosen"]):
        raise UserError(f"{where}: field 'prompt' is missing (needed when chosen/rejected are plain text)")
    return out


def _convert(row: dict, index: int, convert: Callable[[dict, str], dict], name: str, keys: list[str]) -> dict:
    """`Dataset.map` function: row `index` in the method's format, with the same fields as row 1."""
    out = convert(row, f"{name}: row {index + 1}")
    if sorted(out) != keys:
        raise UserError(
            f"{name}: row {index + 1} has fields {sorted(out)} but row 1 has {keys}; use one format per dataset"
        )
    return out


def prepare(dataset: Dataset, method: str, name: str) -> Dataset:
    """Check every row and convert it to the method's format (one line per error).

    Runs as a `Dataset.map`, so the result is cached beside the source's arrow files: a second
    run, or the other processes of a distributed run (see `load_training_data`), reuse it.
    """
    if len(dataset) == 0:
        raise UserError(f"{name}: the dataset is empty")
    convert = to_preference_row if method in PREFERENCE_METHODS else to_sft_row
    keys = sorted(convert(dataset[0], f"{name}: row 1"))
    return dataset.map(
        _convert,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"convert": convert, "name": name, "keys": keys},
        desc=f"Checking {Path(name).name}",
    )


def load_training_data(
    sources: list[str],
    method: str,
    num_samples: list[int] | None = None,
    split: str | list[str] = "train",
    config: str | None = None,
    seed: int = 42,
) -> Dataset:
    """Load, check, convert and mix `sources`; `num_samples[i]` rows are drawn from source i
    (seeded; -1 = all), e.g. UltraFeedback plus 60k UltraChat as in the paper."""
    counts = list(num_samples or [])
    splits = [split] if isinstance(split, str) else list(split)
    for name, values in (("dataset_num_samples", counts), ("dataset_train_split", splits)):
        if len(values) > 1 and len(values) != len(sources):
            raise UserError(
                f"{name} has {len(values)} values for {len(sources)} datasets; give one, or one per dataset"
            )
    parts = []
    # The first process of each machine loads and converts; the others then read its cache.
    with PartialState().local_main_process_first():
        for i, source in enumerate(sources):
            data = prepare(load_source(source, splits[i] if len(splits) > 1 else splits[0], config), method, source)
            n = counts[i] if len(counts) > 1 else counts[0] if counts else -1
            if n >= 0:
                if n > len(data):
                    raise UserError(f"{source}: dataset_num_samples={n} but the dataset has {len(data)} rows")
                data = data.shuffle(seed=seed).select(range(n))
            parts.append(data)
    keys = {tuple(sorted(p.column_names)) for p in parts}
    if len(keys) > 1:
        raise UserError(f"datasets {sources} have different formats {sorted(keys)}; convert them to one format")
    mixed = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    logger.info("training data: %d rows from %d source(s)", len(mixed), len(parts))
    return mixed


__all__ = [
    "check_field",
    "check_utf8",
    "diagnose_json",
    "load_source",
    "load_training_data",
    "prepare",
    "to_preference_row",
    "to_sft_row",
]
