"""The example config's /metrics TLS keys (deploy/config/kvmd.toml, commented out): they
name MetricsServer's keyword arguments, and once the daemon knows them (Config fields
metrics_tls_cert, metrics_tls_key, metrics_tls_client_ca, wired in kvmd/server.py) the
uncommented example serves /metrics over mTLS."""

from __future__ import annotations

import dataclasses
import http.client
import inspect
import re
import ssl
import tomllib
from pathlib import Path

import pytest
import trustme
from metrics_support import REPO, RPC_TIMEOUT

from kvmd.config import Config, build_parser, load_config
from kvmd.metrics import MetricsServer
from kvmd.server import Daemon

CONFIG = REPO / "deploy" / "config" / "kvmd.toml"
COMMENTED = re.compile(r'^# (metrics_(?:listen|tls_\w+)) = "([^"]*)"', re.M)


def uncommented_example(values: dict[str, str]) -> str:
    """The example config with its commented metrics_* lines in force, set to `values`."""
    text = re.sub(r"^metrics_listen = .*$", "", CONFIG.read_text(), flags=re.M)
    return COMMENTED.sub(lambda m: f'{m.group(1)} = "{values[m.group(1)]}"', text)


def test_example_config_documents_the_metrics_tls_keys_the_server_takes() -> None:
    keys = {k for k, _v in COMMENTED.findall(CONFIG.read_text())}
    assert {"metrics_tls_cert", "metrics_tls_key", "metrics_tls_client_ca"} <= keys, keys
    params = inspect.signature(MetricsServer).parameters
    for key in keys - {"metrics_listen"}:
        name = key.removeprefix("metrics_")
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    data = tomllib.loads(uncommented_example({k: f"/x/{k}" for k in keys}))
    assert {k: data[k] for k in keys} == {k: f"/x/{k}" for k in keys}


@pytest.mark.skipif(not {"metrics_tls_cert", "metrics_tls_key", "metrics_tls_client_ca"}
                    <= {f.name for f in dataclasses.fields(Config)},
                    reason="kvmd/server.py does not read metrics_tls_* yet")
def test_uncommented_example_serves_metrics_over_mtls(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("prometheus.clients.test")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "metrics.pem",
             "key": tmp_path / "metrics.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    replace = {"metrics_listen": "127.0.0.1:0", "metrics_tls_cert": str(files["cert"]),
               "metrics_tls_key": str(files["key"]), "metrics_tls_client_ca": str(files["ca"])}
    path = tmp_path / "kvmd.toml"
    path.write_text(uncommented_example(replace))
    cfg = load_config(build_parser().parse_args(["--config", str(path)]))
    # This host has no group kvmd: the socket keeps the test's group.
    cfg = dataclasses.replace(cfg, listen=[f"unix://{tmp_path}/kvmd.sock"], socket_group="")
    daemon = Daemon(cfg)
    try:
        daemon.start()
        assert daemon.metrics_server is not None
        port = daemon.metrics_server.port
        ctx = ssl.create_default_context(cafile=str(files["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            conn = http.client.HTTPSConnection("localhost", port, context=ctx,
                                               timeout=RPC_TIMEOUT)
            conn.request("GET", "/metrics")
            conn.getresponse().read()
        client.configure_cert(ctx)
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=RPC_TIMEOUT)
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        assert reply.status == 200 and b"kvmd_vms" in reply.read()
        conn.close()
    finally:
        daemon.stop()
