"""The kvmd-client distribution on its own, as an orchestrator host gets it.

From a copy of clients/python and proto/ (so the repository's build outputs are neither
used nor touched), ``python -m build`` makes the sdist and, from the sdist alone, the
wheel. The wheel must be ``py3-none-any`` with no compiled file, no daemon code and no
build-time dependency among its requirements. It is installed into a fresh virtualenv with
binary wheels only (``--only-binary :all:``: nothing may need a compiler), and that venv's
``kvmctl`` and a small ``import kvmd_client`` script, run outside the repository with an
isolated interpreter, drive the session daemon.

SLOW-ish: two isolated builds (setuptools, grpcio-tools) and one install (grpcio,
protobuf) from the package indexes, about 20-40 s with a warm pip cache; done once per
module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "python"
BUILD_TIMEOUT = 300
# Files a pure-Python wheel must not hold: compiled extensions, objects, C sources, bytecode.
COMPILED = (".so", ".pyd", ".dll", ".dylib", ".o", ".a", ".c", ".h", ".pyc")

SCRIPT = """
import importlib.util, json, sys
import kvmd_client, kvmd_proto
from kvmd_client import KvmdClient, NotFoundError
from kvmd_proto import vmm_pb2

address, vm_id = sys.argv[1], sys.argv[2]
out = {
    "kvmd_client": kvmd_client.__file__,
    "kvmd_proto": kvmd_proto.__file__,
    "daemon_importable": importlib.util.find_spec("kvmd") is not None,
    "path": sys.path,
}
with KvmdClient(address) as c:
    out["api_version"] = c.info().api_version
    c.create_vm(vm_id, labels={"from": "wheel"})
    c.add_memory_region(vm_id, 0x0, 0x10000)
    c.write_memory(vm_id, 0x1000, b"from the wheel")
    out["memory"] = c.read_memory(vm_id, 0x1000, 14).decode()
    out["labels"] = dict(c.get_vm(vm_id).labels)
    out["is_message"] = isinstance(c.get_vm(vm_id), vmm_pb2.Vm)
    c.delete_vm(vm_id)
    try:
        c.get_vm(vm_id)
    except NotFoundError as e:
        out["after_delete"] = e.code.name
