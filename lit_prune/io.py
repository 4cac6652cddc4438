"""Safe writes for every file and folder lit_prune writes (standard library only: no torch, no Lightning).

Two rules (docs/STYLE.md, rule 20):

* A file is written under a temporary name in its own folder, flushed, and renamed over its place with
  ``os.replace``: a reader (or a run killed half-way) sees the old content or the new one, never part of
  either. New files get ``0o666`` minus the user's umask, as ``open`` would give them.
* A folder (a Hugging Face export) is written beside its place and swapped in as a whole, and only replaces
  a folder that lit_prune wrote itself: a previous export, recognised by its marker file ``lit_prune.json``
  with the key ``lit_prune_export`` (which lists the files of the export). Anything else there is refused
  unless the caller passes ``overwrite=True``.

Why an exchange and not a symlink flip. Writing every export into a versioned folder and flipping a symlink
is atomic too, but the export path would then be a symlink: ``cp -r``, ``tar`` and ``rsync -a`` copy the link
rather than the model, and a folder exported before cannot be turned into a link atomically. On Linux
(>= 3.15; ext4, xfs, btrfs, tmpfs, overlayfs) ``renameat2(RENAME_EXCHANGE)`` swaps the old and the new folder
in one step, so the export path is a plain folder that always holds one complete export. Where the kernel or
the filesystem lacks it (NFS, macOS, Windows), the fallback renames the old folder away and the new one in: two
renames with a short gap, which the next run closes by moving the old export back (see :func:`clean_stale`).

Killed runs leave their temporary folders (``.<name>.tmp-<pid>-<hex>``, ``.<name>.old-<pid>-<hex>``) beside the
export. Each one has an owner file next to it (``<folder>.lit_prune-owner``: pid, host and process start time),
written before the folder exists and removed after it is gone; the next export to the same place deletes the
folders whose owner process is gone (and restores an interrupted fallback swap), and touches nothing else.

Public API::

    atomic_write_bytes(path, data) -> Path
    atomic_write_text(path, text, encoding="utf-8") -> Path
    atomic_open(path, mode="w", encoding=None)  # context manager: a handle, renamed into place on success
    check_placement(path, *, argument, protected=(), containers=(), overwrite_option=...) -> Path
    check_output_dir(path, *, argument, protected=(), containers=(), overwrite=False, overwrite_option=...) -> Path
    check_writable(path, *, argument) -> Path
    replace_directory(path, *, argument, protected=(), containers=(), overwrite=False, overwrite_option=...)
                                                          # context manager: a new folder, swapped in on success
    write_export_marker(folder, card) -> Path
    is_export(folder) -> bool
    clean_stale(path) -> list[Path]

Set ``LIT_PRUNE_IO_PAUSE=<step>`` (``created``, ``written``, ``swapped``, ``moved-old``) to make
:func:`replace_directory` print ``lit_prune.io paused at <step>`` and sleep there: the tests kill the process at
that moment to check that the export path always holds a complete export. It is read at every call and
unset in normal runs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "MARKER_FILENAME",
    "MARKER_KEY",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_placement",
    "check_writable",
    "clean_stale",
    "is_export",
    "replace_directory",
    "write_export_marker",
]

log = logging.getLogger(__name__)

MARKER_FILENAME = "lit_prune.json"
MARKER_KEY = "lit_prune_export"
_MARKER_FORMAT = 1
_OWNER_SUFFIX = ".lit_prune-owner"
_PAUSE_ENV = "LIT_PRUNE_IO_PAUSE"

# Exports written before the marker listed its files: these are the names they could hold.
_LEGACY_EXPORT_FILES = re.compile(
    r"(config|generation_config|adapter_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|"
    r"vocab|prune_plan|lit_prune|model\.safetensors\.index)\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"adapter_model\.safetensors|tokenizer\.model|vocab\.txt|merges\.txt|chat_template\.(jinja|json)|README\.md"
)

# Linux renameat2(2) flags and syscall numbers (used where libc lacks the wrapper, glibc < 2.28).
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}


# ---------------------------------------------------------------------------------------------------- files
def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; when the block succeeds it is flushed and renamed onto ``path``.

    Missing parent folders are created. On error the temporary file is removed and ``path`` is left as it was.

    Args:
        path: The file to (re)place.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: Text encoding (``utf-8`` when None); not used in bytes mode.

    Raises:
        ValueError: For another ``mode``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"`mode` must be 'w' or 'wb'; got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, "tmp")
    # O_EXCL on a fresh name; mode 0o666 lets the kernel apply the user's umask (mkstemp would give 0o600).
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "wb":
            handle = os.fdopen(descriptor, "wb")
        else:
            handle = os.fdopen(descriptor, "w", encoding=encoding or "utf-8")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`) and return the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`) and return the path."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


# ---------------------------------------------------------------------------------------------------- export marker
def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every non-folder entry under ``folder``, and of every empty sub-folder (``x/``)."""
    entries = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in files:
            entries.append((base / name).relative_to(folder).as_posix())
        for name in dirs:
            sub = base / name
            if sub.is_symlink():
                entries.append(sub.relative_to(folder).as_posix())  # os.walk does not descend into it
            elif not any(sub.iterdir()):
                entries.append(sub.relative_to(folder).as_posix() + "/")
    return sorted(entries)


