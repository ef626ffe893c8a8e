"""Where a ``keras-aesam train`` run is written: :class:`RunDirectory` does all of the writing.

A run directory holds ``config.json``, the CSV logs (``history.csv``,
``steps.csv``, ``grad_norms.csv``), ``model.keras``, the backup
``backup/state.npz`` while the run trains, and the plots; the exported
SavedModel goes to a folder of its own. Every file is listed in the folder's
manifest as it is created, and removal deletes only what the manifest lists
(:mod:`keras_aesam.cli.safety`). In a multi-worker cluster only the chief writes
the run directory: another worker writes to a temporary folder, removed by
:meth:`RunDirectory.close`, and reads the chief's backup to resume.

The chief holds the folder's lock (:mod:`keras_aesam.cli.run_lock`) from before it
checks the folder until :meth:`RunDirectory.close`. The backup keeps two
generations (``backup/state.npz`` and the one before, ``backup/state.1.npz``);
a resumed run starts from the newest one that reads back whole
(:meth:`RunDirectory.load_backup`). A full disk is reported as one line naming
the file (:func:`disk_full_message`, exit code :data:`DISK_FULL_EXIT`).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from keras_aesam.cli import safety
from keras_aesam.cli.flags import BadInput, check, write_json
from keras_aesam.cli.run_lock import RunLock
from keras_aesam.validation import canonical_name

__all__ = [
    "BACKUP_FILE",
    "BACKUP_FILES",
    "CSV_FILES",
    "DISK_FULL_EXIT",
    "RUN_FILES",
    "RunDirectory",
    "backup_meta",
    "disk_full_message",
    "is_disk_full",
    "read_config",
]

#: The backup inside a run directory (its generations, newest first), and the CSV logs it keeps in step with.
BACKUP_FILE = "backup/state.npz"
BACKUP_FILES = (BACKUP_FILE, "backup/state.1.npz")
CSV_FILES = ("history.csv", "steps.csv", "grad_norms.csv")
#: Files a run directory gets (the PNGs are claimed by keras_aesam.cli.plots).
RUN_FILES = ("config.json", "config.json.tmp", *CSV_FILES, "model.keras", *BACKUP_FILES, BACKUP_FILE + ".tmp")
#: Exit code of a command stopped by a full disk (sysexits' EX_IOERR).
DISK_FULL_EXIT = 74


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the user's quota) is full."""
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left on device" in str(err)


def disk_full_message(err: BaseException, folder) -> str:
    """One line: the disk is full, the file being written (or the folder, when the error names none)."""
    name = getattr(err, "filename", None)
    where = f"writing {name}" if name else f"writing into {folder}"
    return f"the disk is full ({where}: No space left on device)"
#: What run directories and exports written before the manifest existed hold.
LEGACY_RUN_FILES = ("config.json", *CSV_FILES, "model.keras", "*.png")
LEGACY_EXPORT_FILES = ("saved_model.pb", "fingerprint.pb", "variables/*", "assets/*")


def default_export_root() -> Path:
    """The repository's ``saved_models/`` for a source checkout, else ``./saved_models``."""
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "keras_aesam").is_dir():
        return repo / "saved_models"
    return Path.cwd() / "saved_models"


def read_config(run_dir) -> Optional[dict]:
    """The run's ``config.json``, or None when there is none that can be read."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_finished(config: dict) -> bool:
    """Whether the run of ``config`` ended with its test evaluation."""
    return "test_accuracy" in (config.get("results") or {})


def backup_meta(run_dir) -> Optional[dict]:
    """The newest intact backup's record (step, epoch, batch, ...) without loading a model, or None."""
    from keras_aesam.callbacks import DamagedBackup, read_training_state

    for name in BACKUP_FILES:
        try:
            return read_training_state(Path(run_dir) / name)[0]
        except DamagedBackup:
            continue
    return None


def unfinished(run_dir) -> Optional[str]:
    """``"last backup at step N of T"`` for an interrupted run of ours, else None."""
    config = read_config(run_dir)
    if config is None or is_finished(config):
        return None
    meta = backup_meta(run_dir)
    total = config.get("epochs", 0) * config.get("steps_per_epoch", 0)
    return f"last backup at step {meta['step'] if meta else 0} of {total}"


