"""The shipped unit and example configuration carry what a hand-over under systemd needs
(systemd-analyze verify and the security exposure target are checked in tests/deploy)."""

from __future__ import annotations

from pathlib import Path

from kvmd.config import build_parser, load_config
from kvmd.core.limits import Limits

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "kvmd.service"
CONFIG = REPO / "deploy" / "config" / "kvmd.toml"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_keeps_the_fd_store_and_the_runtime_directory() -> None:
    d = directives()
    assert d["Type"] == ["notify"] and d.get("NotifyAccess", ["main"])[-1] != "none"
    lim = Limits()
    assert int(d["FileDescriptorStoreMax"][-1]) >= lim.max_vms * lim.max_memory_slots_per_vm
    assert d["FileDescriptorStorePreserve"] == ["yes"]
    # The states live beside the memory: a stop must not remove them (default: it does).
    assert d["RuntimeDirectoryPreserve"] == ["yes"]
    assert "systemd 252" in UNIT.read_text()  # the comment on what 252 keeps


def test_example_config_keeps_vms_on_stop(tmp_path: Path) -> None:
    cfg = load_config(build_parser().parse_args(["--config", str(CONFIG)]))
    assert cfg.on_stop == "keep"
    assert load_config(build_parser().parse_args(["--on-stop", "end"])).on_stop == "end"
