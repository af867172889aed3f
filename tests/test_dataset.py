"""Locating the DreamBench data set: configured path, environment variable, or a download on first use."""

from __future__ import annotations

import http.server
import io
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from dreambench.data import dreambench as db


def test_index_has_30_subjects_9_live_and_25_prompts_each(dataset_root):
    subs = db.subjects(dataset_root)
    assert len(subs) == 30 and sum(s.live for s in subs) == 9
    index = db.load_index(dataset_root)
    assert len(index.object_prompts) == len(index.live_prompts) == 25
    dog = db.subject(dataset_root, "dog")
    assert db.fill_prompt(dog.prompt_templates[0], "sks", dog.class_noun) == "a sks dog in the jungle"
    assert db.fill_prompt(dog.prompt_templates[0], "sks", "") == "a sks in the jungle"
    assert "wearing a red hat" in " ".join(dog.prompt_templates)
    assert "wearing a red hat" not in " ".join(db.subject(dataset_root, "teapot").prompt_templates)


def test_unknown_subject_names_the_known_ones(dataset_root):
    with pytest.raises(KeyError, match="'dogg' is not in DreamBench.*backpack"):
        db.subject(dataset_root, "dogg")


def test_configured_path_without_index_is_one_clear_error(tmp_path):
    with pytest.raises(db.DatasetNotFoundError, match=f"not found at {tmp_path}.*DREAMBENCH_DATA"):
        db.resolve_root(tmp_path)


def _zip_of(dataset_root: Path, subjects: list[str]) -> bytes:
    # The layout of GitHub's archive of google/dreambooth: <repo>-<commit>/dataset/...
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        prefix = f"dreambooth-{db.OFFICIAL_COMMIT}/dataset/"
        zf.writestr(prefix + db.INDEX_FILE, (dataset_root / db.INDEX_FILE).read_text())
        for s in subjects:
            for f in sorted((dataset_root / s).iterdir()):
                zf.writestr(prefix + f"{s}/{f.name}", f.read_bytes())
        zf.writestr(f"dreambooth-{db.OFFICIAL_COMMIT}/README.md", "not part of the data set")
    return buf.getvalue()


def _serve(payload: bytes):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_download_on_first_use_from_a_real_http_server(tmp_path, monkeypatch, dataset_root):
    monkeypatch.delenv(db.ENV_VAR, raising=False)
    monkeypatch.setenv("DREAMBENCH_CACHE", str(tmp_path))
    srv = _serve(_zip_of(dataset_root, ["dog", "teapot"]))
    try:
        root = db.resolve_root(None, url=f"http://127.0.0.1:{srv.server_port}/archive.zip")
    finally:
        srv.shutdown()
    assert root == tmp_path / "dreambench-dataset"
    assert sorted(p.name for p in root.iterdir()) == ["dog", "prompts_and_classes.txt", "teapot"]
    assert (root / "dog" / "00.jpg").read_bytes() == (dataset_root / "dog" / "00.jpg").read_bytes()
    # second use: the cached copy, no download (an unreachable URL would fail)
    assert db.resolve_root(None, url="http://127.0.0.1:9/none.zip", timeout_s=1) == root


def test_failed_download_says_how_to_point_at_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(db.ENV_VAR, raising=False)
    monkeypatch.setenv("DREAMBENCH_CACHE", str(tmp_path))
    with pytest.raises(db.DatasetNotFoundError) as e:
        db.resolve_root(None, url="http://127.0.0.1:9/archive.zip", timeout_s=2)
    msg = str(e.value)
    assert "\n" not in msg and "could not download" in msg and "DREAMBENCH_DATA=" in msg
    assert not any(tmp_path.iterdir()) or not (tmp_path / "dreambench-dataset").exists()


def test_env_var_points_anywhere(tmp_path, monkeypatch, dataset_root):
    copy = tmp_path / "my-copy"
    shutil.copytree(dataset_root / "dog", copy / "dog")
    shutil.copy(dataset_root / db.INDEX_FILE, copy)
    monkeypatch.setenv(db.ENV_VAR, str(copy))
    assert db.resolve_root(None) == copy
