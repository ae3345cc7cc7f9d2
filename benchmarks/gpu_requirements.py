#!/usr/bin/env python
"""Which of the packages a script needs are missing or at a version setup.py does not allow, in this Python.

    python benchmarks/gpu_requirements.py NAME [NAME ...]     # prints the unmet ones, one per line; exit 0 either way

The version ranges are setup.py's (``INSTALL_REQUIRES`` and ``EXAMPLES``), read without running setup.py, so
benchmarks/gpu_multi30k.sh can tell, before installing anything, whether the device image already has what the
translation example needs and what must come from the carried wheels (benchmarks/fetch_gpu_wheels.sh).
"""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LISTS = ("INSTALL_REQUIRES", "EXAMPLES")


def setup_requirements(setup_py: Path = ROOT / "setup.py") -> dict[str, Requirement]:
    """{canonical name: requirement} from the literal lists ``INSTALL_REQUIRES`` and ``EXAMPLES`` of setup.py."""
    found: dict[str, Requirement] = {}
    for node in ast.parse(setup_py.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in LISTS for t in node.targets):
            for text in ast.literal_eval(node.value):
                req = Requirement(text)
                found[canonicalize_name(req.name)] = req
    return found


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet(names: list[str], requirements: dict[str, Requirement],
          version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """'name (missing)' or 'name X (needs SPEC)' for each name whose installed version is absent or out of range."""
    out = []
    for name in names:
        key = canonicalize_name(name)
        if key not in requirements:
            raise KeyError(f"{name!r} is not in setup.py's {' / '.join(LISTS)} (found: {', '.join(sorted(requirements))})")
        req, version = requirements[key], version_of(name)
        if version is None:
            out.append(f"{req.name} (missing)")
        elif not req.specifier.contains(version, prereleases=True):
            out.append(f"{req.name} {version} (needs {req.specifier})")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: gpu_requirements.py NAME [NAME ...]", file=sys.stderr)
        return 2
    try:
        problems = unmet(argv, setup_requirements())
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
