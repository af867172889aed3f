"""The DreamBench data set (Ruiz et al. 2023): where it is, its 30 subjects, classes and 25+25 prompts."""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ENV_VAR = "DREAMBENCH_DATA"
# The official data set: google/dreambooth, folder dataset/, at the commit shared/dreambench-dataset pins.
OFFICIAL_COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"
OFFICIAL_URL = f"https://github.com/google/dreambooth/archive/{OFFICIAL_COMMIT}.zip"
INDEX_FILE = "prompts_and_classes.txt"
# Live subjects (cats and dogs) use the live prompt list, every other subject the object list.
LIVE_CLASSES = {"cat", "dog"}


class DatasetNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    live: bool
    folder: Path
    index_root: Path | None = None  # where prompts_and_classes.txt is; None: the folder's parent

    @property
    def prompt_templates(self) -> list[str]:
        index = load_index(self.index_root or self.folder.parent)
        return index.live_prompts if self.live else index.object_prompts


def custom_subject(name: str, class_noun: str, live: bool, folder: Path, configured_root: str | None) -> Subject:
    """A subject from any folder of photos; it borrows DreamBench's prompt lists (evaluation, drift monitor),
    from the data set if it can be found without downloading."""
    try:
        root = resolve_root(configured_root, download=False)
    except DatasetNotFoundError:
        root = None
    return Subject(name, class_noun, bool(live), Path(folder), root)


@dataclass(frozen=True)
class DreamBenchIndex:
    classes: dict[str, str]  # subject -> class noun, in file order
    object_prompts: list[str]  # templates with {0} = identifier, {1} = class noun
    live_prompts: list[str]


def parse_index(text: str) -> DreamBenchIndex:
    classes: dict[str, str] = {}
    m = re.search(r"subject_name,class\n(.*?)\n\s*\n", text, re.S)
    if not m:
        raise ValueError(f"{INDEX_FILE}: no 'subject_name,class' table found")
    for line in m.group(1).splitlines():
        name, cls = line.strip().split(",", 1)
        classes[name] = cls
    # The two prompt lists are Python list literals of "'...'.format(unique_token, class_token)" calls.
    lists = re.findall(r"prompt_list = \[(.*?)\]", text, re.S)
    if len(lists) != 2:
        raise ValueError(f"{INDEX_FILE}: expected 2 prompt lists, found {len(lists)}")
    object_prompts, live_prompts = (
        [ast.literal_eval(s) for s in re.findall(r"('[^']*')\.format", block)] for block in lists
    )
    return DreamBenchIndex(classes, object_prompts, live_prompts)


@lru_cache(maxsize=8)
def load_index(root: str | Path) -> DreamBenchIndex:
    return parse_index((Path(root) / INDEX_FILE).read_text())


def fill_prompt(template: str, identifier: str, class_noun: str) -> str:
    # "a {0} {1} in the jungle" -> "a sks dog in the jungle"; an empty identifier or class noun collapses
    # its space (the class-noun ablation of Table 4 uses "a sks in the jungle").
    return " ".join(template.format(identifier, class_noun).split())


def subject(root: str | Path, name: str) -> Subject:
    root = Path(root)
    index = load_index(root)
    if name not in index.classes:
        raise KeyError(f"subject {name!r} is not in DreamBench ({root / INDEX_FILE}); known: {', '.join(index.classes)}")
    cls = index.classes[name]
    return Subject(name, cls, cls in LIVE_CLASSES, root / name)


def subjects(root: str | Path) -> list[Subject]:
    return [subject(root, n) for n in load_index(root).classes]


def default_cache_root() -> Path:
    return Path(os.environ.get("DREAMBENCH_CACHE", Path.home() / ".cache" / "dreambench"))


def resolve_root(configured: str | Path | None = None, download: bool = True, url: str = OFFICIAL_URL,
                 timeout_s: float = 30.0) -> Path:
    """The data set folder: the configured path, else $DREAMBENCH_DATA, else a cached download."""
    hint = (f"point {ENV_VAR}=/path/to/dreambench-dataset (or paths.dataset_dir=...) at a copy of "
            f"the 'dataset/' folder of github.com/google/dreambooth")
    for candidate, origin in ((configured, "paths.dataset_dir"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if candidate:
            root = Path(candidate).expanduser()
            if not (root / INDEX_FILE).is_file():
                if root.name.startswith("toy-world-"):  # +experiment=toy_*: the project writes it (dreambench.world)
                    raise DatasetNotFoundError(f"the toy world's data set is not at {root} (from {origin}): build "
                                               f"it once with: python -m dreambench.world build")
                raise DatasetNotFoundError(f"DreamBench data set not found at {root} (from {origin}): "
                                           f"no {INDEX_FILE} there; {hint}")
            return root
    cached = default_cache_root() / "dreambench-dataset"
    if (cached / INDEX_FILE).is_file():
        return cached
    if not download:
        raise DatasetNotFoundError(f"DreamBench data set not found; {hint}")
    try:
        _download(url, cached, timeout_s)
    except Exception as e:  # noqa: BLE001 - any failure gets the same one-line advice
        raise DatasetNotFoundError(f"could not download the DreamBench data set from {url} ({e.__class__.__name__}: "
                                   f"{e}); {hint}") from None
    return cached


def _download(url: str, dest: Path, timeout_s: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - https URL from config
        payload = r.read()
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        # The archive holds <repo>-<commit>/dataset/...; keep only dataset/.
        members = [m for m in zf.namelist() if "/dataset/" in m and not m.endswith("/")]
        if not any(m.endswith("/dataset/" + INDEX_FILE) for m in members):
            raise ValueError(f"archive has no dataset/{INDEX_FILE}")
        for m in members:
            rel = m.split("/dataset/", 1)[1]
            target = (tmp / rel).resolve()
            if not str(target).startswith(str(tmp.resolve())):  # zip-slip
                raise ValueError(f"unsafe path in archive: {m}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(m))
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
