"""The CLI in a child process that starts without importing the training stack again.

Children fork from one `multiprocessing` fork server per test session. The server imports the CLI and
the trainer (torch, accelerate, diffusers, transformers, peft) once, and has run no tensor code, so a
child starts as a fresh interpreter would after those imports: about 8 s of imports saved per child.
A child can SIGKILL itself at a named moment (`tests/test_kills.py`), or be SIGKILLed by the test.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["mmalign.cli", "mmalign.train.trainer", "mmalign.models.diffusion"])


def _main(argv: list[str], log: str, prepare: Callable[[], None] | None) -> None:
    """The child: output to `log`, `prepare()` (e.g. a patch that kills it), then the CLI's exit code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if prepare is not None:
        prepare()
    from mmalign.cli import main

    sys.exit(main(argv))


def start_cli(argv: list[str], log: Path, prepare: Callable[[], None] | None = None) -> BaseProcess:
    """Start `mmalign <argv>` in a child writing its stdout and stderr to `log`; `prepare` (a module-level
    function) runs in the child first. `.exitcode` is the CLI's exit code, or -9 after a SIGKILL."""
    child = _CONTEXT.Process(target=_main, args=(argv, str(log), prepare))
    child.start()
    return child


def run_cli(argv: list[str], log: Path, prepare: Callable[[], None] | None = None) -> int:
    """`start_cli` and wait: the child's exit code."""
    child = start_cli(argv, log, prepare)
    child.join()
    return child.exitcode
