"""The run folder: ``config.yaml``, ``metrics.jsonl``, ``train.log``, ``checkpoints/``, the backbone.

A folder that already holds a run is never overwritten by accident, and two processes never
write into one folder at once (an exclusive lock held for the whole run).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from ssl_pretrain.checkpoint import BACKBONE_FILE, LAST_CHECKPOINT, atomic_write
from ssl_pretrain.errors import SSLError

log = logging.getLogger("ssl_pretrain")


class RunFolderError(SSLError, RuntimeError):
    """The output folder cannot be used as asked (one-line message)."""


class RunFolder:
    """Owns one run folder for the duration of a run (use as a context manager)."""

    def __init__(self, path: str | Path, writer: bool = True):
        """``writer=False``: the other ranks of a distributed run, which read checkpoints but
        never write into the folder (rank 0 owns it)."""
        self.path = Path(path)
        self.writer = writer
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.log_file = self.path / "train.log"
        self.last_checkpoint = self.path / LAST_CHECKPOINT
        self.backbone_file = self.path / BACKBONE_FILE
        self._lock_handle = None
        self._log_handler: Optional[logging.Handler] = None

    def holds_run(self) -> bool:
        return self.config_file.exists() or self.last_checkpoint.exists()

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create (or, with ``overwrite``, empty) the folder, take its lock, start the log file.

        Raises:
            RunFolderError: the folder holds a run and neither ``resume`` nor ``overwrite`` was
                given, or another process is writing into it.
        """
        if not self.writer:
            return
        if self.holds_run() and not resume and not overwrite:
            raise RunFolderError(
                f"{self.path} already holds a run: pass --resume to continue it, "
                "or --overwrite to delete it and start again"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        if overwrite and not resume:
            for child in self.path.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self._start_log_file()
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        """A run killed while writing a checkpoint leaves its ``.last.pt.*.tmp`` behind (as big as
        a checkpoint); holding the lock, we know no one is still writing it."""
        for folder in (self.path, self.last_checkpoint.parent):
            for stale in folder.glob(".*.tmp"):
                if stale.is_file():
                    stale.unlink()
                    log.info("removed %s, left by a run stopped while writing it", stale)

    def _take_lock(self) -> None:
        self._lock_handle = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            self._lock_handle = None
            raise RunFolderError(f"another process is already writing into {self.path}") from None

    def _start_log_file(self) -> None:
        logger = logging.getLogger("ssl_pretrain")
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the run log always gets INFO lines
        # File names that are not valid UTF-8 reach us as surrogate escapes; written as \udcXX
        # rather than raising inside logging (which would drop the very line that names them).
        handler = logging.FileHandler(self.log_file, encoding="utf-8", errors="backslashreplace")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        self._log_handler = handler

    def write_config(self, config: dict[str, Any]) -> None:
        if not self.writer:
            return
        text = yaml.safe_dump(config, sort_keys=False).encode()
        atomic_write(self.config_file, lambda file: file.write(text))  # never half a config

    def read_config(self) -> Optional[dict[str, Any]]:
        return yaml.safe_load(self.config_file.read_text()) if self.config_file.exists() else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        try:
            with open(self.metrics_file, "a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            hint = " (disk full)" if error.errno == errno.ENOSPC else ""
            raise RunFolderError(f"could not write {self.metrics_file}{hint}: {error.strerror or error}; "
                                 "the last checkpoint is intact") from None

    def trim_metrics(self, after_step: int) -> None:
        """On resume, drop records written after the checkpoint, so none is counted twice."""
        if not self.writer:
            return
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # blank, or the torn last line of a run stopped mid-write (kill, full disk)
            if record.get("step", 0) <= after_step:
                kept.append(line)
        text = "".join(line + "\n" for line in kept).encode()
        atomic_write(self.metrics_file, lambda file: file.write(text))  # a kill now loses nothing

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("ssl_pretrain").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be swapped, e.g. by pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    """Log lines of the package to stderr once (the CLI calls this; library users choose)."""
    logger = logging.getLogger("ssl_pretrain")
    logger.setLevel(level)
    if not any(isinstance(handler, _CurrentStderrHandler) for handler in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
