"""The daemon's log lines: logfmt (key=value, quoted where needed) or one JSON object per
line, for journald, Loki and the like. Extra fields (`extra={"vm_id": ...}`) become keys."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def logfmt_value(value: Any) -> str:
    """A logfmt value: bare when it is a plain token, else double-quoted with quotes,
    backslashes and control characters escaped (so one record stays one line)."""
    text = str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return json.dumps(text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{ts}.{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """One line per event: ts=... level=... logger=... msg="..." key=value (vm_id, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={_timestamp(record)}", f"level={record.levelname.lower()}",
                 f"logger={logfmt_value(record.name)}",
                 f"msg={json.dumps(record.getMessage())}"]
        parts += [f"{key}={logfmt_value(value)}" for key, value in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same keys as the logfmt form."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        out.update({k: v if isinstance(v, int | float | bool) or v is None else str(v)
                    for k, v in _fields(record).items()})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str = "logfmt", stream: TextIO | None = None) -> None:
    """One handler on the root logger, in `fmt`, to `stream` (stderr). Python's grpc
    loggers ("grpc", "grpc._server", "grpc.aio", ...) propagate to it like kvmd's own."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# grpc core logs through absl: "E1130 12:14:38.042336   27886 add_port.cc:83] message".
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
                "F": logging.CRITICAL}
native_log = logging.getLogger("grpc.core")


def native_record(line: str) -> None:
    """Log one line native code wrote to stderr: an absl line as its level with its source
    (file:line), anything else as a warning of the "stderr" logger."""
    match = _ABSL_LINE.match(line)
    if match is None:
        logging.getLogger("stderr").warning(line)
        return
    level, source, message = match.groups()
    native_log.log(_ABSL_LEVELS[level], message, extra={"source": source})


class NativeStderr:
    """grpc core (C++) writes its log lines straight to file descriptor 2, past Python's
    logging. This points fd 2 at a pipe that one thread reads, turning each line into a
    record (`native_record`), so they come out in the daemon's format. Python's own stderr
    (sys.stderr, the log handler) is moved to a duplicate of the original descriptor and
    never passes through the pipe. The pipe's write end is non-blocking: if the reader ever
    fell behind, native lines would be dropped rather than stall a gRPC thread. `close()`
    puts fd 2 back and relays what is left."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._original = os.dup(2)
        self.stderr: TextIO = io.TextIOWrapper(
            io.FileIO(self._original, "w", closefd=False), line_buffering=True,
            errors="backslashreplace")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_end, False)
        os.dup2(write_end, 2)  # fd 2 itself stays inheritable, as stderr is
        os.close(write_end)
        self._read_end = read_end
        self._closed = False
        self._saved_stderr = sys.stderr
        sys.stderr = self.stderr
        self._thread = threading.Thread(target=self._relay, name="kvmd-native-stderr",
                                        daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_end, 65536)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                if raw.strip():
                    native_record(raw.decode(errors="backslashreplace").rstrip())
        if pending.strip():
            native_record(pending.decode(errors="backslashreplace").rstrip())

    def close(self) -> None:
        """Point fd 2 back at the original stderr; the reader relays what is left. Once:
        a second call (atexit's, after the owner's) does nothing."""
        if self._closed:
            return
        self._closed = True
        os.dup2(self._original, 2)  # the pipe's last write end closes: the reader ends
        self._thread.join(5.0)
        os.close(self._read_end)
        sys.stderr = self._saved_stderr
        self.stderr.flush()
        os.close(self._original)


def setup_daemon_logging(level: str, fmt: str = "logfmt") -> NativeStderr:
    """The daemon process's logging: `setup_logging` onto the original stderr, and grpc
    core's own lines relayed through it (see NativeStderr), until the process exits."""
    native = NativeStderr()
    setup_logging(level, fmt, native.stderr)
    atexit.register(native.close)
    return native