def write_export_marker(folder: str | os.PathLike, card: Mapping) -> Path:
    """Write ``folder/lit_prune.json``: ``card`` plus the marker key that lists every file now in ``folder``.

    Write it last: only a folder with this marker is ever replaced by a later export without ``overwrite``.
    """
    folder = Path(folder)
    files = [f for f in _files_under(folder) if f != MARKER_FILENAME]
    data = {**card, MARKER_KEY: {"format": _MARKER_FORMAT, "files": files}}
    return atomic_write_text(folder / MARKER_FILENAME, json.dumps(data, indent=1, default=str))


def _read_card(folder: Path) -> dict | None:
    try:
        card = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def _foreign_entries(folder: Path) -> list[str] | None:
    """Entries of ``folder`` that its export marker does not list; None if ``folder`` is no lit_prune export."""
    card = _read_card(folder)
    if card is None:
        return None
    marker = card.get(MARKER_KEY)
    entries = [e for e in _files_under(folder) if e != MARKER_FILENAME]
    if isinstance(marker, dict) and isinstance(marker.get("files"), list):
        listed = set(marker["files"])
        return [e for e in entries if e not in listed]
    if "source_model" in card and "versions" in card:  # an export written before the marker key existed
        return [e for e in entries if not _LEGACY_EXPORT_FILES.fullmatch(e)]
    return None


