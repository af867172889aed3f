"""Hydra writes `<run>/.hydra/{config,hydra,overrides}.yaml` itself, before the task runs, with every override in
clear text (`+logger.settings.api_key=...` lands in all three). conf/hydra/default.yaml sets
`hydra.output_subdir: null`, so Hydra writes none of them, and this callback writes the same three files with
secrets replaced; the layout stays what Hydra users expect (`.hydra/config.yaml` is still there).

A key is secret when its name matches dreambench.config.SECRET (api_key, token, password, secret, ...); its
value is also scrubbed from every other string (hydra.job.override_dirname repeats the overrides).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from dreambench.config import REDACTED, SECRET
from dreambench.utils.io import atomic_write_text

log = logging.getLogger("dreambench")


def _secret_values(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if SECRET.search(str(k)) and isinstance(v, (str, int, float)) and str(v) not in ("", REDACTED):
                out.add(str(v))
            else:
                _secret_values(v, out)
    elif isinstance(node, list):
        for v in node:
            _secret_values(v, out)


def redact_override(s: str) -> str:
    key, eq, _ = s.partition("=")
    return f"{key}={REDACTED}" if eq and SECRET.search(key) else s


def _scrub(node: Any, values: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: (REDACTED if SECRET.search(str(k)) and v not in (None, "") else _scrub(v, values))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_scrub(redact_override(v) if isinstance(v, str) else v, values) for v in node]
    if isinstance(node, str):
        for v in values:
            node = node.replace(v, REDACTED)
    return node


def _split(config: DictConfig) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """(task config, hydra node, the secret values: of secret-named keys and of secret-named overrides)."""
    full = OmegaConf.to_container(config, resolve=False)
    hydra_node = full.pop("hydra", {})
    values: set[str] = set()
    _secret_values(full, values)
    for o in list(hydra_node.get("overrides", {}).get("task", [])) + list(hydra_node.get("overrides", {}).get("hydra", [])):
        key, eq, val = str(o).partition("=")
        if eq and SECRET.search(key) and val.strip("'\""):
            values |= {val, val.strip("'\"")}
    return full, hydra_node, values


def redacted_hydra_files(config: DictConfig) -> dict[str, str]:
    """{file name: YAML text} for config.yaml, hydra.yaml and overrides.yaml, secrets replaced."""
    full, hydra_node, values = _split(config)
    task = _scrub(full, values)
    hydra_cfg = {"hydra": _scrub(hydra_node, values)}
    overrides = _scrub(list(hydra_node.get("overrides", {}).get("task", [])), values)
    return {"config.yaml": OmegaConf.to_yaml(OmegaConf.create(task)),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create(hydra_cfg)),
            "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(overrides))}


def redacted_multirun_yaml(config: DictConfig) -> str:
    """The whole config (task + hydra) as a sweep's multirun.yaml, secrets replaced."""
    full, hydra_node, values = _split(config)
    return OmegaConf.to_yaml(OmegaConf.create({**_scrub(full, values), "hydra": _scrub(hydra_node, values)}))


def scrub_log_records(values: set[str]) -> None:
    """From now on, no log record of this process carries one of `values`: Hydra's launchers log every job's
    overrides (`#0 : ... +logger.settings.api_key=...`), the secret among them. A record factory, not a handler
    filter, because Hydra replaces the handlers at every job."""
    values = {v for v in values if v}
    if not values:
        return
    make = logging.getLogRecordFactory()

    def scrubbed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        text = record.getMessage()
        if any(v in text for v in values):
            record.msg, record.args = _scrub(text, values), ()
        return record

    logging.setLogRecordFactory(scrubbed)


class RedactHydraOutput(Callback):
    def __init__(self, subdir: str = ".hydra"):
        self.subdir = subdir

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A DDP child (Lightning re-runs the command with hydra.job.name=train_ddp_process_<rank>) would open its
        # own <run>/train_ddp_process_<rank>.log when Hydra configures logging, right after this hook. With
        # delay=True the file is only created on the first record, and train.main drops the handler first.
        # Rank 0 delays it too: a run refused at start-up (a folder in use) or a finished run that resume=auto
        # leaves alone logs nothing, so it must not append to that folder's train.log either.
        from omegaconf import read_write

        file_handler = OmegaConf.select(config, "hydra.job_logging.handlers.file")
        if isinstance(file_handler, DictConfig):
            with read_write(file_handler), open_dict(file_handler):
                file_handler.delay = True

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        scrub_log_records(_split(config)[2])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._redact_multirun_yaml(config)

    @staticmethod
    def _redact_multirun_yaml(config: DictConfig) -> None:
        # Hydra's basic sweeper saves the whole config, overrides in clear, as <sweep dir>/multirun.yaml before
        # its first job starts; the first job's start (and the sweep's end) rewrites it redacted.
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        path = Path(OmegaConf.select(config, "hydra.sweep.dir", default="") or ".") / "multirun.yaml"
        if path.is_file():
            multirun = OmegaConf.load(path)
            text = redacted_multirun_yaml(multirun)
            if text != OmegaConf.to_yaml(multirun):
                atomic_write_text(path, text)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from dreambench.resilience.runs import launch_rank
        self._redact_multirun_yaml(config)
        if launch_rank() > 0:  # DDP children re-run the entry point: they write nothing to the run folder
            return
        from dreambench.errors import UserError
        from dreambench.resilience import lock
        from dreambench.resilience.checkpoint import finished_and_left_alone, is_fresh, run_held
        run = Path(config.hydra.runtime.output_dir)
        try:
            lock.acquire(run)  # before the first write; train() takes the same lock (reentrant) and reports a refusal
        except UserError:
            return  # another run owns the folder: its .hydra files are not ours to overwrite
        if finished_and_left_alone(OmegaConf.select(config, "resume"), run) is not None:
            return  # a finished run: resume=auto leaves every file of it as it is
        if is_fresh(OmegaConf.select(config, "resume")) and run_held(run):
            return  # a fresh run into a run's folder: refused by train() with one line; the folder stays as it is
        for name, text in redacted_hydra_files(config).items():
            atomic_write_text(run / self.subdir / name, text)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from dreambench.resilience import lock
        lock.release(Path(config.hydra.runtime.output_dir))
