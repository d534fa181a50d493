"""One writer per output: every command that writes a directory (or a file) holds an exclusive lock
on it for its whole life, and a second process that would write the same place is refused at once,
in one line that names the holder.

The lock is an advisory `flock` on the hidden file `.NAME.lock` beside the output `NAME`: beside it,
so that it exists before the output does and survives the staging directory being renamed into
place. The operating system releases a `flock` when its process dies, however it dies, so a killed
run never leaves a lock that blocks its resume; the file itself is removed when the lock is released
(a killed run's file is taken over, and removed, by the next one). It holds the holder's pid, host,
command and start time, which the refusal quotes.

An output inside one that another process holds (`train --out RUN/mot` while `run --out RUN` runs)
is refused as well; one process may lock an output inside its own (the stages of `run` and
`study`), and may take the same lock again (the count is kept). Under torchrun the ranks of one job
share one lock: rank 0 takes it and tells the others whether it could (`hold_for_job`).

Readers take a shared lock (`flock` LOCK_SH) on the same file, for as long as they read: a command
that reads a prepared dataset or a checkpoint for its whole life (`reads`). Readers do not exclude
each other; a writer that would replace or delete what they read is refused at once, naming them,
and a reader arriving while a writer holds the output is refused likewise. Who holds a lock is
read from /proc/locks (every process that holds a `flock` on the file, with its kind), each named
by the record it wrote into the file (a writer's replaces the file's content, a reader's is a line
appended to it), else by its command line.
"""

import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .lock_holders import holders as _holders

RETRIES, RETRY_DELAY = 5, 0.02  # a lock can be busy for an instant while another process probes it
WAIT_POLL = 0.2  # how often a waiting process looks whether what it waits for is there


class OutputInUse(FileExistsError):
    """Another process writes this output (or one that holds it)."""


class _Held:
    def __init__(self, fd: int, lock: Path, created: list[Path], shared: bool = False):
        self.fd, self.lock, self.created, self.count, self.pid = fd, lock, created, 1, os.getpid()
        self.shared = shared


_held: dict[Path, _Held] = {}  # resolved output -> this process's lock on it


def lock_file(output: str | Path) -> Path:
    """The lock file of `output`: `.NAME.lock` beside it."""
    output = _resolved(output)
    return output.parent / f".{output.name}.lock"


def acquire(output: str | Path, wait: bool = False, option: str | None = None, until=None) -> Path | None:
    """Lock `output` for this process, or raise OutputInUse naming the process that holds it (or
    holds an output around it, or reads it); with `wait`, wait for the holder to end instead (the
    data cache: a second run of the same corpus waits for the first to prepare it), or, with
    `until`, until `until()` is true (the entry is there), returning None then. Creates the missing
    folders above `output` (removed again on release when still empty). Returns the absolute path
    that `release` takes (a relative `output` means another folder once the working directory changes)."""
    key = _resolved(output)
    held = _held.get(key)
    if held is not None and held.pid == os.getpid():
        if held.shared:
            raise OutputInUse(f"{output} is an input of this same command, which reads it; choose another destination")
        held.count += 1
        return key
    if key.parent == key:
        raise ValueError(f"{output} is the root of the file system; choose a folder inside it")
    _check_around(key, output)
    created = [p for p in reversed(key.parents) if not p.exists()]
    key.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_file(key)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:  # a folder we may not write in: one line, as the destination checks say it
            _remove_empty(created)
            shown = f"{option} {output}" if option else str(output)
            raise PermissionError(f"{shown}: cannot write in {lock.parent} ({error.strerror or error})") from None
        if not _try_lock(fd, fcntl.LOCK_EX, wait, until):
            if wait:  # what it waited for is there: nothing to write
                os.close(fd)
                _remove_empty(created)
                return None
            holders, kind = _holders(fd)
            os.close(fd)
            _remove_empty(created)
            doing = "being read by" if kind == "READ" else "in use by"
            raise OutputInUse(f"{output} is {doing} {holders}; wait for {'it' if holders.startswith('another') else 'them'} to end "
                              "or choose another destination")
        if _same_file(fd, lock):  # the file we locked may have been removed by the holder that released it just before
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
    _held[key] = _Held(fd, lock, created)
    return key


def release(output: str | Path | None) -> None:
    """Undo one `acquire(output)` (or `acquire_shared`); the last one removes the lock file and unlocks."""
    if output is None:  # nothing was taken
        return
    key = _resolved(output)
    held = _held.get(key)
    if held is None or held.pid != os.getpid():
        return
    held.count -= 1
    if held.count:
        return
    del _held[key]
    try:
        if held.shared:  # the last holder removes the file: a reader is the last if it can lock it alone
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # other readers hold it still (closing below drops ours)
            if not _same_file(held.fd, held.lock):
                return
        held.lock.unlink(missing_ok=True)  # while still locked: a process waiting on it retries on a new file
    finally:
        os.close(held.fd)
    _remove_empty(held.created)


@contextmanager
def hold(output: str | Path, wait: bool = False, option: str | None = None, until=None, shared: bool = False):
    """`acquire(output)` (`acquire_shared` with `shared`) for the block; yields whether it was taken
    (not when `until` became true while waiting, or a reader found nothing to lock)."""
    key = acquire_shared(output) if shared else acquire(output, wait, option, until)
    try:
        yield key is not None
    finally:
        release(key)


