"""Where each task's data comes from: the hub, a local copy under `--data-dir`, or nowhere.

lm-eval task YAMLs name a hub data set (`dataset_path`, `dataset_name`). This module finds the
hub data sets behind the requested tasks *before any model is loaded*, so that an offline machine
gets one line naming what is missing, and it turns a local copy laid out as on the hub
(`DIR/<org>/<name>/<config>/<split>-00000-of-00001.parquet`, or `<split>.json[l]`) into an
absolute `dataset_path` override: lm-eval's own YAMLs are reused, only the data path changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iftune.errors import UserError

# `datasets` builders that read local files named in `dataset_kwargs`: nothing to fetch.
PACKAGED_BUILDERS = {"json", "parquet", "csv", "text", "arrow", "pandas"}
DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv", ".arrow")
# Mirrors get a stable path per local copy, so `datasets` reuses the arrow files it prepared.
# They live in the user's own cache: in a shared temp directory another user could plant links.
MIRRORS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iftune" / "data-mirrors"
# "test-00000-of-00001.parquet" -> "test"; "validation.jsonl" -> "validation"
SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)(-\d+-of-\d+)?\.(parquet|jsonl?|csv|arrow)$")


@dataclass
class HubData:
    """One hub data set needed by some tasks, and the tasks (and configs) that use it."""

    path: str
    configs: set[str | None] = field(default_factory=set)
    tasks: list[str] = field(default_factory=list)


def leaf_configs(index: dict[str, Any], name: str) -> list[tuple[str, dict]]:
    """(task name, raw YAML config) of every task under `name` (a task, group or tag)."""
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None:
        return []
    if entry.kind == Kind.TAG:
        return [leaf for task in sorted(entry.tags) for leaf in leaf_configs(index, task)]
    if entry.kind != Kind.GROUP:
        return [(name, entry.cfg or {})]
    leaves = []
    for item in _as_list(entry.cfg.get("task")):
        child = item if isinstance(item, str) else item.get("task", item.get("group"))
        if isinstance(child, str) and child in index:
            # a dict entry may override the referenced task's settings (its data path too)
            extra = {k: v for k, v in item.items() if k not in ("task", "group")} if isinstance(item, dict) else {}
            leaves += [(task, {**cfg, **extra}) for task, cfg in leaf_configs(index, child)]
        elif isinstance(item, dict):  # inline task defined inside the group file
            leaves.append((str(child), item))
    return leaves


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def hub_datasets(leaves: list[tuple[str, dict]]) -> dict[str, HubData]:
    """The hub data sets behind `leaves`; local files and packaged builders are left out."""
    needed: dict[str, HubData] = {}
    for task, cfg in leaves:
        path = cfg.get("dataset_path")
        if not isinstance(path, str) or cfg.get("custom_dataset") or _is_local(path):
            continue
        data = needed.setdefault(path, HubData(path))
        data.configs.add(cfg.get("dataset_name"))
        data.tasks.append(task)
    return needed


def _is_local(path: str) -> bool:
    return path in PACKAGED_BUILDERS or Path(path).expanduser().exists()


def hub_offline() -> bool:
    """True when the hub cannot be used: offline flags set, or huggingface.co unreachable."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def in_cache(path: str) -> bool:
    """A previous download of `path` (hub snapshot or `datasets` arrow cache) is on disk."""
    from datasets import config as ds_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    arrow = Path(ds_config.HF_DATASETS_CACHE) / path.replace("/", "___")
    return hub.is_dir() or arrow.is_dir()


def local_copy(data_dir: Path, path: str) -> Path | None:
    """`DIR/<org>/<name>` (as on the hub) or `DIR/<name>`, if present."""
    for candidate in (data_dir / path, data_dir / path.split("/")[-1]):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _example_layout(data: HubData) -> str:
    config = next((c for c in sorted(data.configs, key=str) if c), None)
    return (
        f"{data.path}/{config}/test-00000-of-00001.parquet"
        if config
        else f"{data.path}/data/test-00000-of-00001.parquet"
    )


