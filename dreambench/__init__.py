"""dreambench: DreamBooth as reproducible experiments (README.md)."""

from dreambench.utils.logs import quiet_import_notices

quiet_import_notices()  # before any entry point imports diffusers (dreambench/utils/logs.py)
del quiet_import_notices
