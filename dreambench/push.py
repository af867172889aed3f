"""`python -m dreambench.push run=<run folder> repo_id=<user/name> [private=true] [dry_run=true]`

Publishes a run on the Hugging Face Hub through huggingface_hub: its model card, samples, config and metrics,
and the chosen exports, in one commit. The token is whatever huggingface_hub finds (HF_TOKEN, or the login
cache of `hf auth login`); dreambench never reads it into a config, a file or a log line.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dreambench.errors import UserError, exit_on_user_error

# Besides the exports: what a reader of the repo needs to judge the run (config.yaml is already redacted).
RUN_FILES = ("README.md", "config.yaml", "metrics.json", "eval/metrics.json")


def upload_list(run: Path, exported: dict[str, list[Path]]) -> list[str]:
    """Paths relative to the run folder; they keep that layout in the repo (the card's links rely on it)."""
    files = [run / f for f in RUN_FILES if (run / f).is_file()]
    files += sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    files += [p for paths in exported.values() for p in paths]
    return sorted(dict.fromkeys(p.relative_to(run).as_posix() for p in files))


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"repo_id={repo_id!r}: {str(e).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise UserError(f"repo_id={repo_id!r}: give <user or organisation>/<name>")


def upload(run: Path, files: list[str], repo_id: str, private: bool, message: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()  # token: HF_TOKEN or the stored login, resolved inside huggingface_hub at each call
    if not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (dry_run=true needs none)")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(run / f))
                                                      for f in files], commit_message=message, repo_type="model")
    except HfHubHTTPError as e:  # the message names the repo and status, never the token
        raise UserError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return str(info.commit_url)


def push(cfg: DictConfig) -> tuple[list[str], str | None]:
    from dreambench.card import write_card
    from dreambench.config import check_missing
    from dreambench.exporters import check_run, choose_formats, run_facts

    check_missing(cfg)
    check_repo_id(str(cfg.repo_id))
    run = Path(cfg.run).expanduser()
    check_run(run)
    fmt = cfg.format if isinstance(cfg.format, str) else list(OmegaConf.to_container(cfg.format))
    facts = run_facts(run)
    exported = {}
    for f in choose_formats(fmt, facts["method"], facts["family"]):  # an export not made yet is made now (local work only)
        exported[f.name] = f.existing(run) or f.export(run, facts)
    write_card(run)  # current scores and file list
    files = upload_list(run, exported)
    if cfg.dry_run:
        return files, None
    return files, upload(run, files, str(cfg.repo_id), bool(cfg.private), str(cfg.commit_message))


@hydra.main(version_base="1.3", config_path="../conf", config_name="push")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        files, url = push(cfg)
    verb = "would upload" if url is None else "uploaded"
    print(f"dreambench: {verb} {len(files)} files to {cfg.repo_id}" + (" (private)" if cfg.private else ""))
    for f in files:
        print(f"  {f}")
    if url:
        print(f"dreambench: {url}")


if __name__ == "__main__":
    from dreambench.cli import run
    run(main)
