"""Prints the project's runtime requirements from pyproject.toml, one a line, less the excluded ones.

The GPU image installs Meta's faiss-gpu wheel instead of faiss-cpu (two faiss wheels in one environment
overwrite each other's ``faiss`` package), so it installs these requirements and then the project with
``--no-deps``; pyproject.toml stays the one list of dependencies.

    python project_requirements.py [--extra serve] [--exclude faiss-cpu] [pyproject.toml]
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def distribution_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str], exclude: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject} has no extra {extra!r} (it has: {', '.join(optional)})")
        wanted += optional[extra]
    excluded = {distribution_name(name) for name in exclude}
    return [req for req in wanted if distribution_name(req) not in excluded]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group")
    parser.add_argument("--exclude", action="append", default=[], help="a distribution to leave out")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.extra, args.exclude)))


if __name__ == "__main__":
    main()
