"""File helpers every format shares: folders saved as one unit, consistent folder reads, safe tensor reads.

Weights are read with safetensors or ``torch.load(weights_only=True)`` only, so a file can never run
code.

Writing a format: put every file of the save into the folder ``atomic_folder`` yields, with
``write_file``; the folder replaces the target in one step when the block ends, so a reader sees the
old folder or the new one, never a mix, and an interrupted or crashed save leaves the old folder as
it was. Reading one: wrap the reads in ``consistent_reads`` (``formats.folder.load`` does), so that
``read_bytes``, ``read_tensors`` and ``first_existing`` see one folder even while a save replaces it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import io
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from ..errors import AdapterFileError

CONFIG = "adapter_config.json"  # the config file of every supported format
# Files that belong to one saved adapter in any format fxadapt reads or writes (AdapterHub's head
# files included). A save drops the old folder's copies of these, so no stale weights of another
# format survive beside the new ones (loaders read ``adapter.safetensors`` before
# ``pytorch_adapter.bin``); every other file of the folder is kept. Extend it when adding a format.
ADAPTER_FILES: set[str] = {
    CONFIG,
    "adapter.safetensors",
    "pytorch_adapter.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "head_config.json",
    "pytorch_model_head.bin",
    "model_head.safetensors",
    "head.safetensors",
}
_SNAPSHOT: contextvars.ContextVar[dict[Path, bytes | None] | None] = contextvars.ContextVar(
    "fxadapt_folder_snapshot", default=None
)


# ---- writing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, replaces: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block ends it becomes ``target`` in one step.

    Write every file of the save into the yielded folder (``write_file``). On success the files of
    the old ``target`` that are not adapter files (``replaces``, default ``ADAPTER_FILES``) and that
    the block did not write are carried over (hard links, else copies), the folder takes the old
    one's permissions, and it is swapped in: one ``renameat2(RENAME_EXCHANGE)`` on Linux, two renames
    elsewhere. On any error, Ctrl-C included, the temporary folder is removed and ``target`` is
    untouched. A crash leaves at most a hidden ``.<name>.fxadapt-*`` folder beside ``target``, which
    no load reads and the next save to ``target`` removes.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()  # swap the folder the link points to, keep the link
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            errno.EEXIST, "is a file, not a folder: cannot save an adapter there", str(target)
        )
    drop = ADAPTER_FILES if replaces is None else set(replaces)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        _sweep(target)
    tmp = _make_temp(target)
    try:
        yield tmp
        if target.is_dir():
            _carry(target, tmp, drop)
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        _fsync_dir(tmp)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # after the swap it holds the old folder, if there was one
    _fsync_dir(target.parent)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to disk (in a folder from ``atomic_folder``)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace one file atomically. Not for adapter folders: a save's files go through ``atomic_folder``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(target: Path) -> str:
    return f".{target.name[:120]}.fxadapt-{_host()}-"


def _make_temp(target: Path) -> Path:
    """``.<name>.fxadapt-<host>-<pid>-<random>`` beside ``target``, with the umask's permissions."""
    while True:
        tmp = target.parent / f"{_temp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def _sweep(target: Path) -> None:
    """Remove the temporaries that dead processes of this host left beside ``target``.

    Only while ``target`` exists: a leftover is then a half-written folder or an old folder
    already replaced, never the only copy of an adapter.
    """
    prefix = _temp_prefix(target)
    for entry in os.listdir(target.parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(target.parent / entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _carry(old: Path, new: Path, drop: set[str]) -> None:
    """Bring the old folder's other files into the new one: a save replaces only adapter files."""
    for entry in os.scandir(old):
        if entry.name in drop or (new / entry.name).exists():
            continue
        dst = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _link_or_copy(src: str, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap(new: Path, target: Path) -> None:
    """Make ``new`` the folder at ``target``; afterwards ``new`` holds the old folder, if any."""
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = None
    inside = cwd is not None and (cwd == target or target in cwd.parents)
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):
        aside = new.with_name(new.name + "-old")
        os.rename(target, aside)
        os.rename(new, target)
        os.rename(aside, new)
    if inside:
        os.chdir(cwd)  # the working directory was the old folder: move to the new one


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a filesystem without exchange
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- reading ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def consistent_reads(folder: Path, names: Iterable[str] | None = None) -> Iterator[None]:
    """Read ``folder``'s adapter files (``names``, default ``ADAPTER_FILES``) at once from one folder.

    Inside the block ``read_bytes``, ``read_tensors`` and ``first_existing`` answer from that
    snapshot, so a save that replaces the folder meanwhile cannot give a load the config of one save
    and the weights of another.
    """
    snapshot = _snapshot(Path(folder), sorted(ADAPTER_FILES if names is None else names))
    token = _SNAPSHOT.set(snapshot)
    try:
        yield
    finally:
        _SNAPSHOT.reset(token)


def _snapshot(folder: Path, names: list[str]) -> dict[Path, bytes | None]:
    """The files' bytes (None: absent) through one handle on the folder, retried if it is replaced."""
    if os.open not in os.supports_dir_fd or not folder.is_dir():
        return {folder / n: _read_or_none(folder / n) for n in names}
    for _ in range(10):
        fd = os.open(folder, os.O_RDONLY)
        try:
            present = set(os.listdir(fd))
            out: dict[Path, bytes | None] = {}
            for n in names:
                out[folder / n] = _read_at(fd, n) if n in present else None
            if _same_file(os.fstat(fd), folder):
                return out
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        # a save swapped the folder out meanwhile and may be removing it: read the new one
    raise AdapterFileError(f"{folder} kept changing while it was read; load it again when saves are done")


def _same_file(opened: os.stat_result, path: Path) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)


def _read_at(dir_fd: int, name: str) -> bytes | None:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _snapshot_entry(path: Path) -> tuple[bool, bytes | None]:
    snapshot = _SNAPSHOT.get()
    if snapshot is not None and path in snapshot:
        return True, snapshot[path]
    return False, None


def read_bytes(path: Path) -> bytes:
    """A file's bytes (from the snapshot inside ``consistent_reads``); AdapterFileError if unreadable."""
    known, data = _snapshot_entry(path)
    if known:
        if data is None:
            raise AdapterFileError(f"{path} is missing")
        return data
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"{path} could not be read: {exc}") from exc


def is_file(path: Path) -> bool:
    known, data = _snapshot_entry(path)
    return data is not None if known else path.is_file()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a weights-only torch pickle; a clear error otherwise."""
    if not is_file(path):
        raise AdapterFileError(f"adapter weights file {path} is missing")
    data = read_bytes(path)
    try:
        if path.suffix == ".safetensors":
            tensors = load_safetensors(data)
        else:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFileError(
            f"adapter weights file {path} could not be read (corrupt or truncated?): {exc}"
        ) from exc
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterFileError(f"adapter weights file {path} does not hold a flat dict of named tensors")
    return tensors


def first_existing(path: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` that exists in folder ``path``."""
    for n in names:
        if is_file(path / n):
            return path / n
    raise AdapterFileError(f"no adapter weights in {path}: expected one of {list(names)}")
