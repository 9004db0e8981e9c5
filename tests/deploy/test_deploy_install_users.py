"""deploy/install.sh creates the daemon's user and groups (systemd-sysusers, or
groupadd/useradd where sysusers is missing) and gives the daemon's config to its group.
Users are created in a staging root (DESTDIR), never on this host."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def entries(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()
            if line}


@pytest.mark.parametrize("fallback", [False, True], ids=["sysusers", "useradd"])
def test_install_creates_the_user_with_sysusers_or_useradd(tmp_path: Path,
                                                           fallback: bool) -> None:
    """`install.sh --create-users` into a staging root, by systemd-sysusers and by the
    groupadd/useradd fallback (hosts without sysusers), twice (idempotent)."""
    if os.geteuid() != 0:
        pytest.skip("useradd --prefix needs root")
    for name in ("groupadd", "useradd", "usermod"):
        tool(name)
    stage = tmp_path / "stage"
    (stage / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copyfile(f"/etc/{name}", stage / "etc" / name)
    env = {**os.environ, "DESTDIR": str(stage)}
    if fallback:
        env["KVMD_SYSUSERS"] = ""
    for _ in range(2):
        result = subprocess.run(["bash", str(INSTALL), "--create-users"], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    users, groups = entries(stage / "etc" / "passwd"), entries(stage / "etc" / "group")
    assert users["kvmd"][3] == groups["kvmd"][2]
    assert groups["kvm"][3].split(",") == ["kvmd"]
    assert users["kvmd"][6].endswith("nologin")
    assert sum(1 for line in (stage / "etc" / "passwd").read_text().splitlines()
               if line.startswith("kvmd:")) == 1


def test_install_gives_the_config_to_the_daemons_group() -> None:
    """The daemon reads /etc/kvmd/kvmd.toml as kvmd: install.sh hands it to group kvmd
    (also for a config kept from a root-run install) and applies the tmpfiles entries."""
    text = INSTALL.read_text()
    assert re.search(r'chgrp kvmd "\$confdir" "\$confdir/kvmd.toml"', text)
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/kvmd.conf" in text
    assert 'kvmd.tmpfiles" "$root/usr/lib/tmpfiles.d/kvmd.conf"' in text
