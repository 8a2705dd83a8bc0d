"""The core install (`pip install iftune`) trains without the studies' dependencies (the `studies`
extra: gymnasium, matplotlib); the study commands then say in one line what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from iftune import cli

STUDIES = ("gymnasium", "matplotlib")
# Imported at start-up (as `sitecustomize`, from PYTHONPATH): every finder answers "not found" for
# the studies' modules, which is what Python sees when they are not installed.
BLOCKER = f"""
import sys

HIDDEN = {STUDIES!r}


class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def blocker(tmp_path: Path) -> Path:
    folder = tmp_path / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return folder


def run(args: list[str], pythonpath: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_refusal(proc: subprocess.CompletedProcess, command: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"iftune {command}: error:") and "pip install 'iftune[studies]'" in lines[0]


def test_without_the_studies_extra_training_imports_and_demo_refuses(tmp_path):
    path = f"{blocker(tmp_path)}{os.pathsep}{ROOT / 'src'}"
    hidden = run([sys.executable, "-c", "import matplotlib"], path)
    assert hidden.returncode == 1 and "No module named 'matplotlib'" in hidden.stderr  # the blocker works
    proc = run([sys.executable, "-m", "iftune.cli", "demo"], path)
    assert_one_line_refusal(proc, "demo")
    assert "matplotlib" in proc.stderr
    # One process (TRL is slow to import): the library's names, then `iftune ift --help`.
    code = f"""
import sys
from iftune import IFTTrainer, ift_loss
from iftune.cli import main
try:
    main(["ift", "--help"])
except SystemExit as exit_:
    print("exit", exit_.code, sorted(set(sys.modules) & {set(STUDIES)}))
"""
    proc = run([sys.executable, "-c", code], path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--intuition" in proc.stdout and proc.stdout.strip().endswith("exit 0 []"), proc.stdout[-2000:]


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["frozenlake"], "gymnasium"),
        (["study", "--quick"], "matplotlib"),
        (["bench", "--plot", "sweep.png"], "matplotlib"),
        ([], "matplotlib"),  # no command runs the demo
    ],
)
def test_study_commands_name_the_extra(argv, missing, monkeypatch, capsys):
    for module in STUDIES:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    # Were the check to let the command through, it would fail at once instead of running a study.
    name = argv[0] if argv else "demo"
    monkeypatch.setitem(cli.COMMANDS, name, ("iftune.errors", "no_such_entry", ""))
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and missing in err[0] and "pip install 'iftune[studies]'" in err[0]
    assert out == ""  # not "running the demo" first


def test_bench_without_plot_and_help_need_no_extra(monkeypatch):
    for module in STUDIES:
        monkeypatch.setitem(sys.modules, module, None)
    assert cli.missing_extra("bench", ["--quick"]) == []
    assert cli.missing_extra("demo", ["--help"]) == []
    assert cli.missing_extra("ift", []) == []
    assert cli.missing_extra("frozenlake", []) == ["gymnasium", "matplotlib"]


@pytest.mark.slow
def test_core_wheel_in_a_fresh_venv_trains(tmp_path, tiny_model_dir, chat_file):
    """The built wheel, installed without dependencies in a new virtual environment that sees the
    test environment's packages (less gymnasium and matplotlib) through a .pth file."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "src"), str(source / "src")], check=True)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("iftune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in (
        "iftune/recipes/mistral-7b-ultrafeedback/ift.yaml",
        "iftune/recipes/accelerate/zero3.yaml",
        "iftune/recipes/chat_templates/zephyr.jinja",
        "iftune/demo/base_model/model.safetensors",
        "iftune/demo/base_model/chat_template.jinja",
        "iftune/tasks/arc_gen/arc_gen.yaml",
    ):
        assert data in names, f"{data} is not in the wheel"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not [line for line in core if any(m in line for m in STUDIES)], core

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], "").stdout.strip()
    # A plain path line: the shared packages are importable, their own .pth files (this checkout's
    # editable install among them) are not run.
    (Path(site) / "shared.pth").write_text(sysconfig.get_path("purelib") + "\n")
    path = str(blocker(tmp_path))
    installed = run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], path)
    assert installed.returncode == 0, installed.stderr[-2000:]

    where = run([str(python), "-c", "import iftune; from iftune import ift_loss; print(iftune.__file__)"], path)
    assert where.returncode == 0 and where.stdout.strip().startswith(site), where.stderr[-2000:]
    iftune = str(venv / "bin" / "iftune")
    assert_one_line_refusal(run([iftune, "demo"], path), "demo")
    out = tmp_path / "out"
    args = {"model_name_or_path": tiny_model_dir, "dataset_name": chat_file, "output_dir": out, "max_steps": 2,
            "per_device_train_batch_size": 2, "use_cpu": "true", "report_to": "none", "save_strategy": "no",
            "disable_tqdm": "true", "logging_steps": 1}  # fmt: skip
    trained = run([iftune, "ift", *[x for k, v in args.items() for x in (f"--{k}", str(v))]], path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert (out / "model.safetensors").is_file()
