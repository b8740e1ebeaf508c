"""One writer per output: an exclusive `flock` on `<out>.lock`, held until the final rename is done.

Two commands writing the same `--out` would interleave their `<out>.partial` writes and could leave
a damaged file under the final name. So the process that decides about an output (`plan_output`,
or a stage whose output is a folder) first claims it; a second process gets a `UserError`:

    OUT is being written by process PID; wait for it or choose another --out

Why these mechanics:
- `fcntl.flock` on `<out>.lock` (beside the output, never inside `<out>.partial`'s name space): the
  kernel drops the lock when its holder dies, even by SIGKILL, so a lock file left behind by a
  killed run is only a stale file; the next run locks it and carries on.
- The lock file holds the holder's PID, for the message only; it proves nothing by itself.
- The holder deletes the file while it still holds the lock, then closes it. A process that opened
  the old file just before the delete may win the lock on that deleted inode, so after locking it
  checks that the path still names the inode it locked, and starts over if not. Two holders of one
  path are therefore impossible, and no lock file outlives a run that ends normally.
- A claim lasts until the outermost `claim_scope()` ends: the CLI opens one per command, so a
  command keeps its outputs until it ends, sidecar files included (`ssl run` keeps every stage's
  output until the whole run ends); stage functions wrap themselves in one for callers from Python;
  a claim made outside any scope lasts until the process exits. Claims are re-entrant within one
  process. `output_lock` instead holds a lock for the body of its `with` statement.
- Under torchrun only rank 0 claims: it is the rank that writes (see `ssl_cli/train/distributed.py`);
  the other ranks only read, so they need no lock and cannot deadlock on one.
- Forked children (DataLoader workers) close their inherited copies of the lock files at once, so a
  killed parent's lock is released when the parent dies, not when its last worker notices.
- On several machines `--out` sits on a filesystem they share, and the lock is that filesystem's:
  NFS (v4, or v3 with its lock service) and Lustre mounted with `-o flock` lock across machines. One
  that keeps no locks answers flock with an error, and the claim refuses with a `UserError` saying so
  rather than writing unguarded. The PID in the file may belong to another machine.
- Without `fcntl` (Windows, which is out of scope) claims do nothing: there is no locking there.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ssl_cli.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking; concurrent writers are the user's business there
    fcntl = None  # type: ignore[assignment]

WRITING = "{target} is being written by process {pid}; wait for it or choose another --out"
# flock's answers on a filesystem that keeps no locks (NFS without its lock service, Lustre mounted
# without -o flock, some FUSE filesystems): the shared filesystems several machines write to.
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
NO_LOCKS_HERE = ("cannot lock {path}: its filesystem keeps no file locks ({reason}); put --out on one that does "
                 "(NFS with its lock service, Lustre mounted with -o flock, a local disk)")


@dataclass
class _Held:
    path: Path  # the lock file
    fd: int
    count: int = 1


_held: dict[Path, _Held] = {}
_scopes: list[list[Path]] = []
_process_scope: list[Path] = []  # claims made outside any scope: released at exit
_mutex = threading.RLock()


def lock_path(target: Path) -> Path:
    """`<target>.lock` beside `target` (a file or a folder), with the folder's symlinks resolved."""
    absolute = Path(os.path.abspath(target))
    return Path(os.path.realpath(absolute.parent)) / (absolute.name + ".lock")


def writer_process() -> bool:
    """False on torchrun ranks other than 0, which never write outputs (RANK as in `launched_world`)."""
    return os.environ.get("RANK", "0") == "0"


def claim_output(target: Path, busy: str = WRITING) -> None:
    """Hold the exclusive lock of `target` until the outermost `claim_scope()` ends.

    Raises `UserError(busy.format(target=..., pid=...))` at once if another process holds it.
    """
    path = _claim(target, busy)
    if path is not None:
        with _mutex:
            (_scopes[0] if _scopes else _process_scope).append(path)


@contextmanager
def claim_scope() -> Iterator[None]:
    """Release, on exit, the claims made inside, unless an enclosing scope will. Also a decorator:
    `@claim_scope()` on a stage's `run`."""
    with _mutex:
        claims: list[Path] = []
        _scopes.append(claims)
    try:
        yield
    finally:
        with _mutex:
            if any(scope is claims for scope in _scopes):  # not in a forked child that forgot them
                _scopes[:] = [scope for scope in _scopes if scope is not claims]
                for path in reversed(claims):
                    _release(path)


@contextmanager
def output_lock(target: Path, busy: str = WRITING) -> Iterator[None]:
    """Hold the exclusive lock of `target` for the body of the `with` statement."""
    path = _claim(target, busy)
    try:
        yield
    finally:
        if path is not None:
            with _mutex:
                _release(path)


def _claim(target: Path, busy: str) -> Path | None:
    """Lock `target` (or count one more claim if this process holds it); its lock file, or None
    where nothing is locked."""
    if fcntl is None or not writer_process():
        return None
    path = lock_path(target)
    with _mutex:
        held = _held.get(path)
        if held is not None:
            held.count += 1
        else:
            _held[path] = _Held(path, _acquire(path, target, busy))
    return path


def _acquire(path: Path, target: Path, busy: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(busy.format(target=target, pid=_holder(path))) from None
        except OSError as error:
            os.close(fd)
            if error.errno in NO_LOCKS:
                raise UserError(NO_LOCKS_HERE.format(path=path, reason=error.strerror)) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            break
        os.close(fd)  # we locked a file its holder had just deleted; lock the current one instead
    record = f"{os.getpid()}\n".encode()
    try:
        os.pwrite(fd, record, 0)  # overwrite first, then cut: a reader never sees an empty file
        os.ftruncate(fd, len(record))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(path: Path, patience: float = 1.0) -> str:
    """The PID the holder wrote; waits briefly while the file is still empty or names a dead process
    (a new holder writes its PID just after it locks)."""
    deadline = time.monotonic() + patience
    pid = None
    while True:
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        if (pid is not None and _alive(pid)) or time.monotonic() > deadline:
            return str(pid) if pid is not None else "unknown"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path) -> None:
    held = _held.get(path)
    if held is None:  # forgotten in a forked child
        return
    held.count -= 1
    if held.count:
        return
    del _held[path]
    try:
        if _same_file(path, held.fd):
            path.unlink()  # while still locked: see the module docstring
    except OSError:
        pass  # a lock file that cannot be deleted is harmless: the next run locks it
    finally:
        os.close(held.fd)


def _release_process_claims() -> None:
    with _mutex:
        while _process_scope:
            _release(_process_scope.pop())


def _forget_inherited() -> None:
    """In a forked child: close the inherited lock files (closing releases nothing while the parent
    keeps its own descriptor) and hold no claims."""
    global _mutex
    for held in _held.values():
        try:
            os.close(held.fd)
        except OSError:
            pass
    _held.clear()
    _scopes.clear()
    _process_scope.clear()
    _mutex = threading.RLock()


atexit.register(_release_process_claims)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)
