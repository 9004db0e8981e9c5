"""Snapshot files in the daemon's state directory (`--state-dir`, default /var/lib/kvmd).

Clients name files, never paths: a name is 1-64 characters of [A-Za-z0-9._-] and lives in
`<state-dir>/snapshots/`. Files are written to a temporary name, synced, then linked into
place only if the name is free (no snapshot is ever replaced or seen half-written), mode
0600: they hold guest memory.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import FileIO

from kvmd.core.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    KernelError,
    NotFound,
    Reason,
    ResourceExhausted,
)
from kvmd.state.format import CorruptSnapshot, MemoryRecord, SnapshotReader
from kvmd_proto import vmm_pb2 as pb

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Reads into one reused buffer: large enough that few frames straddle two reads (the
# reader copies a straddling frame), small enough to stay in the cache while the reader
# checks what was read and copies it on (into the guest).
READ_CHUNK = 8 << 20


@dataclass
class StoredSnapshot:
    """A snapshot file as ListSnapshots shows it (read from its first records)."""

    name: str
    size_bytes: int
    header: pb.SnapshotHeader
    vm_id: str
    owner: str
    guest_memory_bytes: int


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: the state directory is full",
                                 reason=Reason.HOST_EXHAUSTED)
    return KernelError(f"{what}: {exc.strerror}", errno=exc.errno)


def _not_regular(name: str) -> CorruptSnapshot:
    return CorruptSnapshot(f"snapshot file {name!r} is not a regular file")


def _pieces(fh: FileIO) -> Iterator[memoryview]:
    """The bytes of open file `fh` in views of one reused buffer."""
    buf = memoryview(bytearray(READ_CHUNK))
    while n := fh.readinto(buf):
        yield buf[:n]


class SnapshotStore:
    """The snapshot files of one state directory."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "snapshots")
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"cannot create {self.dir}") from None

    def path(self, name: str) -> str:
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidArgument(f"snapshot file {name[:80]!r} is not a valid name (1-64 "
                                  "characters of A-Z a-z 0-9 . _ -, starting with a letter or "
                                  "digit)", reason=Reason.FILE_NAME_INVALID, field="file")
        return os.path.join(self.dir, name)

    def write(self, name: str, chunks: Iterable[bytes]) -> int:
        """Write a new file from `chunks`; returns its size. An existing name is refused
        before anything is written, and a failure leaves no file behind. The bytes go to a
        file without a name (O_TMPFILE) that gets the name only once complete and synced:
        writers of one name never meet, and a crash leaves nothing to clean up."""
        final = self.path(name)
        if os.path.lexists(final):
            raise AlreadyExists(f"snapshot file {name!r} already exists",
                                resource=f"snapshot/{name}")
        fd, tmp = self._open_unnamed(name)
        size = 0
        try:
            for chunk in chunks:  # what producing the bytes raises is not a write error
                view = memoryview(chunk).cast("B")
                try:
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as exc:
                    raise _os_error(exc, f"cannot write {name}") from None
                size += len(chunk)
            try:
                os.fsync(fd)
                self._link(tmp or f"/proc/self/fd/{fd}", name)
            except FileExistsError:
                raise AlreadyExists(f"snapshot file {name!r} already exists",
                                    resource=f"snapshot/{name}") from None
            except OSError as exc:
                raise _os_error(exc, f"cannot write {name}") from None
        finally:
            os.close(fd)
            if tmp:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        return size

    def _link(self, source: str, name: str) -> None:
        """Give the file at `source` its name, durably; never replaces (FileExistsError
        when the name was taken meanwhile)."""
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # linkat with AT_SYMLINK_FOLLOW (os.link calls plain link(), which does not
            # follow /proc/self/fd's link to an unnamed file): a dir_fd makes it linkat.
            os.link(source, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=True)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _open_unnamed(self, name: str) -> tuple[int, str]:
        """A new file for `name`'s bytes: unnamed where the file system can (the path is
        ""), else under a unique hidden name (which NAME never matches)."""
        flags = os.O_WRONLY | os.O_CLOEXEC
        try:
            return os.open(self.dir, flags | os.O_TMPFILE, 0o600), ""
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise _os_error(exc, f"cannot write {name}") from None
        tmp = os.path.join(self.dir, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except OSError as exc:
            raise _os_error(exc, f"cannot write {name}") from None

    def read(self, name: str) -> Iterator[memoryview]:
        """The file's bytes in pieces, each a view of one reused buffer: valid until the
        next piece is asked for (a SnapshotReader consumes a piece in its `feed`)."""
        with os.fdopen(self._open(name), "rb", buffering=0) as fh:
            yield from _pieces(fh)

    def _open(self, name: str) -> int:
        """The file of `name`, opened for reading: NotFound without one, CorruptSnapshot for
        anything but a regular file (never followed through a link)."""
        path = self.path(name)
        # O_NONBLOCK: a FIFO planted under a snapshot's name must not hang the open (a
        # regular file's reads ignore the flag).
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise NotFound(f"no snapshot file {name!r}", resource=f"snapshot/{name}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                raise _not_regular(name) from None
            raise _os_error(exc, f"cannot read {name}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _not_regular(name)
        return fd

    def describe(self, name: str) -> StoredSnapshot:
        """Header, VM id and owner of a file (its first records)."""
        reader = SnapshotReader()
        header: pb.SnapshotHeader | None = None
        with os.fdopen(self._open(name), "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                for chunk in _pieces(fh):
                    for record in reader.feed(chunk):
                        if isinstance(record, MemoryRecord):
                            continue
                        if record.HasField("header"):
                            header = record.header
                        elif record.HasField("vm") and header is not None:
                            vm = record.vm
                            return StoredSnapshot(name, size, header, vm.vm_id, vm.owner,
                                                  sum(s.size for s in vm.slots))
            except CorruptSnapshot as exc:
                raise CorruptSnapshot(f"snapshot file {name!r}: {exc}") from None
            except InvalidState as exc:  # a snapshot this daemon cannot take (newer format)
                raise InvalidState(f"snapshot file {name!r}: {exc}",
                                   reason=exc.reason) from None
        raise CorruptSnapshot(f"snapshot file {name!r} has no VM state")

    def names(self) -> list[str]:
        """The names of the regular files of the directory (never what only looks like
        one: a directory, a link or a FIFO put there by hand is not a snapshot)."""
        try:
            with os.scandir(self.dir) as entries:
                return sorted(entry.name for entry in entries
                              if NAME.match(entry.name)
                              and entry.is_file(follow_symlinks=False))
        except OSError as exc:
            raise _os_error(exc, f"cannot list {self.dir}") from None

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            raise NotFound(f"no snapshot file {name!r}", resource=f"snapshot/{name}") from None
        except OSError as exc:
            raise _os_error(exc, f"cannot delete {name}") from None
