"""The docs' commands stay typeable (issue 14, item 7): every `python -m dreambench.<entry point>` line in a code
block of README.md and docs/*.md goes through the real shell (quotes, $HOME, comments) and then Hydra's override
grammar and config composition, as the entry point would see it. A renamed key, a removed option or an example
Hydra cannot parse (`key=~/photos`, an unquoted `=` in a checkpoint path) fails here, not for a reader."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = {"train", "evaluate", "generate", "export", "push"}
FAKE_HOME = "/home/reader"


def _placeholder(m: re.Match) -> str:
    # <time> is a run folder's time stamp; any other <thing> stands for a path or name the reader fills in.
    inner = m.group(1)
    return "2026-12-03_10-00-00" if inner == "time" else re.sub(r"\W+", "_", inner).strip("_") or "x"


def commands() -> list[tuple[str, int, str, str]]:
    """(doc, line number, entry point, the arguments as written) for each command of each doc's code blocks."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S):
            first = text[: block.start()].count("\n") + 2
            lines = block.group(1).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):  # continued lines
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                m = re.match(r"\s*python -m dreambench\.(\w+)\b(.*)", line)
                if m and m.group(1) in ENTRY_POINTS:
                    found.append((doc.relative_to(REPO).as_posix(), first + start, m.group(1), m.group(2)))
    return found


def shell_words(args: str) -> list[str]:
    """The arguments as bash hands them to Python (quotes removed, $HOME expanded, comments dropped)."""
    args = re.sub(r"<([^<>]+)>", _placeholder, args)
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {args}"], capture_output=True, text=True, check=True,
                         env={"HOME": FAKE_HOME, "PATH": "/usr/bin:/bin"})
    words = out.stdout.split("\0")[:-1]
    return [] if words == [""] else words


ALL = commands()


def test_the_docs_have_commands_to_walk():
    docs = {d for d, *_ in ALL}
    assert "README.md" in docs and len(ALL) >= 20, ALL
    readme = [shell_words(a) for d, _, _, a in ALL if d == "README.md"]
    # The cases the grammar used to trip on are among them, written as a reader types them.
    assert [f"data.instance_dir={FAKE_HOME}/photos/mug"] == [w for ws in readme for w in ws
                                                              if w.startswith("data.instance_dir=/")][:1]
    assert any(w == f"data.instance_dir={FAKE_HOME}/My Photos/mug" for ws in readme for w in ws)
    assert any(w.startswith('resume="') and "step=" in w for ws in readme for w in ws)


@pytest.mark.parametrize("doc,line,entry,args", ALL, ids=[f"{d}:{n}" for d, n, *_ in ALL])
def test_a_documented_command_parses_and_composes(doc, line, entry, args):
    words = shell_words(args)
    multirun = any(w in ("-m", "--multirun") for w in words)
    overrides = [w for w in words if w not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(overrides)  # the grammar: raises on ~, unquoted =, ...
    if multirun:  # sweep values (interval(), choice(), a,b) are the sweeper's, not the composer's
        overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides, return_hydra_config=True)
    for o in parsed:  # what the shell and the grammar made of each value is what the config holds
        key = o.key_or_group
        if o.is_sweep_override() or key.startswith("hydra") or o.value_type is None or "/" in key:
            continue
        if not isinstance(o.value(), str) or o.is_delete():
            continue
        node = cfg
        for part in key.lstrip("+").split("."):
            node = node.get(part) if node is not None and hasattr(node, "get") else None
        if node is not None and isinstance(node, str) and not node.startswith("${"):
            assert node == o.value(), (doc, line, key)
        if "dir" in key or key in ("resume", "run", "folder", "model.pretrained"):
            assert "~" not in o.value(), f"{doc}:{line}: {key}={o.value()} keeps a '~' no one expands"
