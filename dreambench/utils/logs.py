"""One console line per log record, and none a user cannot act on.

Lightning and transformers each install a console handler of their own at import time; under Hydra, whose
handlers sit on the root logger, every Lightning INFO line and every transformers warning then printed twice
(once bare, once in Hydra's format, which also goes to the run's train.log). Here their records go through the
root handlers only, and what tells a user nothing actionable is dropped: Lightning's advert for a cloud logger,
transformers' notice that torchvision is missing (dreambench has no torchvision on purpose: there is no CPU build
of it for this torch, and transformers' PIL image processors are what it uses), Lightning's "GPU available:
False" lines, and the Lightning warnings below.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's "GPU available: False, used: False" / "TPU available: False, ..." on a machine without them ("GPU
# available: True (cuda), used: ..." stays, and so does Lightning's warning when a GPU is there but unused).
NOT_ACTIONABLE = ("💡 Tip:", "requires torchvision (not installed)", "available: False")
# Lightning's warnings that are true of every dreambench run and ask nothing of the user: the frozen VAE and text
# encoder are in eval mode on purpose, the pytree deprecation is inside Lightning itself, and a run shorter than
# log_every_n_steps has no epoch-level logs to miss (dreambench writes its losses at the last step).
NOT_ACTIONABLE_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                           r"The number of training batches \(\d+\) is smaller than the logging interval")


def _actionable(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in NOT_ACTIONABLE)


def quiet_import_notices() -> None:
    """Drop transformers' torchvision notice from the start: it is logged when diffusers first imports
    `transformers.CLIPImageProcessor` (every entry point, before `route_library_logs_to_root` can run). Needs only
    the standard logging module; `import dreambench` calls it."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if _actionable not in logger.filters:
        logger.addFilter(_actionable)


def route_library_logs_to_root() -> None:
    """Call once the root logger has its handlers (after Hydra configured logging)."""
    if not logging.getLogger().handlers:
        return  # nothing configured the root logger: the libraries' own handlers are the only console output
    import lightning  # noqa: F401 - importing installs the handlers removed here
    import transformers.utils.logging as hf_logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the library's console handler, not a file or user one
                logger.removeHandler(handler)
        logger.propagate = True
    for pattern in NOT_ACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    # Filters sit on the loggers that create the records (a record's own logger's filters apply, its
    # ancestors' do not). transformers' import notice has its filter from `import dreambench` already.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _actionable not in logger.filters:
            logger.addFilter(_actionable)


def library_progress_bars(enabled: bool) -> None:
    """transformers' and diffusers' own bars ("Loading weights", "Writing model shards", "Loading pipeline
    components") follow the run's progress setting: with progress=false a run prints none of them, as it prints no
    bar of its own (the table scripts' logs were full of them). With progress=true they stay, e.g. for a large text
    encoder's load."""
    import diffusers.utils.logging as df_logging
    import transformers.utils.logging as hf_logging

    for lib in (hf_logging, df_logging):
        (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()
