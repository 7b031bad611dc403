"""The book's API reference (book/api.md) documents every module of the package."""

import pkgutil
import re
from pathlib import Path

import worldmodels

API_PAGE = Path(__file__).resolve().parents[1] / "book" / "api.md"


def test_every_module_of_the_package_has_its_section_in_the_api_reference():
    modules = {
        info.name
        for info in pkgutil.walk_packages(worldmodels.__path__, "worldmodels.")
        if not info.name.endswith("__main__")
    }
    documented = set(re.findall(r"^\.\. automodule:: (\S+)$", API_PAGE.read_text(), re.MULTILINE))
    assert "worldmodels.config.sections" in modules  # the walk reaches sub-packages
    assert sorted(modules - documented) == []
    assert sorted(documented - modules) == []
