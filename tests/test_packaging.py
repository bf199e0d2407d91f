"""The wheel must carry every subpackage and every config: an editable install would hide a gap."""
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapping = set(tool["packages"]), tool["package-dir"]
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            pkg = ".".join([name, *rel.parts]) if rel.parts else name
            if "__pycache__" not in init.parts:
                assert pkg in listed, f"{pkg} ({init.parent}) is missing from [tool.setuptools] packages"


def test_wheel_carries_every_module_and_config(tmp_path):
    """Build the wheel as pip would and look inside: every .py and .yaml must be there."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a clean copy: a stale build/ folder in the checkout would hide a gap
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", "data", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("zoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in mapping.items():
        for f in (src / folder).rglob("*"):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                inside = "/".join([*name.split("."), *f.relative_to(src / folder).parts])
                assert inside in names, f"{f.relative_to(src)} is not in the wheel (expected {inside})"
