"""requirements/lock.py: the lock is pyproject.toml's, an edited dependency is named, and an installed set that
is not the lock is named (what `make test` checks before the suite runs)."""

from __future__ import annotations

import importlib.util
import shutil
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(root: Path):
    """requirements/lock.py as a module reading the pyproject.toml and requirements/ under `root`."""
    spec = importlib.util.spec_from_file_location(f"lock_{abs(hash(root))}", root / "requirements" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def copy(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_committed_lock_is_pyprojects_lock():
    lock = _load(REPO)
    assert lock.check() == []
    pinned = lock.pins(lock.LOCK.read_text())
    # The pins the issue cares about, and the known break kept out: transformers >= 5.24 needs peft >= 0.22.
    assert pinned["torch"].endswith("+cpu")
    assert tuple(int(x) for x in pinned["transformers"].split(".")[:2]) < (5, 24)
    for name in ("diffusers", "peft", "lightning", "optuna", "wandb", "hydra-core", "psycopg", "uv", "setuptools"):
        assert name in pinned
    # Every pin carries a hash (pip installs it with --require-hashes).
    blocks = lock.LOCK.read_text().split("\n")
    for i, line in enumerate(blocks):
        if lock.PIN.match(line):
            assert blocks[i + 1].strip().startswith("--hash=sha256:"), line


def test_a_dependency_edited_without_make_lock_is_named(copy):
    lock = _load(copy)
    assert lock.check() == []
    _edit(copy / "pyproject.toml", '"transformers>=4.50,<5.24"', '"transformers>=5.24,<6"')
    assert any("transformers<6,>=5.24 is required but the lock has transformers==" in p for p in lock.check())

    _edit(copy / "pyproject.toml", '"tqdm",', '"tqdm",\n  "rich-but-not-locked>=1",')
    assert any("rich-but-not-locked>=1 is required but not in the lock" in p for p in lock.check())


def test_a_range_the_lock_still_meets_is_caught_by_the_digest_and_stamp_settles_it(copy):
    lock = _load(copy)
    _edit(copy / "pyproject.toml", '"optuna>=4.0"', '"optuna>=4.1"')  # 5.x still meets it: only the digest sees it
    assert lock.check() == ["pyproject.toml's dependencies (or requirements/*.in, constraints.txt) changed since "
                            "the lock was made"]
    lock.stamp()  # what `make lock` does after uv has resolved
    assert lock.check() == []
    # Comments and blank lines are not inputs: editing them asks for no new lock.
    (copy / "requirements" / "constraints.txt").write_text(
        (copy / "requirements" / "constraints.txt").read_text() + "\n# a note\n\n")
    assert lock.check() == []
    _edit(copy / "requirements" / "constraints.txt", "torch==2.13.0+cpu", "torch==2.14.1")
    assert lock.check() and "changed since the lock was made" in lock.check()[0]


def test_an_installed_set_that_is_not_the_lock_is_named(copy):
    lock = _load(copy)
    have = {name: metadata.version(name) for name in ("pytest", "pyyaml", "packaging")}
    lock.LOCK.write_text(
        "# inputs-sha256: 0\n"
        + "".join(f"{n}=={v} \\\n    --hash=sha256:00\n" for n, v in have.items() if n != "packaging")
        + f"packaging=={have['packaging']}.post99 \\\n    --hash=sha256:00\n"
        + "not-installed-anywhere==1.0 \\\n    --hash=sha256:00\n")
    diffs, extra = lock.env(set())
    assert diffs == ["not-installed-anywhere missing (locked 1.0)",
                     f"packaging {have['packaging']} (locked {have['packaging']}.post99)"]
    names = {e.split()[0] for e in extra}
    assert "torch" in names and not names & {"pytest", "pyyaml", "packaging", "pip", "dreambench"}
    diffs, _ = lock.env({"packaging", "not-installed-anywhere"})  # TORCH=... leaves torch out the same way
    assert diffs == []
