"""Every line the kvmd process writes to stderr is in its log format, grpc core's own
included (issue 13 #9)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from deploy_support import run_kvmd


def test_grpc_core_lines_come_out_in_the_daemons_format(short_dir: Path) -> None:
    """grpc core writes its errors to fd 2 itself (absl's "E1130 12:14:38.04 123 file.cc:83]
    ..."); the daemon relays them as records of the grpc.core logger, so a log shipper
    parsing key=value (or JSON) lines sees them too."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    sock = f"{short_dir}/kvmd.sock"
    try:
        for fmt in ("logfmt", "json"):
            result = run_kvmd("--listen", f"unix://{sock}", "--listen", f"127.0.0.1:{port}",
                              "--metrics-listen", "off", "--log-format", fmt,
                              socket_path=sock)
            assert result.returncode == 2, result.stderr
            lines = result.stderr.splitlines()
            reason = [ln for ln in lines if ln.startswith("kvmd: ")]
            assert len(reason) == 1 and "cannot listen" in reason[0], result.stderr
            records = [ln for ln in lines if not ln.startswith("kvmd: ")]
            if fmt == "json":
                parsed = [json.loads(ln) for ln in records]
            else:
                assert all(ln.startswith("ts=") and " level=" in ln for ln in records), \
                    result.stderr
                parsed = [{"logger": ln.split(" logger=", 1)[1].split(" ", 1)[0],
                           "line": ln} for ln in records]
            core = [p for p in parsed if p["logger"] == "grpc.core"]
            assert core, result.stderr
            assert any("Address already in use" in json.dumps(p) for p in core), core
    finally:
        taken.close()


def test_a_busy_tcp_port_leaves_no_unix_socket_behind(short_dir: Path) -> None:
    """The Unix socket is bound first; when the TCP address that follows is taken the daemon
    exits 2 and removes it again: a socket nobody listens on would make clients wait for a
    daemon that is not coming (they take one for a daemon being restarted)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    sock = f"{short_dir}/kvmd.sock"
    try:
        result = run_kvmd("--listen", f"unix://{sock}", "--listen",
                          f"127.0.0.1:{taken.getsockname()[1]}", "--metrics-listen", "off",
                          socket_path=sock)
        assert result.returncode == 2, result.stderr
        assert "cannot listen" in result.stderr
        assert not os.path.exists(sock), "the Unix socket was left behind"
    finally:
        taken.close()
