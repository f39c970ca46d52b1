"""Atomic file output, so an interrupted job never leaves a half-written result behind.

Both helpers write to a temporary file in the destination folder and move it onto the
destination with ``os.replace``, which is atomic on POSIX file systems when source and
target are in the same folder. Readers therefore see either the old file or the complete
new one. Snakemake deletes the outputs of a failed job anyway, but a file that is never
half-written also stays safe for readers outside Snakemake and for jobs killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _create_temp_file(path: Path) -> Path:
    """Create an empty, hidden temporary file next to ``path`` and return its path.

    The name is ``.<name>.<random hex>.tmp<suffix>``, so it keeps the suffix of ``path``
    (libraries that pick a format from the suffix, such as matplotlib, still work) and
    globs for ``*<suffix>`` do not match it because it starts with a dot. The file is
    created with mode 0o666 minus the umask, the mode a plain ``open(path, "w")`` gives,
    and not the 0o600 of ``tempfile.mkstemp``.
    """
    while True:
        temp_path = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temp_path


def _fsync_file(path: Path) -> None:
    """Flush the data of the file at ``path`` to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush the folder entry of a rename to the storage device, where the OS allows it.

    Some file systems and Windows reject ``open`` or ``fsync`` on a folder. The file itself
    is already complete at that point, so such an error is ignored.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to, and move it onto ``path`` only on success.

    The temporary file already exists (empty) in the folder of ``path`` and keeps its
    suffix, so ``fig.savefig(tmp)`` or ``df.to_csv(tmp)`` infer the same format as for
    ``path``. Missing parent folders of ``path`` are created. When the ``with`` block
    exits normally, the temporary file is fsynced and renamed onto ``path``, replacing any
    existing file. When the block raises, the temporary file is deleted, ``path`` is left
    as it was, and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = _create_temp_file(path)
    try:
        yield temp_path
        _fsync_file(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as UTF-8 JSON to ``path`` atomically, with a trailing newline.

    ``obj`` is serialised before any file is created, so an object that ``json`` cannot
    encode raises ``TypeError`` and leaves no file behind. NaN and infinity are written
    as the non-standard tokens ``NaN`` and ``Infinity`` (the ``json`` module default),
    which Python and pandas read back but strict JSON parsers reject.
    """
    text = json.dumps(obj, indent=indent) + "\n"
    with atomic_output_path(path) as temp_path:
        with open(temp_path, "w", encoding="utf-8") as stream:
            stream.write(text)
