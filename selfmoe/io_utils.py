"""Crash-safe writes: a directory or a JSON file either appears complete or not at all.

Checkpoints and adapters are directories of several files; a crash (or an exception) halfway through
``save`` must never leave a directory that looks loadable but holds a mix of old and new files. The
recipe is the usual one: write everything into a fresh sibling (same filesystem, so ``rename`` is
atomic), fsync it, then swap it in with renames.

Temporary names start with ``.`` and contain ``.tmp-`` / ``.old-`` plus a random id, so they never
collide with real outputs and are easy to spot if a hard crash (power loss, SIGKILL) leaves one behind.

Every byte goes to disk through one writer (:func:`write_bytes`, :func:`atomic_write_bytes` and
:func:`atomic_write_text` share it), and a failed write raises :class:`WriteError`: an ``OSError`` whose
message names the file (``could not write <path>: No space left on device``), not a bare
``[Errno 28]``.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import pathlib
import shutil
import uuid
import warnings
from typing import Any, Dict, Iterator, Optional, Type, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["WriteError", "atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_path",
           "read_json_object", "safetensors_bytes", "write_bytes", "write_json"]


class WriteError(OSError):
    """Writing a file failed (disk full, permissions, I/O error): ``errno``/``strerror`` of the cause,
    ``filename`` the file meant to be written; ``str()`` is ``could not write <path>: <reason>``."""

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror}"

    @classmethod
    def wrap(cls, exc: BaseException, path: PathLike) -> "WriteError":
        """A :class:`WriteError` for ``path`` with the errno and reason of ``exc`` (an ``OSError`` or not)."""
        if isinstance(exc, WriteError) and exc.filename == os.fspath(path):
            return exc
        code = getattr(exc, "errno", None)
        reason = getattr(exc, "strerror", None) or (os.strerror(code) if code else None) or str(exc) or type(exc).__name__
        return cls(code if code is not None else _errno.EIO, reason, os.fspath(path))


def _sibling(target: pathlib.Path, tag: str) -> pathlib.Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}"


def fsync_path(path: pathlib.Path, directory: bool = False) -> None:
    """fsync a file or a directory entry table, so renames and contents survive a power loss."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        # Some platforms/filesystems (Windows, some FUSE mounts) cannot open directories; durability
        # then rests on the OS, but atomicity (the part callers rely on) does not need the fsync.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: pathlib.Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(pathlib.Path(dirpath) / name)
        fsync_path(pathlib.Path(dirpath), directory=True)


def _remove(path: pathlib.Path) -> None:
    """Best-effort removal of a leftover; a failure only warns because the real work already succeeded."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as exc:  # pragma: no cover - depends on filesystem permissions
        warnings.warn(f"could not remove temporary path {str(path)!r}: {exc}", RuntimeWarning, stacklevel=3)


def _resolve_target(path: PathLike) -> pathlib.Path:
    # Resolve symlinks so that saving "into" a symlinked directory replaces the directory it points to
    # (what the caller means) and the temporary sibling lands on the same filesystem as the real target.
    return pathlib.Path(os.path.realpath(os.fspath(path)))


def _check_replaceable(target: pathlib.Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise NotADirectoryError(f"atomic_directory: {str(target)!r} exists and is not a directory; refusing to replace it")
    if not overwrite and any(target.iterdir()):
        raise FileExistsError(f"atomic_directory: {str(target)!r} exists and is not empty (overwrite=False)")


@contextlib.contextmanager
def atomic_directory(path: PathLike, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yield a fresh empty directory next to ``path``; on success it becomes ``path``.

    On normal exit of the ``with`` block the temporary directory is fsynced and swapped in: the old
    ``path`` (if any) is renamed aside, the new one renamed to ``path``, the old one deleted. On any
    exception (including ``KeyboardInterrupt``) the temporary directory is removed and ``path`` is left
    exactly as it was. Missing parent directories are created.

    Raises ``FileExistsError`` when ``overwrite=False`` and ``path`` exists and is non-empty (checked on
    entry, so no work is wasted, and again before the swap), ``NotADirectoryError`` when ``path`` exists
    and is a file.

    Between the two renames ``path`` is briefly absent; a hard crash exactly there leaves the previous
    contents in a ``.<name>.old-<id>`` sibling, never a half-written ``path``.
    """
    target = _resolve_target(path)
    _check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    # os.mkdir (not tempfile.mkdtemp) so the final directory gets the same umask-derived permissions as
    # one made by a plain mkdir; mkdtemp would leave it 0700.
    os.mkdir(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        _check_replaceable(target, overwrite)  # something may have appeared while the body ran
        if target.exists():
            old = _sibling(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # roll back so the caller still has the previous contents
                raise
            fsync_path(target.parent, directory=True)
            _remove(old)
        else:
            os.rename(tmp, target)
            fsync_path(target.parent, directory=True)
    except BaseException:
        _remove(tmp)
        raise


def _write_all(fd: int, data: bytes) -> None:
    """The one low-level writer: all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_bytes(path: PathLike, data: bytes) -> None:
    """Create or replace ``path`` with ``data`` and fsync it (not atomic: for files inside a directory
    that :func:`atomic_directory` swaps in). Raises :class:`WriteError` naming ``path``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError.wrap(exc, path) from exc


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (no NaN/Infinity, which other readers reject), sorted and indented."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one: a
    temporary file in the same directory, fsynced, then ``os.replace``d over ``path`` (whose directory
    entry is fsynced too). Missing parent directories are created. Any ``OSError`` (a full disk
    included) becomes a :class:`WriteError` naming ``path``, and ``path`` is left as it was."""
    target = _resolve_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(target, "tmp")
        # O_EXCL with mode 0o666: umask applies as for a normal open(), unlike mkstemp's fixed 0600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise WriteError.wrap(exc, path) from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_path(target.parent, directory=True)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise WriteError.wrap(exc, path) from exc
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for text: UTF-8, ``\\n`` line ends written as they are."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see either the old file or the complete new one.

    Serialisation happens before anything touches the disk, so an object that is not JSON serialisable
    (or holds NaN/Infinity) raises ``TypeError``/``ValueError`` and leaves ``path`` untouched. The write
    itself is :func:`atomic_write_text`.
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json_object(path: PathLike, *, missing: str, error: Type[Exception] = ValueError) -> Dict[str, Any]:
    """The JSON object in ``path`` (a config file): ``FileNotFoundError`` with ``missing`` appended when
    the file is absent, ``error`` naming the path when it is not UTF-8 JSON or not an object."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {missing}")
    try:
        with open(p, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise error(f"{p}: expected a JSON object, got {type(obj).__name__}")
    return obj


def safetensors_bytes(tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """``safetensors.torch.save`` with a deterministic header: the same tensors and metadata give the same
    bytes in every process (safetensors writes the metadata in hash-map order, which changes from one
    process to the next, so a resumed run's files would differ from an uninterrupted run's by sha256).
    The header is re-serialised with sorted keys; its length, and so every data offset, is unchanged."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    sorted_header = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(sorted_header) > n:  # cannot happen (same keys and values), but never write a broken file
        raise RuntimeError("safetensors header grew when its keys were sorted")
    return data[:8] + sorted_header + b" " * (n - len(sorted_header)) + data[8 + n:]
