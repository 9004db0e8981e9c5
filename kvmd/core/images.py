"""The images directory: the only files guest memory may be backed by.

Clients name files relative to one directory the daemon is configured with (`--images-dir`,
default /var/lib/kvmd/images), never by a host path of their own. The daemon opens the file
itself, strictly beneath that directory: absolute names and ".." are refused outright, and
the open is resolved by the kernel with openat2(RESOLVE_BENEATH), so no symlink (of any
component) and no magic link can lead out of it. Where openat2 is missing (or filtered by
seccomp) the fallback resolves the name with realpath, refuses anything outside, opens the
result with O_NOFOLLOW and checks the opened file's real path again.

What a mapping of such a file is recorded as (`FileBackedRange`: the file's name, offsets
and size) is what snapshots, migration and take-over carry by reference; they check the
file's contents by the digest of its mapped bytes (kvmd.state.snapshot.check_file_digests).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from kvmd.core.errors import (
    DomainError,
    InvalidArgument,
    InvalidState,
    KernelError,
    NotFound,
    PermissionDenied,
    Reason,
)

DEFAULT_IMAGES_DIR = "/var/lib/kvmd/images"
MAX_NAME_LEN = 4096

# openat2(2): the syscall number is the same on every architecture (added after the
# numbering was unified), and struct open_how is three u64s.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class MemoryFile:
    """A request for a file of the images directory: its name there, where the mapping
    starts in it, and whether it is opened and mapped read-only."""

    name: str
    offset: int = 0
    read_only: bool = False


@dataclass(frozen=True)
class FileIdentity:
    """Which file, and its size, when it was opened: the size bounds what may be mapped of
    it (and stands in for it in a saved state when the file cannot be read any more)."""

    device: int
    inode: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size)

    def same_file(self, st: os.stat_result) -> bool:
        """The same inode on the same device as `st` (which file was opened)."""
        return (self.device, self.inode) == (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class FileBackedRange:
    """A file of the images directory mapped into a VM's guest memory: the whole slot
    (AddMemoryRegion with a file: `whole_slot`) or part of one (MapGuestMemory).

    `offset`/`size` place it in the slot (`guest_addr` in the guest), `file_offset` in the
    file; `image` is its name in the images directory and `identity` the file as it was when
    mapped (st_dev, st_ino, st_size)."""

    slot: int
    guest_addr: int
    offset: int
    size: int
    image: str
    file_offset: int
    writable: bool
    whole_slot: bool
    identity: FileIdentity

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def memory_file(self) -> MemoryFile:
        return MemoryFile(self.image, self.file_offset, not self.writable)


@dataclass
class OpenedImage:
    """A file opened from the images directory; close it once the binding has its dup."""

    name: str  # normalized, relative to the images directory
    path: str  # the real path, for logs
    fd: int
    writable: bool
    identity: FileIdentity

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalize_name(name: str) -> str:
    """The name as recorded: relative, "." components and repeated slashes dropped. Refuses
    (InvalidArgument) an empty name, an absolute one, NUL bytes and any ".." component."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("a memory file needs a name (a path inside the images "
                              "directory)", reason=Reason.FILE_NAME_INVALID, field="file.name")
    if len(name) > MAX_NAME_LEN or "\0" in name:
        raise InvalidArgument("memory file name is too long or contains NUL",
                              reason=Reason.FILE_NAME_INVALID, field="file.name")
    if name.startswith("/"):
        raise InvalidArgument(f"memory file {name!r} is an absolute path: name a file "
                              "relative to the images directory",
                              reason=Reason.FILE_NAME_INVALID, field="file.name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"memory file {name!r} contains '..': name a file inside the "
                              "images directory",
                              reason=Reason.FILE_NAME_INVALID, field="file.name")
    if not parts:
        raise InvalidArgument(f"memory file {name!r} names the images directory itself",
                              reason=Reason.FILE_NAME_INVALID, field="file.name")
    return "/".join(parts)


def validate_images_dir(path: str, required: bool) -> str | None:
    """Check the configured images directory at start; returns a one-line problem, or None.

    It must be an absolute path; if it exists (or is `required`: set explicitly to a
    non-default path) it must be a directory not writable by everyone. A missing default
    directory only disables file-backed memory (requests fail with FAILED_PRECONDITION)."""
    if not path.startswith("/"):
        return f"images_dir {path!r} must be an absolute path"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"images_dir {path} does not exist" if required else None
    except OSError as exc:
        return f"cannot stat images_dir {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"images_dir {path} is not a directory"
    if st.st_mode & stat.S_IWOTH:
        return f"images_dir {path} is writable by everyone: any local user could plant files"
    return None