def _check_replaceable(path: Path, marker: str, legacy: Sequence[str], names: Sequence[str], action: str):
    """BadInput unless the files of ours in ``path`` may be replaced (keras_aesam.cli.safety).

    A folder written before manifests existed is recognised by ``marker`` and its
    ``legacy`` files adopted. A file a user put there under one of ``names`` (which
    the run will write) is refused; other files of theirs are kept.
    """
    if not path.exists():
        return
    check(path.is_dir(), f"{str(path)!r} is a file, not a folder")
    safety.adopt(path, marker, legacy)
    try:
        safety.check_ours(path, action)
    except safety.NotOurs as err:
        raise BadInput(str(err)) from err
    ours = set(safety.written(path))
    clash = [n for n in names if (path / n).exists() and n not in ours]
    check(not clash, f"{action} refuses to replace {', '.join(str(path / n) for n in clash)}: "
          "keras-aesam did not write it")


def _folders(path: Path) -> list:
    """The folders under ``path`` (relative, POSIX; the export's ``variables/``, ``assets/``)."""
    found = []
    for root, dirs, _ in os.walk(path):
        found += [Path(root, d).relative_to(path).as_posix() for d in dirs]
    return found


class RunDirectory:
    """A run's folder and its export: checked before training (:meth:`choose`), then written only here.

    ``path`` is where this process writes; ``read_from`` the run directory of
    record (the chief's: a worker resumes from its backup); ``export_path``
    None for a process that exports nothing.
    """

    def __init__(self, path, export_path=None, *, chief: bool = True, read_from=None, lock=None):
        self.path = Path(path)
        self.export_path = None if export_path is None else Path(export_path)
        self.chief = chief
        self.read_from = self.path if read_from is None else Path(read_from)
        self.lock = lock
        self._created = []

    @classmethod
    def choose(cls, output, export_dir=None, *, name, chief=True, overwrite=False, resume=False) -> "RunDirectory":
        """The run directory ``--output`` (default ``runs/<name>_<time>``) and its export, checked.

        BadInput when either holds files that may not be replaced: an existing
        run without ``--overwrite``/``--resume``, or files keras-aesam did not write;
        run_lock.Locked when another process holds the run directory. The chief
        holds its lock from here until :meth:`close`.
        """
        if output is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{name}_{stamp}"
        else:
            run_dir = Path(output)
        check(run_dir.name not in ("", ".", ".."), f"--output must name a directory, got {output!r}")
        export_path = (Path(export_dir) if export_dir else default_export_root()) / run_dir.resolve().name
        check(not run_dir.exists() or run_dir.is_dir(), f"--output {str(run_dir)!r} is a file")
        if not chief:  # another worker of a cluster: the chief checks and writes the run directory
            return cls(tempfile.mkdtemp(prefix="keras-aesam-worker-"), None, chief=False, read_from=run_dir)
        # Locked first: a folder another process trains in is refused before anything in it is judged.
        lock = RunLock.acquire(run_dir, "keras-aesam train") if run_dir.is_dir() else None
        created = []  # the folders the lock makes: removed by close() while still empty
        try:
            cls._check(run_dir, export_path, overwrite=overwrite, resume=resume)
            if lock is None:
                created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
                lock = RunLock.acquire(run_dir, "keras-aesam train")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        directory = cls(run_dir, export_path, chief=True, lock=lock)
        directory._created = created
        return directory

    @staticmethod
    def _check(run_dir, export_path, *, overwrite, resume):
        """BadInput unless ``run_dir`` and ``export_path`` may be written as asked."""
        if not overwrite and not resume:
            left = unfinished(run_dir)
            check(not run_dir.exists(),
                  f"output directory {str(run_dir)!r} holds an unfinished run ({left}); pass --resume to "
                  "continue it, --overwrite to replace it, or choose another --output" if left else
                  f"output directory {str(run_dir)!r} exists; pass --overwrite to replace it or choose another "
                  "--output")
            check(not export_path.exists(),
                  f"export directory {str(export_path)!r} exists; pass --overwrite or another --export-dir/--output")
        from keras_aesam.cli.plots import PLOT_FILES

        action = "--resume" if resume else "--overwrite"
        _check_replaceable(run_dir, "config.json", LEGACY_RUN_FILES, RUN_FILES + tuple(PLOT_FILES.values()), action)
        _check_replaceable(export_path, "saved_model.pb", LEGACY_EXPORT_FILES, (), action)

    @staticmethod
    def default_name(dataset, network, method) -> str:
        """``<dataset>_<network>_<method>``: the start of a run directory's default name."""
        return f"{dataset}_{canonical_name(network)}_{method}"

    # ------------------------------------------------------------ the files

    def file(self, name: str) -> Path:
        """The path of ``name``, one of :data:`RUN_FILES`."""
        if name not in RUN_FILES:
            raise ValueError(f"{name!r} is not a file of a run directory; they are {', '.join(RUN_FILES)}")
        return self.path / name

    @property
    def backup_file(self) -> Path:
        return self.file(BACKUP_FILE)

    def load_backup(self, model, *, stream=None) -> Optional[dict]:
        """``--resume``: the newest backup generation that reads back whole, loaded into ``model``.

        Every worker of a cluster reads the chief's backup (Keras's BackupAndRestore
        convention). None when there is no backup yet; a damaged generation is
        skipped with a line on ``stream`` (default stderr) naming it and the one
        used; DamagedBackup naming the files when none is intact. ValueError when
        the backup belongs to another model.
        """
        from keras_aesam.callbacks import DamagedBackup, load_training_state

        damaged = []
        for name in BACKUP_FILES:
            path = self.read_from / name
            if not path.is_file():
                continue
            try:
                meta = load_training_state(model, path)
            except DamagedBackup as err:
                damaged.append(str(err))
                continue
            if damaged:
                print(f"keras-aesam: {'; '.join(damaged)}: resuming from the previous backup {path} "
                      f"(step {meta['step']})", file=stream or sys.stderr, flush=True)
            return meta
        if damaged:
            raise DamagedBackup(f"--resume: no intact backup in {self.read_from / 'backup'}: {'; '.join(damaged)}; "
                                f"start the run again with --overwrite")
        return None

    def csv_sizes(self) -> dict:
        """``{name: bytes}`` of the CSV logs: the backup records them to cut the logs back on resume."""
        return {n: (self.path / n).stat().st_size if (self.path / n).exists() else 0 for n in CSV_FILES}

    def prepare(self, *, fresh: bool, csv_sizes: Optional[dict] = None) -> None:
        """Creates the folder and claims its files; ``fresh`` first removes an earlier run's files.

        The CSV logs are cut back to ``csv_sizes`` (a resumed run's backup point; empty by default).
        """
        if fresh and self.chief:
            for folder in (self.path, self.export_path):
                left = safety.remove_written(folder)
                if left:
                    print(f"keras-aesam: kept {len(left)} file(s) in {folder} that keras-aesam did not write: "
                          f"{', '.join(left)}", file=sys.stderr, flush=True)
        self.path.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            safety.claim(self.path / name, self.path)
        if not (self.path / "backup").exists():
            (self.path / "backup").mkdir()
            safety.record(self.path, self.path / "backup")
        sizes = csv_sizes or {}
        for name in CSV_FILES:  # back to the backup's point: every step once
            safety.truncate_written(self.path / name, sizes.get(name, 0), self.path)

    def read_config(self) -> Optional[dict]:
        return read_config(self.path)

    def write_config(self, config: dict) -> Path:
        """Writes ``config.json`` atomically."""
        return write_json(self.file("config.json"), config)

    def save_model(self, model) -> Path:
        """``model.keras``: the trained model with its method."""
        path = self.file("model.keras")
        model.save(path)
        return path

    def export(self, model) -> Optional[Path]:
        """``model.export`` into the export folder, every file listed in its manifest; None if not ours to do."""
        if self.export_path is None or not self.chief:
            return None
        if self.export_path.exists():  # a resumed run's partial export of an earlier attempt
            safety.remove_written(self.export_path)
        before = set(safety.foreign_files(self.export_path)) | set(_folders(self.export_path))
        self.export_path.mkdir(parents=True, exist_ok=True)
        model.export(str(self.export_path), verbose=False)
        new = [p for p in safety.foreign_files(self.export_path) + _folders(self.export_path) if p not in before]
        safety.record(self.export_path, *(self.export_path / p for p in new))
        return self.export_path

    def complete(self) -> None:
        """The run finished: its backups go (``model.keras`` holds the state)."""
        for name in (BACKUP_FILE + ".tmp", *reversed(BACKUP_FILES)):
            safety.discard(self.path / name, self.path)

    def close(self) -> None:
        """Frees the lock; removes a worker's temporary folder (the chief's run directory stays)."""
        if self.lock is not None:
            self.lock.release()
            for folder in self._created:  # a run stopped before writing anything leaves no folder behind
                try:
                    folder.rmdir()
                except OSError:
                    break
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)
