"""List the packages of an environment (``pip freeze`` output) whose versions differ from constraints.txt.

    python scripts/deps/drift.py FREEZE.txt [constraints.txt]

Prints how many pinned packages moved and each ``name: locked -> installed``, then the packages the lock does not
pin (+) and the pinned ones the environment lacks (-). Exit status 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
NOT_PINNED = {"pip", "slowfast-llava"}  # the installer and the project itself


def pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line (comments and other lines ignored)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-e"):
            name, version = line.split("==", 1)
            if canonicalize_name(name) not in NOT_PINNED:
                found[canonicalize_name(name)] = version.strip()
    return found


def drift(installed: dict[str, str], locked: dict[str, str]) -> list[str]:
    moved = [(n, locked[n], installed[n]) for n in sorted(locked.keys() & installed.keys()) if locked[n] != installed[n]]
    lines = [f"{len(moved)} of {len(locked)} pinned packages differ from the lock, "
             f"{len(installed.keys() - locked.keys())} not pinned, {len(locked.keys() - installed.keys())} absent"]  # fmt: skip
    lines += [f"  {name}: {old} -> {new}" for name, old, new in moved]
    lines += [f"  + {name} {installed[name]}" for name in sorted(installed.keys() - locked.keys())]
    lines += [f"  - {name} {locked[name]}" for name in sorted(locked.keys() - installed.keys())]
    return lines


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    lock = Path(sys.argv[2]) if len(sys.argv) == 3 else ROOT / "constraints.txt"
    print("\n".join(drift(pins(Path(sys.argv[1])), pins(lock))))
