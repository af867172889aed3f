"""`python -m dreambench.sweep reset <sweep folder>`: start a study afresh, keeping what the old one found.

The study's trials are copied into `<sweep folder>/reset-<UTC time>/study.journal` (Optuna's copy_study: opens
in optuna-dashboard and analysis.compare like any study), its run folders (`trial_<n>/`), `compare/` and
`multirun.yaml` move there too, and the study is deleted from its storage, so the same sweep command starts
again at trial 0. Refused while a trial of the study may still be running (a live sweeper owns it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from dreambench.errors import UserError, exit_on_user_error


def reset(sweep_dir: Path, storage: str | None = None, study_name: str | None = None, force: bool = False) -> Path:
    """Archive and delete the study of `sweep_dir`; the archive folder."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    from dreambench.sweep.study import open_storage, stale_reason, storage_url

    sweep_dir = Path(sweep_dir).expanduser()
    card = sweep_dir / "sweep.json"
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder not found: {sweep_dir}")
    info = json.loads(card.read_text()) if card.is_file() else {}
    study_name = study_name or info.get("study_name")
    if not study_name:
        raise UserError(f"{card} not found: name the study with --study")
    url = storage_url(storage or info.get("storage"), sweep_dir)
    if "***" in url:
        raise UserError("sweep.json holds the storage URL without its password: give it with --storage "
                        "(or the password in PGPASSWORD / ~/.pgpass)")
    src = open_storage(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=src)
    except KeyError:
        raise UserError(f"no study {study_name!r} in {url}: nothing to reset") from None
    now = time.time()
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if stale_reason(t, float("inf"), now) is None]
    if running and not force:
        raise UserError(f"trial(s) {', '.join(str(t.number) for t in running)} of study {study_name!r} may still "
                        f"be running (their sweeper is alive, or on another host): stop it first, or --force")
    archive = sweep_dir / time.strftime("reset-%Y%m%dT%H%M%SZ", time.gmtime())
    archive.mkdir()
    optuna.copy_study(from_study_name=study_name, from_storage=src, to_study_name=study_name,
                      to_storage=JournalStorage(JournalFileBackend(str(archive / "study.journal"))))
    moved = 0
    for p in sorted(sweep_dir.iterdir()):
        if p.name.startswith("trial_") or p.name in ("compare", "multirun.yaml", "sweep.json"):
            shutil.move(str(p), str(archive / p.name))
            moved += p.name.startswith("trial_")
    n = len(study.trials)
    optuna.delete_study(study_name=study_name, storage=src)
    print(f"study {study_name!r} reset: its {n} trials (copied into {archive / 'study.journal'}) and {moved} run "
          f"folder(s) moved to {archive}; the same sweep command now starts it afresh")
    return archive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambench.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reset", help="archive a study and its run folders, then delete it from its storage")
    r.add_argument("sweep_dir", type=Path, help="the sweep folder, e.g. experiments/sweeps/dog_lr_prior")
    r.add_argument("--storage", help="the study's storage URL when it is not the folder's study.journal")
    r.add_argument("--study", help="the study's name (default: from the folder's sweep.json)")
    r.add_argument("--force", action="store_true", help="also when a trial may still be running")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        reset(args.sweep_dir, args.storage, args.study, args.force)


if __name__ == "__main__":
    sys.exit(main())