def is_export(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a lit_prune export and nothing else (so an export may replace it)."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and _foreign_entries(folder) == []


# ---------------------------------------------------------------------------------------------------- checks
def _relation(path: Path, other: Path) -> str | None:
    if path == other:
        return "is"
    if other in path.parents:
        return "is inside"
    if path in other.parents:
        return "contains"
    return None


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_placement(
    path: str | os.PathLike,
    *,
    argument: str,
    protected: Sequence[tuple[str, str | os.PathLike]] = (),
    containers: Sequence[tuple[str, str | os.PathLike]] = (),
    overwrite_option: str = "overwrite=True",
) -> Path:
    """Check where a folder lies relative to folders it must not replace (paths only); return it resolved.

    Args:
        path: The folder an export will occupy.
        argument: How the user set ``path`` (``"`model.export_dir`"``), for the messages.
        protected: ``(argument, folder)`` pairs that ``path`` must not be, lie inside, or contain (the source
            model folder).
        containers: ``(argument, folder)`` pairs that ``path`` may lie inside but must not be or contain (the
            run folder: ``<run>/export`` is fine, the run folder itself is not).
        overwrite_option: How the user turns these checks off (``"model.export_overwrite=True"``), for the messages.

    Raises:
        ValueError: Naming ``argument``, its value, the folder it overlaps and what is allowed.
    """
    target = _absolute(path)
    hint = f"choose another folder, or set `{overwrite_option}` to replace it anyway"
    for label, folder in protected:
        relation = _relation(target, _absolute(folder))
        if relation:
            raise ValueError(f"{argument}={os.fspath(path)!r} {relation} the folder of {label}={os.fspath(folder)!r}; "
                             f"the export must be outside it (and must not contain it): {hint}")
    for label, folder in containers:
        relation = _relation(target, _absolute(folder))
        if relation in ("is", "contains"):
            raise ValueError(f"{argument}={os.fspath(path)!r} {relation} {label}={os.fspath(folder)!r}; replacing it "
                             f"would delete that folder's files. Use a new folder, e.g. a sub-folder of it: {hint}")
    return target


def check_output_dir(
    path: str | os.PathLike,
    *,
    argument: str,
    protected: Sequence[tuple[str, str | os.PathLike]] = (),
    containers: Sequence[tuple[str, str | os.PathLike]] = (),
    overwrite: bool = False,
    overwrite_option: str = "overwrite=True",
) -> Path:
    """Check that a folder may be (re)placed by an export, before anything is written; return it resolved.

    Allowed: a path that does not exist yet (or an empty folder), or a folder that holds a previous lit_prune
    export and nothing else, placed as :func:`check_placement` requires.

    Args:
        path, argument, protected, containers, overwrite_option: As in :func:`check_placement`.
        overwrite: Skip these checks: replace whatever is at ``path``.

    Raises:
        ValueError: Naming ``argument``, its value and what is allowed, if ``path`` is a file or a symlink, holds
            anything lit_prune did not write, or overlaps a protected or container folder.
    """
    target = _absolute(path)
    if overwrite:
        return target
    check_placement(path, argument=argument, protected=protected, containers=containers,
                    overwrite_option=overwrite_option)
    hint = f"choose another folder, or set `{overwrite_option}` to replace it anyway"
    unresolved = Path(os.path.expanduser(os.fspath(path)))
    if unresolved.is_symlink():
        raise ValueError(f"{argument}={os.fspath(path)!r} is a symbolic link; it must be a new folder or a previous "
                         f"lit_prune export (a folder with {MARKER_FILENAME}): {hint}")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{argument}={os.fspath(path)!r} is a file; it must be a new folder or a previous lit_prune "
                         f"export (a folder with {MARKER_FILENAME}): {hint}")
    if target.is_dir():
        foreign = _foreign_entries(target)
        if foreign is None:
            if any(target.iterdir()):
                raise ValueError(f"{argument}={os.fspath(path)!r} is a folder that lit_prune did not write (it has no "
                                 f"{MARKER_FILENAME} export marker); exporting there would delete its files. It must "
                                 f"be a new folder or a previous lit_prune export: {hint}")
        elif foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"{argument}={os.fspath(path)!r} holds a lit_prune export plus files it did not write "
                             f"({shown}); exporting there would delete them. Move them out: {hint}")
    return target


def check_writable(path: str | os.PathLike, *, argument: str) -> Path:
    """Check that the folder ``path`` can be created (or replaced) by this process; return its nearest existing
    ancestor. A file is created and removed there to find out (permission bits do not tell for root or a
    read-only mount).

    Raises:
        ValueError: Naming ``argument`` and the folder that cannot be written.
    """
    target = _absolute(path)
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{argument}={os.fspath(path)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".lit_prune-probe-", dir=ancestor)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{argument}={os.fspath(path)!r} is not writable: cannot create files in {str(ancestor)!r} "
                         f"({error.strerror}); choose a folder this process can write") from error
    return ancestor


# ---------------------------------------------------------------------------------------------------- owners
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a live writer from a new process with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def _write_owner(folder: Path, kind: str) -> Path:
    owner = folder.with_name(folder.name + _OWNER_SUFFIX)
    atomic_write_text(owner, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "kind": kind,
                                         "start": _process_start(os.getpid()), "folder": folder.name}))
    return owner


