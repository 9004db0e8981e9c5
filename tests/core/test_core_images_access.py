"""The images directory's access rules beyond names: a group-writable directory is
accepted at start (only one writable by everyone is refused), and a file the kernel refuses
to open read-write (immutable) is a PermissionDenied that says which mode was refused."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmd.core.errors import PermissionDenied, Reason
from kvmd.core.images import ImagesDir, validate_images_dir

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


def test_group_writable_images_dir_is_accepted(tmp_path: Path) -> None:
    """Write access for the directory's group (e.g. an image-managing group) is allowed;
    only write access for everyone is refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o770, 0o775, 0o755, 0o700):
        os.chmod(shared, mode)
        assert validate_images_dir(str(shared), required=True) is None, oct(mode)
    os.chmod(shared, 0o772)
    assert "writable by everyone" in str(validate_images_dir(str(shared), required=True))


def _set_flags(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags))
    finally:
        os.close(fd)


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Path]:
    """An images directory holding imm.img with the immutable attribute (chattr +i): even
    root cannot open it for writing (EPERM)."""
    root = tmp_path / "images"
    root.mkdir(mode=0o750)
    path = root / "imm.img"
    path.write_bytes(b"i" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8))[0]
    finally:
        os.close(fd)
    try:
        _set_flags(path, flags | FS_IMMUTABLE_FL)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"cannot make a file immutable here: {exc.strerror}")
        raise
    try:
        yield root
    finally:
        _set_flags(path, flags)


def test_an_immutable_file_is_refused_read_write_and_says_so(immutable: Path) -> None:
    """Read-write: PermissionDenied (FILE_ACCESS_DENIED) naming the file and "read-write";
    read-only it opens."""
    images = ImagesDir(str(immutable))
    with pytest.raises(PermissionDenied) as caught:
        images.open("imm.img", writable=True)
    assert caught.value.reason == Reason.FILE_ACCESS_DENIED
    assert caught.value.errno == errno.EPERM
    assert "may not open 'imm.img' read-write" in caught.value.message
    with images.open("imm.img", writable=False) as opened:
        assert os.pread(opened.fd, 1, 0) == b"i"
