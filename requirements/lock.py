"""The lock file's bookkeeping: is requirements/lock.txt the lock of pyproject.toml, and is .venv that lock?

`make lock` has uv resolve pyproject.toml's ranges (extras dev + cluster, requirements/tools.in,
requirements/constraints.txt) into requirements/lock.txt, then `python requirements/lock.py stamp` writes a
digest of those inputs into its header. `make test` runs `check` (the digest still matches, and every direct
requirement is met by its pin: a dependency edited without `make lock` is one line naming it) and `env` (the
installed distributions are exactly the locked versions). Standard library only, plus `packaging` when present.

    python requirements/lock.py stamp|check|env [--allow NAME ...] [--report]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = HERE / "lock.txt"
EXTRAS = ("dev", "cluster")  # the extras `make install` installs; eightbit (bitsandbytes, CUDA) is not locked
DIGEST = re.compile(r"^# inputs-sha256: ([0-9a-f]{64})$", re.M)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)
# In a venv but never in a lock: the installer itself and the project (installed editable from the tree).
NOT_LOCKED = {"pip", "dreambench"}


def _requirement_lines(path: Path) -> list[str]:
    """Non-comment, non-blank lines of a requirements-style file, comments stripped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _direct_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(r for e in EXTRAS for r in extras.get(e, [])),
            *_requirement_lines(HERE / "tools.in")]


def inputs_digest() -> str:
    """SHA-256 of everything the lock is resolved from (comments and order of files aside)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project["dependencies"],
        "extras": {e: project.get("optional-dependencies", {}).get(e, []) for e in EXTRAS},
        "build-system": pyproject.get("build-system", {}).get("requires", []),
        "tools.in": _requirement_lines(HERE / "tools.in"),
        "constraints.txt": _requirement_lines(HERE / "constraints.txt"),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    return {_norm(name): version for name, version in PIN.findall(text)}


def stamp() -> None:
    """Write (or replace) the digest line at the end of the lock's leading comment block."""
    lines = [line for line in LOCK.read_text().splitlines(keepends=True) if not DIGEST.match(line.rstrip("\n"))]
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(at, f"# inputs-sha256: {inputs_digest()}\n")
    LOCK.write_text("".join(lines))


def check() -> list[str]:
    """Why the lock is not pyproject.toml's lock, one line each; empty when it is."""
    if not LOCK.is_file():
        return [f"{LOCK.relative_to(ROOT)} is missing: run `make lock`"]
    text = LOCK.read_text()
    locked = pins(text)
    problems = []
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare interpreter: the digest alone decides
        Requirement = None  # noqa: N806
    if Requirement is not None:
        for line in _direct_requirements():
            req = Requirement(line)
            have = locked.get(_norm(req.name))
            if have is None:
                problems.append(f"{req} is required but not in the lock")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{req} is required but the lock has {req.name}=={have}")
    found = DIGEST.search(text)
    if not problems and (found is None or found.group(1) != inputs_digest()):
        problems.append("pyproject.toml's dependencies (or requirements/*.in, constraints.txt) changed since "
                        "the lock was made")
    return problems


def env(allow: set[str]) -> tuple[list[str], list[str]]:
    """How the running interpreter's distributions differ from the lock: (locked ones at another version or
    missing, ones the lock does not have)."""
    locked = pins(LOCK.read_text())
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    diffs = [f"{name} {installed.get(name, 'missing')} (locked {version})"
             for name, version in sorted(locked.items()) if name not in allow and installed.get(name) != version]
    extra = [f"{name} {installed[name]}" for name in sorted(set(installed) - set(locked) - NOT_LOCKED - allow)]
    return diffs, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["stamp", "check", "env"])
    parser.add_argument("--allow", nargs="*", default=[], help="distributions `env` does not compare (TORCH=...)")
    parser.add_argument("--report", action="store_true", help="`env`: list the differences, never fail")
    args = parser.parse_args(argv)
    if args.command == "stamp":
        stamp()
        return 0
    if args.command == "check":
        problems = check()
        if problems:
            print(f"lock: requirements/lock.txt is out of date: {'; '.join(problems)}: run `make lock`",
                  file=sys.stderr)
        return 1 if problems else 0
    diffs, extra = env({_norm(a) for a in args.allow if a})
    if args.report:
        print(f"{sys.prefix} against requirements/lock.txt:", "; ".join(diffs + [f"{e} (not locked)" for e in extra])
              or "the same versions")
        return 0
    if extra:
        print(f"lock: warning: {sys.prefix} also has packages the lock does not: {', '.join(extra)}", file=sys.stderr)
    if diffs:
        print(f"lock: {sys.prefix} is not the locked set ({'; '.join(diffs)}): run `make install`", file=sys.stderr)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