def _owner_gone(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False  # another machine's writer: it cannot be checked from here
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive: another user's process
        pass
    start = _process_start(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]


def _remove_tree(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what killed exports to ``path`` left beside it; return the folders removed or restored.

    Only folders named ``.<name>.tmp-<pid>-<hex>`` / ``.<name>.old-<pid>-<hex>`` that have an owner file whose
    process is gone (on this host) are touched. An ``old`` folder is moved back to ``path`` if ``path`` is
    missing (a fallback swap was interrupted between its two renames); otherwise it is deleted.
    """
    final = Path(path)
    parent = final.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(\d+)-([0-9a-f]+){re.escape(_OWNER_SUFFIX)}")
    handled = []
    owners = sorted((m.group(1) != "old", entry) for entry in parent.iterdir() if (m := pattern.fullmatch(entry.name)))
    for _, owner_file in owners:  # "old" first: restore the previous export before deleting anything
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        folder = owner_file.with_name(owner_file.name[: -len(_OWNER_SUFFIX)])
        name_pid = int(pattern.fullmatch(owner_file.name).group(2))
        if owner.get("pid") != name_pid or owner.get("folder") != folder.name or not _owner_gone(owner):
            continue
        if owner.get("kind") == "old" and folder.is_dir() and not final.exists():
            os.rename(folder, final)
            log.warning("restored %s from %s, left by an export that was killed while swapping", final, folder.name)
        elif folder.exists() or folder.is_symlink():
            _remove_tree(folder)
            log.info("removed %s, left by an export that was killed (pid %d)", folder, name_pid)
        owner_file.unlink(missing_ok=True)
        handled.append(folder)
    return handled


# ---------------------------------------------------------------------------------------------------- swap
def _renameat2_function():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        return function
    number = _SYS_RENAMEAT2.get(os.uname().machine)
    if number is None:
        return None
    return lambda *args: libc.syscall(number, *args)


_RENAMEAT2 = _renameat2_function()


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; False where the kernel or the filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {str(first)!r} and {str(second)!r}: {os.strerror(code)}")


def _pause(step: str) -> None:
    """Test hook: stop at ``step`` when ``LIT_PRUNE_IO_PAUSE`` names it, so a test can kill the process there."""
    if step in os.environ.get(_PAUSE_ENV, "").split(","):
        print(f"lit_prune.io paused at {step}", flush=True)
        while True:
            time.sleep(60)


def _give_umask_modes(folder: Path, umask: int) -> None:
    """Give files in ``folder`` the mode ``open`` would give them: writers that go through ``mkstemp`` (safetensors,
    some ``save_pretrained`` paths) leave them private (0o600), which hides a shared export from the user's group."""
    for root, _, files in os.walk(folder):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                file.chmod(0o666 & ~umask | (file.stat().st_mode & 0o111 & ~umask))


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def replace_directory(
    path: str | os.PathLike,
    *,
    argument: str = "path",
    protected: Sequence[tuple[str, str | os.PathLike]] = (),
    containers: Sequence[tuple[str, str | os.PathLike]] = (),
    overwrite: bool = False,
    overwrite_option: str = "overwrite=True",
) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; when the block succeeds it takes ``path``'s place atomically.

    Before anything is written, leftovers of killed exports to ``path`` are cleaned (:func:`clean_stale`) and
    ``path`` is checked (:func:`check_output_dir`); it is checked again right before the swap. Write the
    export marker (:func:`write_export_marker`) last inside the block, or the next export will refuse the
    folder. On error the new folder is deleted and ``path`` is left as it was.

    Args:
        path: The folder to create or replace.
        argument, protected, containers, overwrite, overwrite_option: As in :func:`check_output_dir`.

    Raises:
        ValueError: From :func:`check_output_dir`.
    """
    final = Path(os.path.expanduser(os.fspath(path)))
    clean_stale(final)
    check_output_dir(final, argument=argument, protected=protected, containers=containers, overwrite=overwrite,
                     overwrite_option=overwrite_option)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final, "tmp")
    tmp_owner = _write_owner(tmp, "tmp")  # before the folder exists: no folder of ours is ever unowned
    old = old_owner = None
    try:
        tmp.mkdir(mode=0o777)  # the umask applies, as for any folder the user creates
        umask = 0o777 & ~tmp.stat().st_mode  # read back: os.umask() would change it process-wide to read it
        _pause("created")
        yield tmp
        _give_umask_modes(tmp, umask)
        _fsync_tree(tmp)
        _pause("written")
        check_output_dir(final, argument=argument, protected=protected, containers=containers, overwrite=overwrite,
                         overwrite_option=overwrite_option)  # again: the run may have taken hours
        if not (final.exists() or final.is_symlink()):
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            _pause("swapped")  # ``final`` holds the new export; ``tmp`` the previous one, deleted below
        else:
            old = _temporary_sibling(final, "old")
            old_owner = _write_owner(old, "old")  # lets the next run move ``old`` back if this one dies in the gap
            os.rename(final, old)
            try:
                _pause("moved-old")
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            _remove_tree(old)
        descriptor = os.open(final.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove_tree(tmp)
        tmp_owner.unlink(missing_ok=True)
        if old_owner is not None and not (old.exists() or old.is_symlink()):
            old_owner.unlink(missing_ok=True)  # (a folder that could not be deleted keeps it, for the next run)
