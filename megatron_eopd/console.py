"""What a person sees on the terminal, and where everything else goes.

A run keeps the terminal for its own lines: progress bars, a summary line every few iterations,
the closing table and errors.  :func:`capture_output` sends everything else - third-party logging
and warnings, progress bars of libraries, the output of child processes such as vLLM's engine
core - to a log file: it points the process's stdout and stderr file descriptors at the file, so
C extensions and processes started later write there too, and keeps a copy of the terminal for
:func:`say` and :func:`progress`.  Without a capture both write where they always did (stderr),
so ``tools/train_eopd.py`` under Slurm keeps every line in the job's output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import IO, Iterator, Optional

from tqdm import tqdm

_terminal: Optional[IO[str]] = None  # the terminal while output is captured


def terminal() -> IO[str]:
    """The stream a person reads: the terminal kept by :func:`capture_output`, else stderr."""
    return _terminal if _terminal is not None else sys.stderr


def captured() -> bool:
    return _terminal is not None


def say(message: str) -> None:
    """One line for the person running the job (also kept in the log while output is captured)."""
    tqdm.write(message, file=terminal())
    if captured():
        print(message, file=sys.stdout, flush=True)


_said: set[str] = set()


def say_once(message: str) -> None:
    """:func:`say`, unless this process said it before (runs started one after another repeat it)."""
    if message not in _said:
        _said.add(message)
        say(message)


def progress(**kwargs) -> tqdm:
    """A progress bar on the terminal; it clears itself when closed (the summary lines stay)."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=terminal(), **kwargs)


def quiet_known_warnings() -> None:
    """Megatron-Core's fallback warnings for absent transformer-engine/apex, once stated by
    :func:`megatron_eopd.platform.mcore_compat.describe_accelerators` instead of at every import."""
    for pattern in (r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*",
                    r"full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def capture_output(log_path: Path, *, prog: str) -> Iterator[Path]:
    """Within the block, stdout and stderr (file descriptors 1 and 2, inherited by child processes)
    append to ``log_path``; :func:`say` and :func:`progress` reach the terminal.

    An error leaving the block is written to the log in full, and the terminal gets one line,
    ``<prog>: error: <message>``, and where the log is; then it propagates with the descriptors
    restored.  A stop request (``KeyboardInterrupt``, a stop signal) passes through silently: the
    tool says how it stopped.
    """
    global _terminal
    if captured():  # nested: the outer capture's log keeps everything
        yield log_path
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    _terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    log = open(log_path, "a", buffering=1)
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    try:
        yield log_path
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        from megatron_eopd.errors import EOPDError

        message = str(exc) if isinstance(exc, EOPDError) else f"{type(exc).__name__}: {exc}"
        with os.fdopen(os.dup(saved[2]), "w") as error:
            error.write(f"{prog}: error: {message}\n(full log: {log_path})\n")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        _terminal.close()
        _terminal = None
