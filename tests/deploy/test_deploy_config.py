"""The kvmd console script refuses unsafe or broken configurations: exit code 2 and one
line on stderr, `kvmd: <reason>`, before it serves anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_support import Pki, kvmd_script, run_kvmd
from polling import wait_until

EXIT_CONFIG = 2

POLICY_OK = '[authorization]\nidentities = [{ name = "local", role = "admin" }]\n'


def assert_refused(result: subprocess.CompletedProcess[str], *reason: str) -> None:
    """Exit 2 with exactly one stderr line, `kvmd: ...`, naming each of `reason`."""
    err = result.stderr.strip()
    assert result.returncode == EXIT_CONFIG, (result.returncode, result.stderr)
    assert len(err.splitlines()) == 1, f"expected a one-line reason, got:\n{result.stderr}"
    assert err.startswith("kvmd: "), err
    for word in reason:
        assert word.lower() in err.lower(), (word, err)
    assert "Traceback" not in result.stderr


@pytest.fixture
def sock(short_dir: Path) -> str:
    return f"unix://{short_dir}/kvmd.sock"


def base_args(sock: str) -> list[str]:
    return ["--listen", sock, "--metrics-listen", "off"]


def refuse(sock: str, *args: str, prefix: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess[str]:
    """Run kvmd on `sock` (plus `args`); it must exit rather than serve. With a scheduler
    slice this process cannot have handed down (in-process daemons of other tests give its
    thread 100 us), so the daemon sets the slice itself, and would say so: no log line may
    come before the reason."""
    return run_kvmd(*base_args(sock), "--api-slice-us", "250", *args,
                    socket_path=sock.removeprefix("unix://"), prefix=prefix)


# -- unsafe network and TLS settings ------------------------------------------------------

@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.1:7420",
                                     "kvmd.example:7420"])
def test_plain_tcp_on_non_loopback_address_is_refused(sock: str, address: str) -> None:
    result = refuse(sock, "--listen", address)
    assert_refused(result, "plain TCP", address)


def test_plain_tcp_on_public_address_from_config_file_is_refused(tmp_path: Path,
                                                                  sock: str) -> None:
    cfg = tmp_path / "kvmd.toml"
    cfg.write_text(f'listen = ["{sock}", "0.0.0.0:7420"]\nmetrics_listen = "off"\n')
    result = run_kvmd("--config", str(cfg), socket_path=sock.removeprefix("unix://"))
    assert_refused(result, "plain TCP", "0.0.0.0:7420")


def test_client_ca_without_server_certificate_is_refused(pki: Pki, sock: str) -> None:
    result = refuse(sock, "--listen", "127.0.0.1:0",
                      "--tls-client-ca", pki.ca_file)
    assert_refused(result, "--tls-client-ca")


def test_certificate_without_key_is_refused(pki: Pki, sock: str) -> None:
    result = refuse(sock, "--listen", "127.0.0.1:0",
                      "--tls-cert", pki.server.cert)
    assert_refused(result, "--tls-key")


def test_key_without_certificate_is_refused(pki: Pki, sock: str) -> None:
    result = refuse(sock, "--listen", "127.0.0.1:0",
                      "--tls-key", pki.server.key)
    assert_refused(result, "--tls-cert")


@pytest.mark.parametrize("what", ["missing", "directory", "not-pem"])
def test_unusable_key_is_refused(pki: Pki, sock: str, tmp_path: Path, what: str) -> None:
    key = tmp_path / "server.key"
    if what == "directory":
        key.mkdir()
    elif what == "not-pem":
        key.write_text("not a key\n")
    result = refuse(sock, "--listen", "0.0.0.0:0",
                      "--tls-cert", pki.server.cert, "--tls-key", str(key))
    assert_refused(result, "key", str(key))


def test_key_unreadable_by_permissions_is_refused(pki: Pki, sock: str,
                                                  tmp_path: Path) -> None:
    """A mode-000 key: run as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv),
    so the file permissions apply as they would to an unprivileged daemon."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop the DAC override capabilities")
    key = tmp_path / "server.key"
    shutil.copy(pki.server.key, key)
    key.chmod(0)
    result = refuse(sock, "--listen", "0.0.0.0:0", "--tls-cert", pki.server.cert,
                    "--tls-key", str(key),
                    prefix=(setpriv, "--bounding-set=-dac_override,-dac_read_search"))
    assert_refused(result, "key", str(key), "permission denied")


def test_unreadable_client_ca_is_refused(pki: Pki, sock: str, tmp_path: Path) -> None:
    ca = tmp_path / "missing-ca.pem"
    result = refuse(sock, "--listen", "127.0.0.1:0",
                      "--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
                      "--tls-client-ca", str(ca))
    assert_refused(result, "client CA", str(ca))


# -- broken configuration files ------------------------------------------------------------

