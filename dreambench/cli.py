"""The entry points' shell: a mistake on the command line is one line and exit code 2, not Hydra's report.

Hydra prints a composition error over several lines (the override, the OmegaConf cause, the search path, "Set
the environment variable HYDRA_FULL_ERROR=1 ...") and exits 1, the code of a crash. `run(main)` runs a
`@hydra.main` function with Hydra told to raise (HYDRA_FULL_ERROR=1, read when the error happens), turns the
errors that are the user's to fix into one line that says what to type instead, and hands every other exception
back to Hydra's own reporter, so a bug still shows Hydra's trimmed traceback and exit 1.

    a key that does not exist      data.instnce_dir=...  -> did you mean data.instance_dir? (+key adds one)
    an option that does not exist  +experiment=dgo       -> did you mean dog? and the options
    the override grammar           data.instance_dir=~/x, resume=.../step=000300.ckpt -> how to quote it
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from dreambench.errors import USER_ERROR_EXIT_CODE

FULL_ERROR = "HYDRA_FULL_ERROR"


def run(main: Callable[[], Any]) -> NoReturn:
    """`_run(main)`, then the process ends at once (`exit_now`) with main's exit code."""
    try:
        _run(main)
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def exit_now(code: Any = 0) -> NoReturn:
    """End the process as `sys.exit(code)` would, less the interpreter's teardown: the atexit handlers run (logging's
    flush and close, W&B's, multiprocessing's, temporary-folder finalizers), stdout and stderr are flushed, then
    `os._exit`. The teardown it skips, freeing every module and object of torch, Lightning, diffusers and
    transformers one by one, took 1.2 s of the 1.7 s from a tiny run's last step to its exit on this 2-core machine
    (`import torch, lightning` alone: 1.2 s from the last line to the exit), and does nothing a finished run needs."""
    import atexit
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # under cProfile / a debugger / coverage's tracer: their reports come after main returns
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed to stderr, exit 1
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()  # CPython's own atexit runner (private but stable since 2.x; no public equivalent)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream
                pass
        os._exit(code)


def _run(main: Callable[[], Any]) -> Any:
    from hydra.errors import HydraException

    asked_full = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"
    try:
        return main()
    except HydraException as e:
        line = user_message(e)
        if line is None or asked_full:
            _report_like_hydra(e, asked_full)
        print(f"dreambench: error: {line}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE if _is_user_error(e) else 1)
    except Exception as e:
        _report_like_hydra(e, asked_full)
    finally:
        if asked_full is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = asked_full


def _report_like_hydra(e: BaseException, asked_full: str | None) -> None:
    """Hydra's own report of an exception (its trimmed traceback, exit 1), or the exception itself when the
    user set HYDRA_FULL_ERROR. run_and_report is Hydra-internal; if it moves, the plain traceback is shown."""
    if asked_full is None:
        os.environ.pop(FULL_ERROR, None)
        try:
            from hydra._internal.utils import run_and_report
        except ImportError:
            raise e from None

        def again() -> None:
            raise e
        run_and_report(again)
    raise e


def _is_user_error(e: BaseException) -> bool:
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from dreambench.sweep.sweeper import SweepConfigError
    return isinstance(e, (ConfigCompositionException, MissingConfigException, OverrideParseException,
                          SweepConfigError))


def user_message(e: BaseException) -> str | None:
    """One line for a Hydra error the user can fix from the command line; None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    if isinstance(e, OverrideParseException):
        override = getattr(e, "override", None) or first.split(": ", 1)[-1]
        return f"cannot read the override {override!r}: {_grammar_hint(str(override))}"
    if isinstance(e, MissingConfigException):
        return _missing_option(e, first)
    if isinstance(e, ConfigCompositionException):
        cause = e.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause):
            return _unknown_key(cause, first)
        if cause is not None:
            return f"{first} ({str(cause).splitlines()[0]})"
        return first
    if type(e).__module__.startswith("dreambench"):
        return first  # the sweeper's own one-line errors
    return None


def _grammar_hint(override: str) -> str:
    key, _, value = override.partition("=")
    hints = []
    if value.startswith("~"):
        hints.append(f"'~' is not expanded there: write {key}=$HOME{value[1:]} (the shell expands $HOME)")
    if "=" in value:
        hints.append(f"a value holding '=' must be quoted inside the argument: '{key}=\"{value}\"'")
    if not hints:
        hints.append(f"quote a value with spaces or any of  ~ = [ ] {{ }} ( ) , : ' \"  inside the argument: "
                     f"'{key}=\"{value}\"'")
    return "; ".join(hints) + " (Hydra's override grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)"


def _unknown_key(cause: Any, first: str) -> str:
    full_key = str(getattr(cause, "full_key", "") or "")
    parent = getattr(cause, "parent_node", None)
    key = full_key.rsplit(".", 1)[-1] if full_key else str(getattr(cause, "key", "?"))
    prefix = full_key[: -len(key)] if full_key.endswith(key) else ""
    known = []
    try:
        known = [str(k) for k in parent.keys()] if parent is not None else []
    except Exception:  # noqa: BLE001 - suggestions are a courtesy
        known = []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    line = f"{full_key or key} is not a config key"
    if close:
        line += f": did you mean {prefix}{close[0]}?"
    elif known:
        line += f" (keys of {prefix.rstrip('.') or 'the config'}: {', '.join(sorted(known))})"
    return line + f"; to add a new key, prefix it with +: +{full_key or key}=..."


def _missing_option(e: Any, first: str) -> str:
    missing = str(getattr(e, "missing_cfg_file", "") or "")
    options = [str(o) for o in (getattr(e, "options", None) or [])]
    if "/" not in missing or not options:
        return first
    group, name = missing.rsplit("/", 1)
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    line = f"unknown {group} {name!r}"
    if close:
        line += f": did you mean {' or '.join(close)}?"
    shown = ", ".join(options[:40]) + (", ..." if len(options) > 40 else "")
    return line + f" (the {len(options)} options of {group}: {shown})"
