"""dreambench.cli.run: the entry points end with main's exit code, their atexit handlers run and their output is
flushed, although the interpreter's teardown is skipped (cli.exit_now)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = """
import atexit, logging, sys
from pathlib import Path
from dreambench.cli import run

out = Path(sys.argv[1])
log = logging.getLogger("t")
log.addHandler(logging.FileHandler(out / "train.log", delay=True))
log.setLevel(logging.INFO)
atexit.register(lambda: (out / "atexit").write_text("ran"))

class Unflushed:  # what a teardown would finish: its __del__ never runs under os._exit
    def __del__(self):
        (out / "del").write_text("ran")
keep = Unflushed()

def main():
    sys.stdout.write("no newline, still buffered")  # a pipe: block-buffered
    log.info("last log line")
    how = sys.argv[2]
    if how == "code":
        sys.exit(3)
    if how == "message":
        sys.exit("dreambench: error: a message")
    return 0.5

run(main)
raise AssertionError("run() returned")
"""


@pytest.mark.parametrize("how,code", [("return", 0), ("code", 3), ("message", 1)])
def test_run_exits_with_mains_code_after_atexit_handlers_and_flushed_output(how, code, tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(SCRIPT))
    p = subprocess.run([sys.executable, str(script), str(tmp_path), how], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1], check=False)
    assert p.returncode == code, p.stderr[-2000:]
    assert p.stdout == "no newline, still buffered"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "train.log").read_text() == "last log line\n"  # logging's own atexit flush
    assert not (tmp_path / "del").exists()  # the teardown really was skipped
    assert ("a message" in p.stderr) == (how == "message")


def test_under_a_profiler_run_exits_the_ordinary_way_so_the_profile_is_written(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(SCRIPT))
    prof = tmp_path / "run.prof"
    p = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), str(script), str(tmp_path), "return"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]  # (cProfile swallows a script's SystemExit: always 0 under it)
    assert prof.is_file() and prof.stat().st_size > 0 and (tmp_path / "atexit").read_text() == "ran"


def test_transformers_torchvision_notice_is_dropped_for_every_entry_point_not_only_train():
    # diffusers' pipelines import transformers.CLIPImageProcessor, and transformers (5.x, no torchvision installed:
    # there is no CPU build for this torch) logs that it falls back to the PIL processor, which is what dreambench
    # uses. evaluate, world, generate import diffusers before any logging set-up: `import dreambench` drops it.
    load = "import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
    bare = subprocess.run([sys.executable, "-c", load], check=False, capture_output=True, text=True, timeout=300)
    ours = subprocess.run([sys.executable, "-c", f"import dreambench; {load}"], check=False, capture_output=True,
                          text=True, timeout=300)
    assert bare.returncode == 0 and ours.returncode == 0, ours.stderr[-2000:]
    assert "requires torchvision (not installed)" in bare.stderr  # the library still says it: the check can fail
    assert "requires torchvision" not in ours.stderr + ours.stdout
