"""Delete only what we wrote.

Every command of the project that writes into a folder (a ``keras-aesam train``
run directory, its exported SavedModel, a ``keras-aesam bench`` output, the
plots, an example's tables) lists each file it creates in that folder's
manifest, ``.keras-aesam-files`` (one path per line, relative to the folder
that holds the manifest and written ``./name``, appended as the file is
created, so worker processes can add to it). Entries do not depend on the
working directory: a run written as ``runs/e`` is the same run read from
anywhere. Manifests of earlier versions held bare paths relative to the
working directory of the writer (``runs/e/config.json``); they are read too
(:func:`_old_entry`). Every operation that removes or overwrites files asks
this module first:

* :func:`claim` before writing a file: refused (:class:`NotOurs`) when the file
  exists and the manifest does not list it; otherwise the file is recorded.
* :func:`remove_written` deletes the files the manifest lists, then the folders
  it lists that are empty, and nothing else; it returns what was left (files a
  user put there), for the caller to name in a warning.
* :func:`check_ours` refuses a non-empty folder that holds no manifest (a
  mistyped ``--output`` pointing at someone's work).
* :func:`truncate_written` cuts a file we wrote back to a given size (the CSV
  logs of a resumed run).

Nothing here follows symbolic links out of the folder or removes a non-empty
directory, and manifest entries that point outside the folder are ignored.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

from keras_aesam.cli.run_lock import LOCK_FILE

__all__ = [
    "MANIFEST",
    "NotOurs",
    "adopt",
    "check_ours",
    "claim",
    "discard",
    "foreign_files",
    "is_ours",
    "record",
    "remove_written",
    "truncate_written",
    "written",
]

#: The manifest's file name inside each folder we write into.
MANIFEST = ".keras-aesam-files"
#: Files of ours that no manifest lists: the manifest and the lock of a running command.
_BOOKKEEPING = (MANIFEST, LOCK_FILE)

PathLike = Union[str, "os.PathLike[str]"]


class NotOurs(ValueError):
    """An operation would delete or overwrite a file keras-aesam did not write."""


def _relative(folder: Path, path: PathLike) -> Optional[str]:
    """``path`` (absolute, or relative to the working directory, as the caller holds it)
    relative to ``folder`` (POSIX form), or None if it lies outside."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    text = Path(rel).as_posix()
    if text in ("", ".") or text == ".." or text.startswith("../"):
        return None
    return text


def _plain(entry: str) -> bool:
    """Whether a manifest entry (without its ``/``) is a normalized path inside the folder."""
    return (bool(entry) and not entry.startswith("/") and posixpath.normpath(entry) == entry
            and entry not in (".", "..") and not entry.startswith("../"))


def _old_entry(folder: Path, entry: str) -> Optional[str]:
    """An entry of an earlier manifest (no ``./``), relative to ``folder``.

    Those entries were relative to the writer's working directory: the folder as
    it was given (``runs/e``) followed by the file. The folder as given is a tail
    of its absolute path, so the entry ``runs/e/config.json`` of ``/x/runs/e``
    means ``config.json``. An entry that also reads as a file of the folder as it
    stands (a folder given by its absolute path was written that way) is taken
    as it stands when that file exists.
    """
    parts = entry.split("/")
    tail = Path(os.path.abspath(folder)).parts
    for k in range(1, min(len(parts) - 1, len(tail)) + 1):
        if tuple(parts[:k]) == tail[len(tail) - k:]:
            rest = "/".join(parts[k:])
            if not (folder / entry).exists() or (folder / rest).exists():
                return rest
    return entry


def record(folder: PathLike, *paths: PathLike) -> None:
    """Adds ``paths`` (files, or folders we created; absolute or relative to the working
    directory, like ``folder``) to ``folder``'s manifest, each as ``./<path in folder>``."""
    folder = Path(folder)
    lines = []
    for path in paths:
        rel = _relative(folder, path)
        if rel is None or rel in _BOOKKEEPING:
            continue
        if Path(folder, rel).is_dir() and not Path(folder, rel).is_symlink():
            rel += "/"
        lines.append("./" + rel + "\n")
    if not lines:
        return
    folder.mkdir(parents=True, exist_ok=True)
    # One write per call in append mode: lines from several processes do not mix.
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, "".join(lines).encode("utf-8"))
    finally:
        os.close(fd)