BAD_CONFIGS = {
    "bad-toml": ('listen = ["unix:///x.sock"\n', "cannot read config"),
    "unknown-key": ('lisen = "unix:///x.sock"\n', "unknown key"),
    "wrong-type": ("max_vms = \"many\"\n", "max_vms"),
    "authorization-not-a-table": ('authorization = "admin"\n', "authorization"),
    "identity-bad-role": ('[authorization]\nidentities = [{ name = "x", role = "root" }]\n',
                          "role"),
    "identity-no-name": ('[authorization]\nidentities = [{ role = "admin" }]\n', "name"),
    "identity-unknown-key": ('[authorization]\nidentities = '
                             '[{ name = "x", role = "admin", prefix = "a-" }]\n', "prefix"),
    "identity-not-a-table": ('[authorization]\nidentities = ["admin"]\n', "tables"),
    "identity-quota-not-a-number": ('[authorization]\nidentities = '
                                    '[{ name = "x", role = "operator", max_vms = "ten" }]\n',
                                    "authorization"),
    "identity-quota-a-list": ('[authorization]\nidentities = '
                              '[{ name = "x", role = "operator", max_vms = [1] }]\n',
                              "max_vms"),
    "identity-quota-negative": ('[authorization]\nidentities = '
                                '[{ name = "x", role = "operator", max_vms = -1 }]\n',
                                "max_vms"),
    "identities-not-a-list": ('[authorization]\nidentities = 5\n', "identities"),
    "authorization-unknown-key": ('[authorization]\nidentites = '
                                  '[{ name = "local", role = "admin" }]\n', "identites"),
    # A schema for every key: choices, no booleans for numbers, lists of strings.
    "log-level-not-a-level": ('log_level = "verbose"\n', "log_level"),
    "log-format-unknown": ('log_format = "xml"\n', "log_format"),
    "limit-a-boolean": ("max_vms = true\n", "max_vms"),
    "limit-zero": ("max_streams = 0\n", "max_streams"),
    "listen-not-strings": ("listen = [1]\n", "listen"),
    "listen-empty": ("listen = []\n", "listen"),
    "flag-a-number": ('metrics_vcpu_label = 1\n', "metrics_vcpu_label"),
    "state-dir-a-number": ("state_dir = 5\n", "state_dir"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_broken_config_file_is_refused(tmp_path: Path, sock: str, case: str) -> None:
    text, reason = BAD_CONFIGS[case]
    cfg = tmp_path / "kvmd.toml"
    cfg.write_text(text)
    assert_refused(refuse(sock, "--config", str(cfg)), reason)
    assert not os.path.exists(sock.removeprefix("unix://")), "a refused daemon left a socket"


def test_tls_on_the_network_without_client_certificates_or_policy_is_refused(
        pki: Pki, sock: str, tmp_path: Path) -> None:
    """Every peer would be an admin (it once created VMs owned by "anonymous")."""
    tls = ("--tls-cert", pki.server.cert, "--tls-key", pki.server.key)
    assert_refused(refuse(sock, "--listen", "0.0.0.0:0", *tls), "0.0.0.0:0", "admin",
                   "allow_anonymous_admin")
    # Each safeguard alone lets it start: client certificates, a policy, or the opt-in.
    cfg = tmp_path / "kvmd.toml"
    cfg.write_text(POLICY_OK)
    path = sock.removeprefix("unix://")
    for extra in (("--tls-client-ca", pki.ca_file), ("--config", str(cfg)),
                  ("--allow-anonymous-admin",)):
        proc = subprocess.Popen([kvmd_script(), *base_args(sock), "--listen", "0.0.0.0:0",
                                 *tls, *extra], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda p=proc: os.path.exists(path) or p.poll() is not None, 30,
                       "the daemon to create its socket")
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.terminate()
            proc.communicate(timeout=10)


def test_missing_config_file_is_refused(tmp_path: Path, sock: str) -> None:
    missing = tmp_path / "nope.toml"
    assert_refused(refuse(sock, "--config", str(missing)), str(missing))


def test_missing_socket_group_is_refused(short_dir: Path, sock: str) -> None:
    """Detected only once the socket exists (after start-up log lines): exit 2, one
    `kvmd: ` reason line, and the socket is removed again."""
    result = refuse(sock, "--socket-group", "kvmd-no-such-group-xyz")
    assert result.returncode == EXIT_CONFIG, result.stderr
    reasons = [line for line in result.stderr.splitlines() if line.startswith("kvmd: ")]
    assert len(reasons) == 1 and "kvmd-no-such-group-xyz" in reasons[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(short_dir / "kvmd.sock")


def test_valid_policy_in_config_file_is_accepted(tmp_path: Path, sock: str) -> None:
    """The control case: the same invocation with a good policy starts (and is stopped as
    soon as its socket exists)."""
    cfg = tmp_path / "kvmd.toml"
    cfg.write_text(POLICY_OK)
    proc = subprocess.Popen([kvmd_script(), *base_args(sock), "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = sock.removeprefix("unix://")
    try:
        wait_until(lambda: os.path.exists(path) or proc.poll() is not None, 30,
                   "the daemon to create its socket")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("nice", ["-1", "20"])
def test_vcpu_nice_outside_0_to_19_is_refused(sock: str, nice: str) -> None:
    assert_refused(refuse(sock, f"--vcpu-nice={nice}"), "vcpu_nice must be 0-19")
