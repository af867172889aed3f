"""Study storage and bookkeeping shared by the sweeper (ask/tell) and the trials (pruning reports).

Storage: a journal file beside the sweep folder by default (Optuna's JournalStorage: an append-only log with a
file lock, safe for several processes on one machine or a shared file system; Optuna advises against SQLite for
parallel workers), or any URL Optuna's RDBStorage takes, e.g. postgresql+psycopg://user@host/db for a cluster.

Stale trials: a sweep killed mid-batch leaves its trials RUNNING forever. Optuna's heartbeat
(`optuna.storages.fail_stale_trials`) only exists for RDB storages, not for the journal file, so the sweeper keeps
its own, on every storage (system attrs): each trial it launches records its owner (host, pid, the process's
start time), and it stamps the trials it runs every `heartbeat_s`. At start-up a RUNNING trial is stale when its
owner was on this host and that process is gone (checked at once: the pid and its start time, so a reused pid is
not mistaken for the owner), or, for an owner on another host, when its stamp is older than `stale_after_s`.
A stale trial is failed with a reason and its parameters are enqueued again (a retry). Trials with neither owner
nor stamp (asked by something else) are left alone.

Configuration errors (a trial that raised dreambench's UserError) are marked `dreambench:config_error`: not
counted towards the target nor the failure budget, so fixing the config and re-running goes on where it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("dreambench.sweep")

HEARTBEAT = "dreambench:heartbeat"    # unix time of the owning sweeper's last stamp
STALE = "dreambench:stale"            # failed because its sweeper stopped; retried, not counted
SURPLUS = "dreambench:surplus"        # asked past the target in a race between workers; not counted
CONFIG_ERROR = "dreambench:config_error"  # failed on a configuration error: the sweep stopped; not counted
OWNER = "dreambench:owner"            # {"host", "pid", "started"}: the sweeper process that launched the trial
FAIL_REASON = "fail_reason"           # user attr: why a trial failed / was pruned (shown by the dashboard)
JOURNAL_NAME = "study.journal"


def storage_url(storage: str | None, sweep_dir: str | Path) -> str:
    """None -> the journal file in the sweep folder; a plain path -> that journal file; a URL -> itself."""
    if not storage:
        return str((Path(sweep_dir) / JOURNAL_NAME).resolve())
    s = str(storage)
    return s if "://" in s else str(Path(s).expanduser().resolve())


# PostgreSQL advisory-lock key under which workers create Optuna's schema one at a time (any fixed 64-bit value).
SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"dreambench:optuna-schema").digest()[:8], "big", signed=True)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if "://" in url:
        return _open_rdb(url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    # The journal serialises its appends with a file lock, and create_study(load_if_exists=True) settles two
    # workers creating one study: workers started together on a fresh file need nothing more.
    return JournalStorage(JournalFileBackend(url))


def _open_rdb(url: str) -> optuna.storages.RDBStorage:
    """RDBStorage, its schema created by one worker at a time.

    Optuna creates its tables, the `studydirection` enum type and its version rows on first use, with no lock:
    workers started together on an empty PostgreSQL database race, and the losers fail with DuplicateTable /
    DuplicateObject / a unique violation. On PostgreSQL a session-level advisory lock, held on a connection of
    its own while the storage is built, makes the others wait and then find the schema made. Other databases
    (MySQL, SQLite) retry instead.
    """
    import random

    import sqlalchemy
    import sqlalchemy.exc
    from sqlalchemy.pool import NullPool

    def build() -> optuna.storages.RDBStorage:
        # pool_pre_ping: a cluster job may hold a connection across a database restart.
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})

    if sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:  # the lock goes with this connection, also if the process dies
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                try:
                    return build()
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
        finally:
            engine.dispose()
    attempt = 0
    while True:
        try:
            return build()
        except sqlalchemy.exc.DBAPIError as e:
            # Lost the race to create a table, type or row (SQLite says "already exists" as an OperationalError):
            # the next try finds it made. Anything else (no server, no database) is raised at once.
            lost = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e.orig)
            if not lost or attempt == 4:
                raise
            attempt += 1
            time.sleep(0.2 + random.random())


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def counted(t: FrozenTrial) -> bool:
    """Whether a trial counts towards the study's target `n_trials`: every trial asked (running or finished,
    failed ones included) except stale ones (retried instead) and surplus ones."""
    return t.state != TrialState.WAITING and not any(t.system_attrs.get(k) for k in (STALE, SURPLUS, CONFIG_ERROR))


def failed(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and counted(t)


def fail_trial(storage: optuna.storages.BaseStorage, tid: int, reason: str, **system: Any) -> bool:
    """FAIL a running trial with its reason; False if someone else finished it first."""
    try:
        storage.set_trial_user_attr(tid, FAIL_REASON, reason[:2000])
        for k, v in system.items():
            storage.set_trial_system_attr(tid, k, v)
        return storage.set_trial_state_values(tid, TrialState.FAIL)
    except UpdateFinishedTrialError:  # another worker (or the job) finished it first
        return False


def this_process() -> dict[str, Any]:
    """The owner record of a trial launched by this process."""
    import psutil
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def owner_gone(owner: Any) -> bool | None:
    """True when the trial's owner ran on this host and that process no longer exists (its pid is free, or now
    belongs to a process started at another time); False when it is alive; None when this host cannot tell."""
    import psutil
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(owner["pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    return abs(started - float(owner.get("started", started))) > 1.0


def stale_reason(t: FrozenTrial, stale_after_s: float, now: float) -> str | None:
    """Why a RUNNING trial is stale, or None if its owner may still be at work."""
    owner = t.system_attrs.get(OWNER)
    gone = owner_gone(owner)
    if gone:
        return f"stale: its sweeper (pid {owner['pid']} on {owner['host']}) is gone"
    beat = t.system_attrs.get(HEARTBEAT)
    if gone is None and beat is not None and now - float(beat) > stale_after_s:
        return f"stale: its sweeper stopped (no heartbeat for {now - float(beat):.0f} s > stale_after_s={stale_after_s:g})"
    return None


def recover_stale(study: optuna.Study, storage: optuna.storages.BaseStorage, stale_after_s: float) -> list[int]:
    """Fail RUNNING trials whose sweeper is gone (same host) or stopped stamping them (another host), and enqueue
    their parameters again."""
    now = time.time()
    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = stale_reason(t, stale_after_s, now)
        if why is None:
            continue
        tid = trial_id(storage, study.study_name, t.number)
        reason = f"{why}; retried with the same parameters"
        if fail_trial(storage, tid, reason, **{STALE: True}):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            retried.append(t.number)
            log.warning("trial %d was left running by a stopped sweep: failed and enqueued again", t.number)
    return retried


class Heartbeat:
    """Stamps the trials of the running batch every `interval_s` from a daemon thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: Iterable[int], interval_s: float):
        self.storage, self.ids, self.interval = storage, list(trial_ids), float(interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-heartbeat", daemon=True)

    def beat(self) -> None:
        now = time.time()
        for tid in self.ids:
            try:
                self.storage.set_trial_system_attr(tid, HEARTBEAT, now)
            except UpdateFinishedTrialError:  # finished meanwhile (told, or failed by another worker)
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
