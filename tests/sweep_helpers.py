"""Sweep tests' helpers: tiny trial settings, a toy Hydra app for storage/concurrency tests, a real PostgreSQL.

The toy app (`python -m sweep_helpers --config-dir D --config-name toy -m`) uses the real sweeper plugin, Hydra
launcher and Optuna storage but scores a formula instead of training, so tests of the study bookkeeping (parallel
workers, PostgreSQL, failure budget) take seconds; the end-to-end tests in test_sweep.py train the tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# One tiny trial of dreambench.train (the CSV logger every 2 steps, for compare's loss curves).
TINY_TRIAL = ["-m", "+experiment=dog", "+hparams_search=lr_prior", "model=tiny", "logger=csv", "progress=false",
              "trainer.max_steps=6", "trainer.log_every_n_steps=2", "prior.num_images=2", "prior.batch_size=2",
              "guidance.num_inference_steps=2", "train.samples=false", "train.checkpoint_every_n_steps=0",
              "train.export_model=false", "optimized_metric=[train/loss_instance]", "sweep.directions=[minimize]",
              "sweep.pruner=null", "train.drift.every_n_steps=0",
              "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler"]


def run(args: list[str], module: str = "dreambench.train", timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def journal_study(path: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


# ---- the toy app ------------------------------------------------------------------------------------
def toy_config(folder: Path, n_trials: int = 4, storage: str | None = None, **extra) -> Path:
    """Write conf folder `folder/conf` with toy.yaml; the sweep goes to `folder/sweep`."""
    conf = folder / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    cfg = {
        "defaults": [{"override hydra/sweeper": "optuna"}, "_self_"],
        "x": 0.5, "sleep_s": 0.3, "fail_above": None, "prune_above": None, "config_error_above": None,
        "optimized_metric": "y",
        "seed": 0,
        "sweep": {"study_name": "toy", "storage": storage, "directions": ["minimize"], "weights": None,
                  "pruner": None, "trial": None},
        "hydra": {
            "searchpath": [f"file://{REPO / 'conf'}"],
            "sweep": {"dir": str(folder / "sweep"), "subdir": "trial_${sweep.trial}"},
            "sweeper": {"n_trials": n_trials, "params": {"x": "interval(0.0, 1.0)"},
                        "preflight": "sweep_helpers.toy_preflight",
                        "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": "${seed}"}},
            "job_logging": {"root": {"level": "WARNING"}},
        },
    }
    for k, v in extra.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    (conf / "toy.yaml").write_text(yaml.safe_dump(cfg))
    return conf


def run_toy(conf: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(["--config-dir", str(conf), "--config-name", "toy", "-m", *overrides], module="sweep_helpers",
               timeout=timeout)


def popen_toy(conf: Path, *overrides: str, barrier: tuple[Path, int] | None = None) -> subprocess.Popen:
    """A toy sweep worker. `barrier=(folder, n)`: the worker imports everything, then waits until n workers have
    checked in at `folder` before Hydra starts, so the workers reach the storage at the same instant rather than
    a start-up time apart."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    if barrier is not None:
        barrier[0].mkdir(parents=True, exist_ok=True)
        env["TOY_BARRIER"] = f"{barrier[0]}{os.pathsep}{barrier[1]}"
    return subprocess.Popen([sys.executable, "-m", "sweep_helpers", "--config-dir", str(conf), "--config-name",
                             "toy", "-m", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _toy_main() -> None:
    import hydra
    import optuna
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def toy(cfg) -> float:
        out = Path(HydraConfig.get().runtime.output_dir)
        x = float(cfg.x)
        # Every execution leaves a line: a trial run twice (a duplicate) shows up as two lines.
        with open(out.parent / "executions.txt", "a") as f:
            f.write(f"{cfg.sweep.trial} {os.getpid()}\n")
        time.sleep(float(cfg.sleep_s))
        if cfg.fail_above is not None and x > float(cfg.fail_above):
            raise ValueError(f"toy failure: x={x} > {cfg.fail_above}")
        if cfg.config_error_above is not None and x > float(cfg.config_error_above):
            from dreambench.errors import UserError
            raise UserError(f"toy config error: x={x} > {cfg.config_error_above}")
        if cfg.prune_above is not None and x > float(cfg.prune_above):
            raise optuna.TrialPruned(f"toy prune: x={x}")
        y = (x - 0.3) ** 2
        (out / "metrics.json").write_text(json.dumps({"y": y, "pid": os.getpid()}))
        return y

    if "TOY_BARRIER" in os.environ:
        import psycopg  # noqa: F401 - imported before the barrier, like everything the sweeper opens storage with
        import sqlalchemy  # noqa: F401

        import dreambench.sweep.sweeper  # noqa: F401
        folder, n = os.environ["TOY_BARRIER"].rsplit(os.pathsep, 1)
        (Path(folder) / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
            time.sleep(0.005)
    from dreambench.cli import run
    run(toy)


def toy_preflight(cfg) -> None:
    """The toy task's preflight: x must lie within [0, 1] (a search space reaching past it is a config error)."""
    from dreambench.errors import UserError
    if not 0.0 <= float(cfg.x) <= 1.0:
        raise UserError(f"x={cfg.x} must be within [0, 1]")


# ---- a real PostgreSQL server ------------------------------------------------------------------------
def createdb(url: str, name: str) -> str:
    """Create the empty database `name` on the server of `url`; its URL."""
    from sqlalchemy.engine import make_url
    u = make_url(url)
    subprocess.run([_pg_bin("createdb"), "-h", u.host, "-p", str(u.port), "-U", u.username, name], check=True,
                   capture_output=True, text=True)
    return u.set(database=name).render_as_string(hide_password=False)


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} not found: apt-get install -y postgresql (Debian)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server():
    """A throw-away PostgreSQL cluster on a free localhost port; yields a SQLAlchemy URL (psycopg 3) of its empty
    database `optuna`. `createdb(url, name)` makes another empty database on the same server."""
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="dreambench-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres")
    port = _free_port()
    try:
        subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True, text=True)
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w",
                        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, text=True)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
        createdb(url, "optuna")
        yield url
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    _toy_main()
