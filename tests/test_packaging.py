"""The package list of pyproject.toml names every package folder, so an install ships them all."""
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_folders() -> set:
    """Every folder with an ``__init__.py`` under rgkern/ and kernels/, as its package name."""
    names = set()
    for top, package in ((ROOT / "rgkern", "rgkern"), (ROOT / "kernels", "rgkern.kernels")):
        for init in top.rglob("__init__.py"):
            names.add(".".join([package, *init.parent.relative_to(top).parts]))
    return names


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == package_folders()
    assert config["package-dir"] == {"rgkern": "rgkern", "rgkern.kernels": "kernels"}


def test_the_check_sees_a_missing_package(tmp_path):
    """The comparison above fails when a folder is added and not listed."""
    assert "rgkern.kernels.coupling" in package_folders()
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed - {"rgkern.kernels.coupling"} != package_folders()