class ImagesDir:
    """Opens files strictly beneath one directory (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def open(self, name: str, writable: bool) -> OpenedImage:
        """Open `name` (relative to the root) read-only or read-write; it must be a regular
        file. Errors: a bad name -> InvalidArgument; a name that resolves outside the
        directory -> PermissionDenied; missing -> NotFound; no images directory, or a
        read-only file system for a writable file -> InvalidState."""
        rel = normalize_name(name)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | \
            os.O_NONBLOCK  # never block on a FIFO planted in the directory
        try:
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidState(f"the images directory {self.root} is not available "
                               f"({exc.strerror}): file-backed memory is off",
                               resource="images", reason=Reason.FEATURE_DISABLED) from None
        try:
            fd = self._openat2(root_fd, rel, flags)
            if fd is None:
                fd = self._open_checked(rel, flags)
        except OSError as exc:
            raise _open_error(rel, writable, exc) from None
        finally:
            os.close(root_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"memory file {rel!r} is not a regular file",
                                      resource=f"images/{rel}",
                                      reason=Reason.FILE_NAME_INVALID, field="file.name")
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = os.path.join(self.root, rel)
            return OpenedImage(rel, path, fd, writable, FileIdentity.of(st))
        except BaseException:
            os.close(fd)
            raise

    def stat(self, name: str) -> os.stat_result:
        """fstat of the file `name` now (opened read-only, as `open` does): its size as a
        saved state records it."""
        with self.open(name, writable=False) as image:
            return os.fstat(image.fd)

    @staticmethod
    def _openat2(root_fd: int, rel: str, flags: int) -> int | None:
        """openat2 beneath root_fd; None where the kernel or a seccomp filter lacks it."""
        how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd),
                           ctypes.c_char_p(os.fsencode(rel)), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            return None  # retried by the fallback, which reports a genuine EPERM itself
        raise OSError(err, os.strerror(err))

    def _open_checked(self, rel: str, flags: int) -> int:
        """The fallback: resolve, refuse outside, open without following a last symlink,
        then check what was opened."""
        root = os.path.realpath(self.root)
        target = os.path.realpath(os.path.join(root, rel))
        if not _beneath(root, target):
            raise OSError(errno.EXDEV, "resolves outside the images directory")
        fd = os.open(target, flags | os.O_NOFOLLOW)
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = ""
        if not _beneath(root, opened):
            os.close(fd)
            raise OSError(errno.EXDEV, "resolves outside the images directory")
        return fd


def _beneath(root: str, path: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


def _open_error(rel: str, writable: bool, exc: OSError) -> DomainError:
    resource = f"images/{rel}"
    code = exc.errno
    if code in (errno.EXDEV, errno.ELOOP):
        return PermissionDenied(f"memory file {rel!r} resolves outside the images directory "
                                "(a symlink leads out of it)", errno=code, resource=resource,
                                reason=Reason.FILE_ACCESS_DENIED)
    if code == errno.ENOENT:
        return NotFound(f"no file {rel!r} in the images directory", errno=code,
                        resource=resource)
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ENXIO):
        return InvalidArgument(f"memory file {rel!r} cannot be opened: {exc.strerror}",
                               errno=code, resource=resource,
                               reason=Reason.FILE_NAME_INVALID, field="file.name")
    if code in (errno.EACCES, errno.EPERM):
        mode = "read-write" if writable else "read-only"
        return PermissionDenied(f"the daemon may not open {rel!r} {mode}: {exc.strerror}",
                                errno=code, resource=resource, reason=Reason.FILE_ACCESS_DENIED)
    if code in (errno.EROFS, errno.ETXTBSY):
        return InvalidState(f"memory file {rel!r} cannot be opened read-write: "
                            f"{exc.strerror}", errno=code, resource=resource,
                            reason=Reason.FILE_NOT_WRITABLE)
    return KernelError(f"opening memory file {rel!r}: {exc.strerror}", errno=code,
                       resource=resource)