def resolve_local_data(
    needed: dict[str, HubData], data_dir: Path | None, mirrors: Path | None = None
) -> dict[str, str]:
    """Map hub path -> absolute local `dataset_path` for every data set copied under `data_dir`.

    Raises UserError (one line) for data sets that are neither copied nor reachable.
    """
    overrides: dict[str, str] = {}
    missing: list[HubData] = []
    for path, data in needed.items():
        root = local_copy(data_dir, path) if data_dir else None
        if root is not None:
            overrides[path] = str(loadable_root(root, data, mirrors))
        elif not in_cache(path):
            missing.append(data)
    if missing and hub_offline():
        names = "; ".join(
            f"{d.path} (task {', '.join(sorted(set(d.tasks))[:3])}{', ...' if len(set(d.tasks)) > 3 else ''})"
            for d in missing
        )
        where = f"not under --data-dir {data_dir}" if data_dir else "not in the local cache"
        raise UserError(
            f"the hub is offline or unreachable and data set {names} is {where}; "
            f"pass --data-dir DIR with a copy laid out as on the hub "
            f"(e.g. DIR/{_example_layout(missing[0])})"
        )
    return overrides


def loadable_root(root: Path, data: HubData, mirrors: Path | None = None) -> Path:
    """A directory `datasets.load_dataset(dir, config)` can read for every config in `data`.

    A hub snapshot carries a README.md that declares its configs; a plain copy of the parquet
    folders does not, so we write that README into a mirror (symlinks to the copy's folders).
    """
    wanted = {c for c in data.configs if c}
    readme = root / "README.md"
    if readme.is_file() and all(f"config_name: {c}" in readme.read_text() for c in wanted):
        return root
    if wanted:
        folders = {c: root / c for c in sorted(wanted)}
    else:
        folders = {"default": root / "data" if (root / "data").is_dir() else root}
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    mirror = private_dir(mirrors or MIRRORS) / key / root.name
    mirror.mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:"]
    for config, folder in folders.items():
        splits = _split_files(folder, data)
        link_to(mirror / config, folder)
        lines.append(f"- config_name: {config}\n  data_files:")
        for split, names in sorted(splits.items()):
            lines.append(f"  - split: {split}\n    path:")
            lines += [f'    - "{config}/{name}"' for name in names]
    # write-then-rename: a concurrent run never reads half a README
    staging = mirror / f".README.{os.getpid()}"
    staging.write_text("\n".join(lines + ["---", ""]))
    staging.replace(mirror / "README.md")
    return mirror


def private_dir(path: Path) -> Path:
    """`path`, created if needed, checked to be a directory of this user that no one else can
    write in (otherwise someone could replace the links and have their data scored)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if (
        path.is_symlink()
        or not path.is_dir()
        or (hasattr(os, "getuid") and info.st_uid != os.getuid())
        or info.st_mode & 0o022
    ):
        raise UserError(
            f"{path}: the data mirrors' folder must be a directory of your own that others "
            f"cannot write in; remove it or set XDG_CACHE_HOME"
        )
    return path


def link_to(link: Path, target: Path) -> None:
    """Make `link` point to `target`, replacing a link that points anywhere else."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.exists() and not link.is_symlink():
        raise UserError(f"{link}: expected a link to {target}, found a real file or folder; remove it")
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target, target_is_directory=True)
    staging.replace(link)  # atomic: a concurrent run sees the old link or the new one


def _split_files(folder: Path, data: HubData) -> dict[str, list[str]]:
    """split -> names of its data files in `folder` (all shards, one format)."""
    if not folder.is_dir():
        raise UserError(
            f"--data-dir: expected folder {folder} for data set {data.path} "
            f"(files like {folder}/test-00000-of-00001.parquet)"
        )
    splits: dict[str, list[str]] = {}
    for file in sorted(folder.iterdir()):
        match = SPLIT_FILE.match(file.name)
        names = splits.setdefault(match["split"], []) if match else None
        # a split saved in two formats: keep the first format only
        if names is not None and (not names or Path(names[0]).suffix == file.suffix):
            names.append(file.name)
    if not splits:
        raise UserError(f"--data-dir: no data files ({', '.join(DATA_SUFFIXES)}) in {folder} for data set {data.path}")
    return splits
