import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreambench.utils.io import (atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                 safe_rmtree)

REPO = Path(__file__).resolve().parents[1]


def leftovers(d):
    return sorted(p.name for p in Path(d).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_writes_content_and_leaves_no_temporaries(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "sub" / "c.json", {"x": [1, 2.5], "y": "z"})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"x": [1, 2.5], "y": "z"}
    atomic_write_text(tmp_path / "b.txt", "second")  # overwrite
    assert (tmp_path / "b.txt").read_text() == "second"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "sub"]


def test_new_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600


def test_non_finite_floats_are_null_and_numpy_scalars_numbers(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"loss": float("nan"), "up": math.inf, "dn": [-math.inf, 1.0],
                                            "np": np.float32(0.5), "n": np.int64(3), "ok": True})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "up": None, "dn": [None, 1.0], "np": 0.5, "n": 3, "ok": True}


def test_old_file_intact_when_writer_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"step": 2, "bad": object()})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails inside the write, after the temporary exists
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_atomic_dir_replaces_and_cleans_up(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as d:
        assert d.parent == tmp_path and d.name.startswith(f"model.tmp-{os.getpid()}-")
        assert not (d / "old.txt").exists()
        (d / "new.txt").write_text("new")
        (d / "nested").mkdir()
        (d / "nested" / "w.bin").write_bytes(b"w")
    assert sorted(p.name for p in final.iterdir()) == ["nested", "new.txt"]
    assert (final / "nested" / "w.bin").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_creates_when_absent(tmp_path):
    with atomic_dir(tmp_path / "a" / "fresh") as d:
        (d / "x").write_text("1")
    assert (tmp_path / "a" / "fresh" / "x").read_text() == "1"
    assert leftovers(tmp_path / "a") == []


def test_atomic_dir_failure_keeps_old(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as d:
            (d / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


WRITER = r"""
import hashlib, itertools, sys
from dreambench.utils.io import atomic_write_json
path, size = sys.argv[1], int(sys.argv[2])
for i in itertools.count():
    body = (f"{i:08d}" * (size // 8))  # ~size bytes, different for every version
    atomic_write_json(path, {"version": i, "body": body, "sha256": hashlib.sha256(body.encode()).hexdigest()})
    if i == 0:
        print("ready", flush=True)
"""


def read_complete(path):
    obj = json.loads(path.read_text())
    assert hashlib.sha256(obj["body"].encode()).hexdigest() == obj["sha256"]
    assert obj["body"].startswith(f"{obj['version']:08d}")
    return obj["version"]


def test_sigkill_mid_write_never_leaves_a_torn_file(tmp_path):
    # A real crash: a writer process rewrites a ~4 MB file in a loop and is SIGKILLed at a random moment,
    # several times over the same file. Whatever is on disk must parse and match its own checksum, both
    # after each kill and for a reader polling the file while the writer runs (a plain open("w") writer
    # fails this within a round or two).
    path = tmp_path / "state.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(0)
    versions = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(4 << 20)], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + rng.uniform(0.05, 0.3)
            while time.monotonic() < deadline:
                versions.append(read_complete(path))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL  # it was killed, not finished
        versions.append(read_complete(path))
    assert max(versions) > 0  # it really rewrote the file, not just kept version 0


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_safe_rmtree(tmp_path):
    root = tmp_path / "runs"
    (root / "r1" / "ckpt").mkdir(parents=True)
    (root / "r1" / "ckpt" / "w.bin").write_bytes(b"w")
    outside = tmp_path / "user_data"
    outside.mkdir()
    (outside / "photo.jpg").write_bytes(b"precious")

    for bad in (root, root / "r1" / ".." / "..", root / ".." / "user_data", outside, root / "."):
        with pytest.raises(ValueError) as e:
            safe_rmtree(bad, root)
        assert str(bad) in str(e.value) and str(root) in str(e.value)
    (root / "link_out").symlink_to(outside)
    with pytest.raises(ValueError, match="user_data"):
        safe_rmtree(root / "link_out", root)
    with pytest.raises(ValueError):
        safe_rmtree(root / "link_out" / "photo.jpg", root)  # through a symlinked parent
    assert (outside / "photo.jpg").read_bytes() == b"precious"

    # A link inside root to something inside root: only the link goes.
    (root / "link_in").symlink_to(root / "r1")
    safe_rmtree(root / "link_in", root)
    assert not (root / "link_in").is_symlink() and (root / "r1" / "ckpt" / "w.bin").exists()

    (root / "r1" / "ckpt" / "to_outside").symlink_to(outside)  # rmtree must unlink it, not follow it
    safe_rmtree(root / "r1", root)
    assert not (root / "r1").exists() and root.is_dir()
    assert (outside / "photo.jpg").read_bytes() == b"precious"
    safe_rmtree(root / "r1", root)  # already gone: nothing to do
