"""The `iftune` command: one subcommand per module, imported only when it is used.

Each entry point is `main(argv: list[str]) -> int`; the training methods share
`iftune.train.run(method, argv)`. A user mistake raises `UserError`;
it is printed as one line (no traceback) and the command exits with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from importlib import metadata

from iftune.arguments import METHOD_HELP
from iftune.errors import UserError

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "ift": ("iftune.train", "run", METHOD_HELP["ift"]),
    "sft": ("iftune.train", "run", METHOD_HELP["sft"]),
    "dpo": ("iftune.train", "run", METHOD_HELP["dpo"]),
    "orpo": ("iftune.train", "run", METHOD_HELP["orpo"]),
    "recipes": ("iftune.train", "recipes_main", "list the shipped recipes, or print one's full path"),
    "demo": ("iftune.demo", "main", "offline IFT vs SFT study on a tiny model (the default)"),
    "frozenlake": ("iftune.frozenlake.cli", "main", "the paper's Frozen Lake study"),
    "study": ("iftune.study", "main", "does IFT help? every method, several bases and seeds, 95% intervals"),
    "eval": ("iftune.evaluation", "main", "benchmarks through lm-evaluation-harness"),
    "generate": ("iftune.evaluation", "generate_main", "AlpacaEval-ready generations"),
    "bench": ("iftune.benchmarks.command", "main", "time and memory of IFT vs SFT, DPO, ORPO"),
}
# What the studies import beyond training (the `studies` extra), imported only once they run.
STUDIES_EXTRA: dict[str, tuple[str, ...]] = {
    "demo": ("matplotlib",),
    "study": ("matplotlib",),
    "frozenlake": ("gymnasium", "matplotlib"),
}
# Commands parsed by TRL's parser, which spells flags with underscores (and accepts dashes);
# the others use argparse with dashes, and are given underscores as dashes.
TRAINING = ("ift", "sft", "dpo", "orpo")


def usage() -> str:
    lines = ["usage: iftune <command> [options]   (iftune <command> --help for its options)", ""]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "With no command, `iftune` runs the demo."]
    return "\n".join(lines)


def version() -> str:
    """`iftune X (python, torch, transformers, trl versions)`: what a bug report needs."""
    from iftune import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "trl", "peft"))
    return f"iftune {__version__} (python {platform.python_version()}, {deps})"


def missing_extra(name: str, argv: list[str]) -> list[str]:
    """The modules of the `studies` extra that command `name` needs with `argv` and cannot import."""
    if any(arg in ("-h", "--help") for arg in argv):
        return []
    needs = STUDIES_EXTRA.get(name, ())
    if name == "bench" and any(arg == "--plot" or arg.startswith("--plot=") for arg in argv):
        needs = ("matplotlib",)
    return [module for module in needs if not importable(module)]


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
        return False


def dashed(argv: list[str]) -> list[str]:
    """`--output_dir x` as `--output-dir x` (up to a `--`), so both spellings work everywhere."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, sep, value = arg.partition("=")
            out[i] = flag.replace("_", "-") + sep + value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version", "version"):
        print(version())
        return 0
    default = not argv
    name, argv = ("demo", []) if default else (argv[0], argv[1:])
    if name not in COMMANDS:
        print(f"iftune: unknown command '{name}'; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if name not in TRAINING:
        argv = dashed(argv)
    missing = missing_extra(name, argv)
    if missing:
        print(
            f"iftune {name}: error: needs {' and '.join(missing)}, which training does not install: "
            f"pip install 'iftune[studies]'",
            file=sys.stderr,
        )
        return 2
    if default:
        print(
            "iftune: no command given, running the demo (IFT vs SFT on a tiny offline model); "
            "train your own model with `iftune ift --model_name_or_path M --dataset_name D`."
        )
    try:
        entry = getattr(importlib.import_module(module), func)
        return int((entry(name, argv) if name in TRAINING else entry(argv)) or 0)
    except UserError as err:
        print(f"iftune {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