def written(folder: PathLike) -> List[str]:
    """The manifest's entries relative to ``folder`` (folders end in ``/``), first occurrence order."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return []
    seen = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry.startswith("./"):
            entry = entry[2:]
        elif entry:
            entry = _old_entry(folder, entry.rstrip("/")) + ("/" if entry.endswith("/") else "")
        bare = entry.rstrip("/")
        if not _plain(bare) or entry in seen or _through_link(folder, bare):
            continue  # absolute, '..', odd, or reached through a link: not ours to touch
        seen.append(entry)
    return seen


def _through_link(folder: Path, rel: str) -> bool:
    """Whether a folder on the way from ``folder`` to ``rel`` is a symbolic link."""
    parts = rel.split("/")[:-1]
    return any((folder.joinpath(*parts[: i + 1])).is_symlink() for i in range(len(parts)))


def is_ours(folder: PathLike) -> bool:
    """Whether ``folder`` holds a manifest (something of ours was written there)."""
    return (Path(folder) / MANIFEST).is_file()


def _owned(folder: Path, path: PathLike) -> bool:
    rel = _relative(folder, path)
    return rel is not None and (rel in written(folder) or rel + "/" in written(folder))


def foreign_files(folder: PathLike) -> List[str]:
    """Files and links under ``folder`` the manifest does not list (relative, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = {e for e in written(folder) if not e.endswith("/")}
    found = []
    for root, dirs, files in os.walk(folder):  # os.walk does not enter linked folders
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel not in _BOOKKEEPING and rel not in ours:
                found.append(rel)
    return sorted(found)


def check_ours(folder: PathLike, action: str) -> None:
    """Refuses (NotOurs) when ``folder`` exists, is not empty and holds no manifest.

    ``action`` names what was asked, for the message (e.g. ``"--fresh"``).
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise NotOurs(f"{action} refuses {str(folder)!r}: it is a file, not a folder")
    if is_ours(folder) or not any(p.name not in _BOOKKEEPING for p in folder.iterdir()):
        return
    raise NotOurs(
        f"{action} refuses to delete anything in {str(folder)!r}: it is not empty and keras-aesam "
        f"wrote nothing there (no {MANIFEST}); choose another folder"
    )


def claim(path: PathLike, root: Optional[PathLike] = None) -> Path:
    """Checks that ``path`` may be (over)written and records it in ``root``'s manifest.

    ``root`` (default: the file's folder) is the folder whose manifest lists it.
    Raises NotOurs when the file exists and is not listed there.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    if _relative(root, path) is None:
        raise NotOurs(f"{str(path)!r} is not inside {str(root)!r}")
    if (path.exists() or path.is_symlink()) and not _owned(root, path):
        raise NotOurs(
            f"refusing to overwrite {str(path)!r}: keras-aesam did not write it "
            f"(not listed in {str(root / MANIFEST)!r}); move it away or choose another folder"
        )
    if not _owned(root, path):
        record(root, path)
    return path


def adopt(folder: PathLike, marker: str, patterns: Sequence[str]) -> List[str]:
    """Records the files of an older keras-aesam output that predates manifests.

    Only when ``folder`` has no manifest and holds ``marker`` (a file only our
    command writes there): the existing files whose relative path matches one of
    ``patterns`` (``fnmatch``) are recorded. Returns them.
    """
    folder = Path(folder)
    if is_ours(folder) or not (folder / marker).is_file():
        return []
    matched = [rel for rel in foreign_files(folder)
               if any(fnmatch.fnmatchcase(rel, p) for p in patterns)]
    record(folder, *(folder / rel for rel in matched))
    return matched


def remove_written(folder: PathLike, *, keep: Iterable[str] = ()) -> List[str]:
    """Deletes what ``folder``'s manifest lists, except ``keep``; returns what is left.

    Files first, then the listed folders that are empty afterwards (deepest
    first), then the manifest itself if nothing else remains, then ``folder`` if
    it is empty. Returns the paths (relative, sorted) of the files left behind:
    the caller names them in a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    keep = set(keep)
    entries = written(folder)
    remaining = []
    for entry in entries:
        if entry.endswith("/") or entry in keep:
            continue
        path = folder / entry
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():  # listed as a file but now a folder: someone else's
            remaining.append(entry)
    for entry in sorted((e for e in entries if e.endswith("/")), key=lambda e: -e.count("/")):
        path = folder / entry.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()  # only when empty
            except OSError:
                remaining.append(entry)
    remaining += [e for e in entries if e in keep and (folder / e).exists()]
    manifest = folder / MANIFEST
    if remaining:
        manifest.write_text("".join("./" + e + "\n" for e in remaining), encoding="utf-8")
    elif manifest.exists():
        manifest.unlink()
    left = foreign_files(folder)
    if not remaining and not left:
        try:
            folder.rmdir()
        except OSError:
            pass
    return left


def discard(path: PathLike, root: Optional[PathLike] = None) -> bool:
    """Deletes one file we wrote (listed in ``root``'s manifest), then its folder if
    that is listed and now empty. Returns whether the file was deleted."""
    path = Path(path)
    root = path.parent if root is None else Path(root)
    if not (path.is_file() or path.is_symlink()) or not _owned(root, path):
        return False
    path.unlink()
    parent = path.parent
    if parent != root and _owned(root, parent) and not any(parent.iterdir()):
        parent.rmdir()
    return True


def truncate_written(path: PathLike, size: int, root: Optional[PathLike] = None) -> None:
    """Cuts a file we wrote back to its first ``size`` bytes (NotOurs otherwise)."""
    path = Path(path)
    root = path.parent if root is None else Path(root)
    if not path.exists():
        if size:
            raise FileNotFoundError(f"{str(path)!r} is missing: cannot restore its first {size} bytes")
        return
    if not _owned(root, path):
        raise NotOurs(f"refusing to truncate {str(path)!r}: keras-aesam did not write it")
    if path.stat().st_size < size:
        raise ValueError(f"{str(path)!r} is shorter ({path.stat().st_size} bytes) than recorded ({size})")
    with open(path, "r+b") as f:
        f.truncate(size)
