"""Print ``name==version`` pip constraints that hold the named packages at the lower bound of their range in
pyproject.toml (its ``>=`` or ``==`` clause), for the CI lane that checks the oldest releases the ranges admit.

    python scripts/deps/lower_bounds.py transformers av > oldest.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def lower_bounds(names: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """One ``name==version`` line per name, in the order given. Raises ``SystemExit`` naming a package that
    pyproject.toml's dependencies do not list, or list without a lower bound."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [Requirement(line) for line in extra]
    lines = []
    for name in names:
        found = [r for r in requirements if canonicalize_name(r.name) == canonicalize_name(name)]
        if not found:
            raise SystemExit(f"{name} is not a dependency in {pyproject}")
        bounds = [s.version for r in found for s in r.specifier if s.operator in (">=", "==", "~=")]
        if not bounds:
            raise SystemExit(f"{name} has no lower bound in {pyproject} ({', '.join(map(str, found))})")
        lines.append(f"{name}=={max(bounds, key=Version)}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(lower_bounds(sys.argv[1:])))
