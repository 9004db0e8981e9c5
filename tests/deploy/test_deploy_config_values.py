"""What the configuration file and flags accept and what they become (kvmd.config, no
daemon started): the defaults the console script adds, spellings the file allows, flags
that override the file even with 0, TLS pairs and files checked for every key, listen
addresses (unix:/path, localhost, [::1]) and the TLS files outgoing migrations use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kvmd.config import (
    Config,
    ConfigError,
    build_parser,
    load_config,
    migration_tls_files,
    parse_listen,
    validate,
)


def load(*argv: str) -> Config:
    return load_config(build_parser().parse_args(list(argv)))


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kvmd.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    """Files that pass the configuration's PEM check (it reads them, it does not parse)."""
    files = {}
    for name in ("cert", "key", "ca", "mcert", "mkey", "mca"):
        path = tmp_path / f"{name}.pem"
        path.write_text(f"-----BEGIN {name}-----\n-----END {name}-----\n")
        files[name] = str(path)
    return files


def test_the_console_script_defaults() -> None:
    """Without a file or flags: metrics on 127.0.0.1:9474, snapshots in /var/lib/kvmd,
    images in /var/lib/kvmd/images, the default Unix socket."""
    cfg = load()
    assert cfg.metrics_listen == "127.0.0.1:9474"
    assert cfg.state_dir == "/var/lib/kvmd"
    assert cfg.images_dir == "/var/lib/kvmd/images"
    assert cfg.listen == ["unix:///run/kvmd/kvmd.sock"]


def test_file_keys_may_use_dashes_and_listen_may_be_one_string(tmp_path: Path) -> None:
    """`log-level` is the key log_level; `listen = "..."` is a list of one address."""
    cfg = load("--config", toml(tmp_path, 'log-level = "debug"\n'
                                          'listen = "unix:///run/x/k.sock"\n'))
    assert cfg.log_level == "debug"
    assert cfg.listen == ["unix:///run/x/k.sock"]


def test_a_flag_of_zero_overrides_the_file(tmp_path: Path) -> None:
    """Flags win over the file, also when the flag's value is 0."""
    path = toml(tmp_path, "vcpu_nice = 5\napi_slice_us = 200\n")
    assert (load("--config", path).vcpu_nice, load("--config", path).api_slice_us) == (5, 200)
    cfg = load("--config", path, "--vcpu-nice", "0", "--api-slice-us", "0")
    assert (cfg.vcpu_nice, cfg.api_slice_us) == (0, 0)


def test_vcpu_nice_bounds_are_inclusive() -> None:
    """0 and 19 are both valid nice values for vCPU threads."""
    for nice in (0, 19):
        assert load(f"--vcpu-nice={nice}").vcpu_nice == nice


@pytest.mark.parametrize("pair", ["metrics", "migration"])
def test_a_tls_certificate_needs_its_key(pem: dict[str, str], pair: str) -> None:
    """--metrics-tls-cert and --migration-tls-cert each go with their key (both ways)."""
    cert: dict[str, Any] = {f"{pair}_tls_cert": pem["cert"]}
    key: dict[str, Any] = {f"{pair}_tls_key": pem["key"]}
    for alone in (cert, key):
        with pytest.raises(ConfigError, match=f"--{pair}-tls-cert and --{pair}-tls-key go "
                                              "together"):
            validate(Config(**alone))
    validate(Config(**cert, **key))


@pytest.mark.parametrize("key,what", [("migration_tls_cert", "migration certificate"),
                                      ("migration_tls_key", "migration key"),
                                      ("migration_tls_ca", "migration CA")])
def test_every_migration_tls_file_must_be_readable_pem(tmp_path: Path, pem: dict[str, str],
                                                       key: str, what: str) -> None:
    """Each migration TLS file is read at start: not PEM, or missing, is refused by name."""
    pair: dict[str, Any] = {"migration_tls_cert": pem["mcert"], "migration_tls_key": pem["mkey"]}
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=re.escape(f"TLS {what} {bad} is not PEM")):
        validate(Config(**{**pair, key: str(bad)}))
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=re.escape(f"cannot read TLS {what} {missing}")):
        validate(Config(**{**pair, key: str(missing)}))


def test_listen_address_forms() -> None:
    """unix:/path and unix:///path name the same socket; localhost, 127.0.0.1 and [::1]
    are loopback (plain TCP allowed); a port must be a number."""
    for address in ("unix:/run/kvmd/k.sock", "unix:///run/kvmd/k.sock"):
        got = parse_listen(address)
        assert (got.unix_path, got.target) == ("/run/kvmd/k.sock", "unix:///run/kvmd/k.sock")
    for address in ("localhost:7420", "127.0.0.1:7420", "[::1]:7420"):
        got = parse_listen(address)
        assert got.loopback and got.unix_path is None and got.target == address
    for address in ("localhost:http", "localhost:", ":7420"):
        with pytest.raises(ConfigError, match="neither unix:///path nor host:port"):
            parse_listen(address)


def test_tls_with_a_unix_socket_and_loopback_needs_no_client_certificates(
        pem: dict[str, str]) -> None:
    """The "every peer would be an admin" refusal is about non-loopback TCP only."""
    validate(Config(listen=["unix:///run/kvmd/k.sock", "127.0.0.1:7420"],
                    tls_cert=pem["cert"], tls_key=pem["key"]))
    with pytest.raises(ConfigError, match=re.escape("refusing to serve 0.0.0.0:7420")):
        validate(Config(listen=["unix:///run/kvmd/k.sock", "0.0.0.0:7420"],
                        tls_cert=pem["cert"], tls_key=pem["key"]))


def test_migration_tls_files_fall_back_to_the_servers() -> None:
    """Unset migration TLS keys use tls_cert, tls_key and tls_client_ca; a CA alone is
    enough to verify targets; nothing at all means plain TCP (None)."""
    assert migration_tls_files(Config()) is None
    server = Config(tls_cert="c", tls_key="k", tls_client_ca="ca")
    assert migration_tls_files(server) == ("c", "k", "ca")
    own = Config(tls_cert="c", tls_key="k", tls_client_ca="ca", migration_tls_cert="mc",
                 migration_tls_key="mk", migration_tls_ca="mca")
    assert migration_tls_files(own) == ("mc", "mk", "mca")
    assert migration_tls_files(Config(migration_tls_ca="mca")) == ("", "", "mca")
    assert migration_tls_files(Config(tls_client_ca="ca")) == ("", "", "ca")