print(json.dumps(out))
"""


@dataclass
class Built:
    """The distribution files ``python -m build`` made."""

    wheel: Path
    sdist: Path


def _run(*args: str | Path, cwd: Path, timeout: float = BUILD_TIMEOUT,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}:\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _clean_env() -> dict[str, str]:
    """The environment without this test venv's traces (PYTHONPATH, VIRTUAL_ENV, its bin)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not p.startswith(str(REPO)))
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """sdist and wheel of a copy of clients/python (with proto/ beside it, as in the repo)."""
    root = tmp_path_factory.mktemp("client-src")
    shutil.copytree(CLIENT, root / "clients" / "python", ignore=shutil.ignore_patterns(
        "kvmd_proto", "build", "dist", "*.egg-info", "__pycache__"))
    (root / "proto").mkdir()
    for proto in (REPO / "proto").glob("*.proto"):
        shutil.copy(proto, root / "proto" / proto.name)
    dist = root / "dist"
    # Without --sdist/--wheel, build makes the sdist, then the wheel from the sdist alone:
    # the path of a published release, which proves the sdist carries the .proto files.
    _run(sys.executable, "-m", "build", "--outdir", dist, root / "clients" / "python",
         cwd=root, env=_clean_env())
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    return Built(wheel, sdist)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with only the wheel (and its dependencies) installed."""
    directory = tmp_path_factory.mktemp("client-venv")
    env = _clean_env()
    # The base interpreter, not this test's venv: the new venv must not see its packages.
    # Without pip of its own (ensurepip costs 5-10 s here): this test venv's pip installs
    # into it (--python), resolving the wheel's requirements from the indexes.
    _run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
         directory / "venv", cwd=directory, env=env)
    _run(sys.executable, "-m", "pip", "--python", directory / "venv" / "bin" / "python",
         "install", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
         built.wheel, cwd=directory, env=env)
    return directory / "venv"


def test_the_wheel_is_pure_python(built: Built) -> None:
    assert built.wheel.name.startswith("kvmd_client-")
    assert built.wheel.name.endswith("-py3-none-any.whl"), built.wheel.name
    with zipfile.ZipFile(built.wheel) as z:
        names = z.namelist()
        [wheel_meta] = [n for n in names if n.endswith(".dist-info/WHEEL")]
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        wheel_text = z.read(wheel_meta).decode()
        metadata_text = z.read(metadata).decode()
        entry_text = z.read(entry_points).decode()
    assert "Root-Is-Purelib: true" in wheel_text
    assert "Tag: py3-none-any" in wheel_text
    assert [n for n in names if n.endswith(COMPILED)] == []
    dist_info = "-".join(built.wheel.name.split("-")[:2]) + ".dist-info"
    top = {n.split("/")[0] for n in names}
    assert top == {"kvmd_client", "kvmd_proto", dist_info}, top  # no kvmd, no "client"
    for stub in ("__init__.py", "vmm_pb2.py", "vmm_pb2_grpc.py", "vmm_pb2.pyi", "py.typed"):
        assert f"kvmd_proto/{stub}" in names
    assert "kvmd_client/kvmctl.py" in names and "kvmd_client/py.typed" in names
    requires = [line.split(":", 1)[1].strip().lower() for line in metadata_text.splitlines()
                if line.startswith("Requires-Dist:")]
    assert requires and all(r.startswith(("grpcio", "protobuf")) for r in requires), requires
    assert not any(r.startswith(("grpcio-tools", "grpcio_tools", "cffi")) for r in requires)
    assert "kvmctl = kvmd_client.kvmctl:main" in entry_text


def test_the_sdist_carries_the_protos(built: Built) -> None:
    with tarfile.open(built.sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert "proto/vmm.proto" in names
    assert {"setup.py", "pyproject.toml", "kvmd_client/kvmd_client.py"} <= names


def test_the_installed_kvmctl_drives_a_daemon(venv: Path, address: str, tmp_path: Path,
                                              vm_id: str) -> None:
    kvmctl = venv / "bin" / "kvmctl"
    env = _clean_env()
    info = json.loads(_run(kvmctl, "--address", address, "--json", "info", cwd=tmp_path,
                           env=env, timeout=60).stdout)
    assert info["api_version"] == 12
    _run(kvmctl, "--address", address, "vm", "create", vm_id, "--label", "via=wheel",
         cwd=tmp_path, env=env, timeout=60)
    got = json.loads(_run(kvmctl, "--address", address, "--json", "vm", "get", vm_id,
                          cwd=tmp_path, env=env, timeout=60).stdout)
    assert got["labels"] == {"via": "wheel"}
    _run(kvmctl, "--address", address, "vm", "delete", vm_id, cwd=tmp_path, env=env,
         timeout=60)
    missing = subprocess.run([str(kvmctl), "--address", address, "vm", "get", vm_id],
                             cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: NOT_FOUND")


def test_the_installed_library_drives_a_daemon(venv: Path, address: str, tmp_path: Path,
                                               vm_id: str) -> None:
    script = tmp_path / "use_client.py"
    script.write_text(SCRIPT)
    # -I: no PYTHONPATH, no user site, and not the script's or the current directory.
    result = _run(venv / "bin" / "python", "-I", script, address, vm_id, cwd=tmp_path,
                  env=_clean_env(), timeout=60)
    out = json.loads(result.stdout)
    for module in ("kvmd_client", "kvmd_proto"):
        assert out[module].startswith(str(venv)), (module, out[module])
    assert not out["daemon_importable"], "the daemon's package is importable from the venv"
    assert not any(p.startswith(str(REPO)) for p in out["path"]), out["path"]
    assert out["api_version"] == 12
    assert out["memory"] == "from the wheel"
    assert out["labels"] == {"from": "wheel"}
    assert out["is_message"] is True
    assert out["after_delete"] == "NOT_FOUND"
