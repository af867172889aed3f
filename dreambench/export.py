"""`python -m dreambench.export run=<run folder> format=single_file|kohya|a1111|diffusers|all`

Writes a finished run's model in the formats other tools load (ComfyUI, AUTOMATIC1111/Forge, InvokeAI,
diffusers) under `<run>/export/<format>/`, and refreshes the run's model card. Formats: dreambench/exporters/.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dreambench.errors import exit_on_user_error


def export(cfg: DictConfig) -> dict[str, list[Path]]:
    from dreambench.config import check_missing
    from dreambench.exporters import export_run

    check_missing(cfg)
    fmt = cfg.format if isinstance(cfg.format, str) else list(OmegaConf.to_container(cfg.format))
    files = export_run(Path(cfg.run), fmt)
    if cfg.card:
        from dreambench.card import write_card
        write_card(Path(cfg.run))
    return files


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        files = export(cfg)
    for name, paths in files.items():
        for p in paths:
            print(f"dreambench: {name}: {p}")


if __name__ == "__main__":
    from dreambench.cli import run
    run(main)
