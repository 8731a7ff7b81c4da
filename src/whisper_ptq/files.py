"""Atomic writes: a reader (or a run resumed after a crash) sees the previous complete file or the new one,
never half of one. Data is fsynced before the rename, so a power loss cannot leave a renamed empty file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

from whisper_ptq.errors import UserError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write one file atomically."""
    atomic_write_files(path.parent, {path.name: data})


def atomic_write_files(folder: Path, files: Mapping[str, bytes | str]) -> None:
    """Write several files into `folder`: all are written and synced under temporary names first, then each is
    renamed over its old version, so a failure while writing leaves every old file as it was (and is one line:
    the file and the cause)."""
    temps = {name: folder / f".{name}.tmp" for name in files}
    writing = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            writing = folder / name
            with open(temps[name], "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
                handle.flush()
                os.fsync(handle.fileno())
        for name, temp in temps.items():
            writing = folder / name
            os.replace(temp, folder / name)
    except OSError as exc:  # read-only folder, disk full: the old files are all still there
        raise UserError(f"cannot write {writing}: {exc.strerror or exc}") from None
    finally:
        for temp in temps.values():
            with suppress(OSError):  # on a read-only filesystem even a missing file's unlink fails
                temp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path, mode: int = 0o777) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`, renamed to `target` once the block ends without error
    (removed otherwise). Permissions inside follow the umask like any `mkdir` and `open`, whatever wrote the
    files: tempfile makes the folder private, and some writers (safetensors) make their files 0600. Another
    process finishing the same work first wins: its result is equivalent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(mode & ~umask)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_dir():
                path.chmod(mode & ~umask)
            elif path.is_file():
                path.chmod(0o666 & ~umask)
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
