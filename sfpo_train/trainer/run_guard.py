"""What keeps a run directory consistent: one writer at a time, whole files only, and a clean stop on a signal.

- :func:`lock_run_dir`: an exclusive ``fcntl.flock`` on ``<run>/.lock``, taken before
  any work and held until the process exits. The file holds the holder's pid,
  for the message a second process gets. A lock is never stale: the kernel drops
  a ``flock`` when its holder dies (even by SIGKILL), so a leftover ``.lock``
  file from a dead process locks nothing.
- :func:`write_atomic`: a file written under a per-process temporary name
  (``<name>.tmp.<pid>``) and renamed over the old one, so a reader (or a kill)
  sees the old file or the new one, never half of one; a failed write removes
  its temporary.
- :func:`writing`: a full disk, an exceeded quota, a read-only file system or a
  missing permission while writing becomes a :class:`WriteError`, one line
  naming the path and the cause.
- :class:`StopOnSignal`: SIGINT / SIGTERM set a flag the training loop checks
  after each step (it then saves a checkpoint and stops); a second signal
  aborts at once (``KeyboardInterrupt``, or ``SystemExit(143)`` for SIGTERM).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading

LOCK_FILE = ".lock"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it


class RunWarning(UserWarning):
    """Something about a run directory the user should know (a skipped checkpoint, a dropped torn line, a restart)."""


_held: dict[str, int] = {}  # realpath of a run directory -> the descriptor holding its lock (this process)


class WriteError(ValueError):
    """A run file could not be written (disk full, quota, read-only, permission): one line naming the path.

    ``path`` and ``errno`` say which file and why, for callers that treat a full disk apart (``sfpo compare``).
    """

    def __init__(self, path: str, errno_: int):
        super().__init__(f"cannot write {path}: {_WRITE_ERRNOS[errno_]} ({errno.errorcode[errno_]})")
        self.path, self.errno = path, errno_


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left: freeing some lets the same command go on


_WRITE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextlib.contextmanager
def writing(path: str):
    """Turn an OSError of :data:`_WRITE_ERRNOS` raised inside into a :class:`WriteError` naming the file (or ``path``)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise WriteError(e.filename or path, e.errno) from None


def tmp_name(path: str) -> str:
    """``path`` with this process's temporary suffix: two processes never write the same temporary file."""
    return f"{path}.tmp.{os.getpid()}"


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (the old content or the new, never a mix)."""
    tmp = tmp_name(path)
    with writing(tmp):
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def lock_run_dir(run_dir: str) -> bool:
    """Take ``<run_dir>/.lock`` for the rest of this process (creating ``run_dir``); returns whether it created it.

    A process may lock the same run directory again (a no-op). Another process
    holding it: ``ValueError`` naming the directory and the holder's pid.
    """
    key = os.path.realpath(run_dir)
    if key in _held:
        return False
    created = not os.path.isdir(run_dir)
    path = os.path.join(run_dir, LOCK_FILE)
    with writing(path):
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"run directory {run_dir!r} is in use by another sfpo train (pid {_holder(path)}, "
            f"see {path}); wait for it to finish or stop it first"
        ) from None
    except OSError as e:  # ENOLCK / EOPNOTSUPP: a file system without flock (some network mounts)
        os.close(fd)
        raise ValueError(
            f"run directory {run_dir!r}: cannot lock {path} ({e.strerror}); put runs on a local "
            "file system (trainer.default_local_dir)"
        ) from None
    try:
        same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:  # removed by unlock_run_dir between our open and flock
        same_file = False
    if not same_file:  # we hold a lock on a file that is no longer the run's lock: take the new one
        os.close(fd)
        return lock_run_dir(run_dir)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    return created


def holds_lock(run_dir: str) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return os.path.realpath(run_dir) in _held


def unlock_run_dir(run_dir: str, *, remove: bool = False) -> None:
    """Release this process's lock on ``run_dir``; with ``remove`` also delete ``.lock`` and the directory if empty."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is None:
        return
    if remove:
        os.unlink(os.path.join(run_dir, LOCK_FILE))
        try:
            os.rmdir(run_dir)
        except OSError:
            pass  # something else is in it now: keep it
    os.close(fd)


def unwritable_run_dir(run_dir: str, error: OSError | WriteError, local_dir: str) -> str:
    """One line for a run directory that cannot be made or locked: the directory, the cause and the key to change."""
    if isinstance(error, WriteError):
        what = str(error)
    else:
        code = errno.errorcode.get(error.errno, str(error.errno))
        what = f"cannot create {error.filename or run_dir}: {error.strerror or error} ({code})"
    return (
        f"run directory {run_dir}: {what}; runs are written under trainer.default_local_dir={local_dir!r}: "
        "run from a writable directory or set trainer.default_local_dir to one"
    )


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


class StopInterrupt(KeyboardInterrupt):
    """Training stopped on a signal after a whole step; ``checkpoint`` (None: no step was done) is where it resumes.

    A ``KeyboardInterrupt``, so code that does not know it (``except Exception``) lets it through as it would Ctrl-C.
    """

    def __init__(self, signum: int, global_step: int, run_dir: str, checkpoint: str | None):
        self.signum, self.global_step, self.run_dir, self.checkpoint = signum, global_step, run_dir, checkpoint
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no step was finished, no checkpoint"
        super().__init__(f"stopped by {name} after step {global_step}: {where}")


class StopOnSignal:
    """``with StopOnSignal() as stop:`` SIGINT / SIGTERM set ``stop.signum``; the previous handlers come back on exit.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second one: stop now, as if no handler were installed
            if signum == signal.SIGTERM:
                raise SystemExit(EXIT_CODES[signum])
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler interrupting a print to stderr would re-enter its buffer
        os.write(
            2,
            f"\nsfpo train: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(send it again to abort at once)\n".encode(),
        )
