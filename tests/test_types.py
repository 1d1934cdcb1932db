"""The type check: mypy runs clean on the nas_dose package (skipped when mypy is not installed).

mypy cannot follow setup.cfg's package_dir (nas_dose.search_spaces is the top-level folder
search_spaces/, not nas_dose/search_spaces), so it checks a tree of links laid out like the
installed package, and the errors are reported at their source paths. The settings are in
setup.cfg's [mypy] sections; the cache (warm runs take seconds) and the link tree live in
.mypy_cache/.
"""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".mypy_cache"


def package_dirs() -> dict[str, Path]:
    """setup.cfg's package_dir: a package's dotted name -> its source folder."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["package_dir"].strip().splitlines()
    return {name.strip(): ROOT / folder.strip() for name, folder in (line.split("=") for line in lines)}


def link_tree(tree: Path, packages: dict[str, Path]) -> None:
    """Lays out `tree` like the installed packages: a folder per package, of links to the
    entries of its source folder (a parent package before the packages mapped into it)."""
    shutil.rmtree(tree, ignore_errors=True)
    for name, folder in sorted(packages.items()):
        path = tree.joinpath(*name.split("."))
        path.mkdir(parents=True)
        for entry in folder.iterdir():
            if entry.name != "__pycache__":
                (path / entry.name).symlink_to(entry)


def source_paths(report: str, packages: dict[str, Path]) -> str:
    """mypy's report with the link tree's paths (nas_dose/search_spaces/...) as source paths."""
    prefixes = sorted(((name.replace(".", "/") + "/", folder.relative_to(ROOT).as_posix() + "/")
                       for name, folder in packages.items()), reverse=True)
    lines = []
    for line in report.splitlines():
        for linked, source in prefixes:
            if line.startswith(linked):
                line = source + line[len(linked):]
                break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.slow
def test_mypy_clean():
    packages = package_dirs()
    tree = CACHE / "src"
    link_tree(tree, packages)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"), "--cache-dir", str(CACHE),
         "-p", "nas_dose"],
        cwd=tree, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, source_paths(run.stdout + run.stderr, packages)
