"""Loading and checking training data: hub ids or local files, mixtures, one format per method.

SFT and IFT train on SFT-format data; a preference set (`prompt`/`chosen`/`rejected`) given
to them trains on `chosen`, as the paper does. DPO and ORPO need the preference triple.
Every problem is reported as one line naming the source, the row and the field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_dataset

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
        if fmt == "json":
            _check_json(path)
        return load_dataset(fmt, data_files=str(path), split="train")
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
        raise UserError(f"dataset '{source}' could not be loaded: not a local path, and the hub gave: "
                        f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _check_json(path: Path) -> None:
    """datasets' JSON errors name neither the file nor the line: check first."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path}:{number}: malformed JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


# ---------------------------------------------------------------- formats


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _as_turns(value: Any, role: str) -> list[dict]:
    return value if _is_messages(value) else [{"role": role, "content": value}]


def to_sft_row(row: dict, where: str) -> dict:
    """One row in SFTTrainer's terms: {'messages'}, {'prompt', 'completion'} or {'text'}."""
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not _is_messages(msgs) or not msgs:
            raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in msgs):
            raise UserError(f"{where}: field 'messages' has no non-empty assistant turn to train on")
        return {"messages": msgs}
    target = "chosen" if "chosen" in row else "completion" if "completion" in row else None
    if target is not None:
        answer = row[target]
        if answer is None or (isinstance(answer, str) and not answer.strip()) or answer == []:
            raise UserError(f"{where}: field '{target}' is empty")
        prompt = row.get("prompt")
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
            raise UserError(f"{where}: field 'text' must be a non-empty string")
        return {"text": row["text"]}
    raise UserError(f"{where}: no training fields; expected 'messages', 'prompt'+'completion', "
                    f"'prompt'+'chosen'(+'rejected') or 'text', got {sorted(row)}")


def to_preference_row(row: dict, where: str) -> dict:
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if value is None or value == "" or value == []:
            raise UserError(f"{where}: field '{key}' is missing or empty (DPO/ORPO need prompt, chosen, rejected)")
    out = {"chosen": row["chosen"], "rejected": row["rejected"]}
    implicit = _is_messages(row["chosen"]) and row["chosen"][0]["role"] != "assistant"
    if row.get("prompt") is not None and not implicit:  # an implicit prompt is extracted by TRL
        out["prompt"] = row["prompt"]
    elif not _is_messages(row["chosen"]):
        raise UserError(f"{where}: field 'prompt' is missing (needed when chosen/rejected are plain text)")
    return out


def prepare(dataset: Dataset, method: str, name: str) -> Dataset:
    """Check every row and convert it to the method's format (one line per error)."""
    convert = to_preference_row if method in PREFERENCE_METHODS else to_sft_row
    rows = [convert(row, f"{name}: row {i + 1}") for i, row in enumerate(dataset)]
    if not rows:
        raise UserError(f"{name}: the dataset is empty")
    keys = {tuple(sorted(r)) for r in rows}
    if len(keys) > 1:
        raise UserError(f"{name}: rows mix formats {sorted(keys)}; use one format per dataset")
    return Dataset.from_list(rows)


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
            raise UserError(f"{name} has {len(values)} values for {len(sources)} datasets; give one, or one per dataset")
    parts = []
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


__all__ = ["load_source", "load_training_data", "prepare", "to_preference_row", "to_sft_row"]
