"""The README's downstream examples run as written (Detection, Segmentation, Export)."""
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _example(section: str) -> str:
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    return code


@pytest.mark.parametrize("section", ["Detection", "Segmentation", "Export"])
def test_readme_example_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the export example writes its .onnx file to the working directory
    exec(compile(_example(section), f"README.md ({section})", "exec"), {"__name__": "readme"})
