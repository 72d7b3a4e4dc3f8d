"""Small file-system helpers: outputs appear complete or not at all; folders expanded into files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock


@contextlib.contextmanager
def cache_lock(target: str | Path) -> Iterator[None]:
    """Hold an inter-process lock on the shared cache folder `target` (the file `<target>.lock` beside it).

    Wrap a check-then-build of a cache in it: a second process (another run, another accelerate rank)
    waits, then finds the folder complete, instead of building it too and renaming its copy over the
    folder while the first process reads it. Whoever holds the lock is the only builder of `target`, so
    the `.tmp-<name>-*` and `.old-<name>-*` siblings found then were left by a builder that was killed
    (`atomic_directory`'s names); they are removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(f"{target.name}.lock")):
        for leftover in target.parent.iterdir():
            if leftover.name.startswith((f".tmp-{target.name}-", f".old-{target.name}-")):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On an exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def expand_files(items: Iterable[str | Path], suffixes: Collection[str], kind: str) -> list[str]:
    """Files as given; folders searched recursively (sorted) for `kind` files, i.e. one of `suffixes`.

    A folder without any such file raises `FileNotFoundError` naming it.
    """
    files: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in suffixes)
            if not found:
                raise FileNotFoundError(f"{path}: no {kind} files inside ({', '.join(sorted(suffixes))})")
            files.extend(found)
        else:
            files.append(str(item))
    return files