def acquire_shared(source: str | Path) -> Path | None:
    """A reader's lock on `source` for this process: shared with other readers, refused (OutputInUse
    naming the writer) while a writer holds it. None, and nothing held, when `source` does not
    exist (the caller's own check says so) or no lock file can be made or opened beside it (a
    read-only place, where no writer could make one either). The same process may read what it
    writes (a stage reading its own output): that counts as one more hold of its writer's lock."""
    key = _resolved(source)
    held = _held.get(key)
    if held is not None and held.pid == os.getpid():
        held.count += 1
        return key
    if key.parent == key or not key.exists():
        return None
    lock = lock_file(key)
    while True:
        writable = True
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError:
            writable = False
            try:
                fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
        if not _try_lock(fd, fcntl.LOCK_SH):
            holders, _ = _holders(fd)
            os.close(fd)
            raise OutputInUse(f"{source} is being written by {holders}; wait for it to end, then run this again")
        if _same_file(fd, lock):
            break
        os.close(fd)
    if writable:  # one line per reader: the records that name them to a writer
        os.write(fd, (json.dumps({**_record(), "reads": True}) + "\n").encode())
    _held[key] = _Held(fd, lock, [], shared=True)
    return key


def reads(where):
    """Decorator: the call holds a reader's lock on the input it reads for its whole life. `where` is
    the name of the argument, or a function of the call's arguments (by name, defaults applied)
    that returns the path (or None: nothing to lock)."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            source = _path_argument(signature, where, args, kwargs)
            if source is None:
                return function(*args, **kwargs)
            with hold(source, shared=True):
                return function(*args, **kwargs)

        return locked

    return decorate


def _path_argument(signature: inspect.Signature, where, args, kwargs):
    """The path a `reads` / `writes` call locks: the argument named `where`, or `where` applied to
    the call's arguments by name, defaults applied."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments[where] if isinstance(where, str) else where(bound.arguments)


def in_use(path: str | Path) -> bool:
    """Whether another process holds a lock on `path` (a reader, say, of a checkpoint about to be
    deleted): probed with an exclusive lock, taken and dropped at once."""
    if holds(path):
        return False
    try:
        fd = os.open(lock_file(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def writes(where, option: str | None = None):
    """Decorator: the call holds the lock on the output it writes for its whole life. `where` is the
    name of the argument that is the output, or a function of the call's arguments (by name, defaults
    applied) that returns it; `option`, what names it to the user ("--out", "the destination"): with it,
    the output is first tried for writing (checks.check_writable_folder), so that a place nobody may
    write in is that one line, not the lock file's error."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            output = _path_argument(signature, where, args, kwargs)
            if option is not None:  # a place no file can be created in is said as the destination checks say it
                from .checks import check_writable_folder

                # tried where the lock file goes, beside the output: never a probe inside an output
                # that another process may be replacing (or a dataset a kill would leave it in)
                check_writable_folder(Path(output).expanduser().parent, option, shown=output)
            with hold(output, option=option):
                return function(*args, **kwargs)

        return locked

    return decorate


@contextmanager
def hold_for_job(output: str | Path, distributed=None, shared: bool = False):
    """`hold(output)` (a reader's, with `shared`) for a process, or for a torchrun job: rank 0 takes
    the lock and sends the outcome to every rank, so that all go on or all stop with the same error
    (the ranks of one job never refuse each other)."""
    if distributed is None or distributed.world_size == 1:
        with hold(output, shared=shared):
            yield
        return
    import torch.distributed as dist

    refusal, key = None, None
    if distributed.is_main:
        try:
            key = acquire_shared(output) if shared else acquire(output)
        except (OSError, ValueError) as error:
            refusal = [type(error).__name__, str(error)]
    message = [refusal]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        kind, text = message[0]
        raise (OutputInUse if kind == "OutputInUse" else ValueError)(text)
    try:
        yield
    finally:
        if key is not None:
            release(key)


def holds(output: str | Path) -> bool:
    """Whether this process holds the lock on `output`."""
    held = _held.get(_resolved(output))
    return held is not None and held.pid == os.getpid()


def _check_around(key: Path, output) -> None:
    """Refuse an output inside one that another process holds."""
    for folder in key.parents:
        if folder.parent == folder:
            break
        if holds(folder):
            return  # this process writes around it: its own stage
        lock = lock_file(folder)
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no lock file (the common case), or none we may read
            continue
        try:
            if not _try_lock(fd, fcntl.LOCK_SH):
                raise OutputInUse(f"{output} lies inside {folder}, which is written by {_holders(fd)[0]}; "
                                  "wait for it to end or choose another destination")
        finally:
            os.close(fd)  # closing drops the probe's shared lock


def _try_lock(fd: int, kind: int, wait: bool = False, until=None) -> bool:
    """Lock `fd`: a few tries (a lock can be busy for an instant while another process probes it);
    with `wait`, as long as it takes, or until `until()` is true (then False)."""
    if wait and until is None:
        fcntl.flock(fd, kind)
        return True
    while wait:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if until():
                return False
            time.sleep(WAIT_POLL)
    for attempt in range(RETRIES):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < RETRIES:
                time.sleep(RETRY_DELAY)
    return False


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": os.environ.get("TORCHELASTIC_RUN_ID")}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _resolved(output: str | Path) -> Path:
    return Path(os.path.abspath(Path(output).expanduser())).resolve()


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break


def _forget_in_child() -> None:
    """A forked child (a tokenizer worker) does not hold its parent's locks: it closes its copies of
    the descriptors (the lock stays with the parent) and never releases them."""
    for held in _held.values():
        try:
            os.close(held.fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)

__all__ = ["OutputInUse", "acquire", "acquire_shared", "hold", "hold_for_job", "holds", "in_use", "lock_file", "reads",
           "release", "writes"]
