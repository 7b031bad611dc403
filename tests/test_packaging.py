"""The set-up files agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _normalise(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = set(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        reqs |= {r for r in extra if not r.startswith("worldmodels")}
    return {_normalise(r) for r in reqs}


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    reqs = [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]
    return {_normalise(r) for r in reqs if r != "-e ."}


def test_environment_yml_installs_the_same_packages_as_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_python_version_agrees():
    assert "python=3.11" in (ROOT / "environment.yml").read_text()
    assert ">=3.11" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]


def test_makefile_installs_the_cpu_torch_wheel_first():
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("torch==2.13.0") < makefile.index("-e '.[dev]'")
