"""docker-compose.yml: valid for a real Compose implementation, and every service's command,
config file and paths agree with our real command-line parsers and config models."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from deploy_helpers import ROOT

from ark_core.commands.cli import build_parser as ark_parser
from ark_core.config import load_config
from ark_core.fed.federation import FederationConfig, SiteConfig
from client.cli import build_parser as client_parser
from server.cli import build_parser as server_parser

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package docker-compose) is not installed")
    res = subprocess.run([exe, "-f", str(COMPOSE), "--profile", "gpu", "config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)["services"]


def _mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (host source, read-only) of a service's volumes."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, dst, *mode = v.split(":")
            out[dst] = (src, bool(mode) and mode[0] == "ro")
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


def _host_path(container_path: str, mounts: dict[str, tuple[str, bool]]) -> tuple[Path | None, str]:
    """Where a container path lives: (host dir for bind mounts, else None; mount target)."""
    p = PurePosixPath(container_path)
    for target in sorted(mounts, key=len, reverse=True):
        if p == PurePosixPath(target) or PurePosixPath(target) in p.parents:
            src = mounts[target][0]
            rel = p.relative_to(target)
            return (Path(src) / rel if src.startswith("/") else None), target
    raise AssertionError(f"{container_path} is on no volume of the service")


def test_services_and_profiles(services):
    assert {"keys", "server", "site-a", "site-b", "site-c", "site-gpu"} <= set(services)
    for name in ("server", "site-a", "site-b", "site-c", "site-gpu"):
        assert services[name]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    gpu = services["site-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["site-gpu"].get("profiles") == ["gpu"]
    ports = services["server"]["ports"]
    assert [(int(p["published"]), int(p["target"])) for p in ports] == [(9092, 9092)]
    assert all("ports" not in services[s] for s in ("site-a", "site-b", "site-c"))


def test_commands_parse_and_configs_agree(services):
    keys = services["keys"]
    args = ark_parser().parse_args(keys["command"][1:])
    fed_path, _ = _host_path(str(args.config), _mounts(keys))
    fed = load_config(fed_path, FederationConfig)
    dep = fed.deployment
    assert dep is not None and str(args.keys_dir) == str(dep.keys_dir) == "/keys"
    assert "server" in dep.server_names  # the name the sites use on the compose network

    server = services["server"]
    sargs = server_parser().parse_args(server["command"][1:])
    assert not sargs.sync_keys and not sargs.no_submit
    m = _mounts(server)
    assert _host_path(str(sargs.config), m)[0] == fed_path
    assert m["/keys"][1], "the server only reads the keys"
    assert _host_path(str(fed.run_dir), m)[1] == "/runs"
    assert int(server["ports"][0]["target"]) == dep.port and dep.host == "0.0.0.0"
    for site in dep.sites:
        assert _host_path(str(site.public_key), m)[1] == "/keys"

    for name in ("site-a", "site-b", "site-c", "site-gpu"):
        svc = services[name]
        cargs = client_parser().parse_args(svc["command"][1:])
        assert not cargs.check_only
        m = _mounts(svc)
        site_path, _ = _host_path(str(cargs.config), m)
        site = load_config(site_path, SiteConfig)
        sd = site.deployment
        assert sd is not None and sd.server == f"server:{dep.port}"
        assert site.name in {s.name for s in dep.sites}
        assert _host_path(str(sd.private_key), m)[1] == "/keys"
        assert PurePosixPath(sd.private_key).name == f"{site.name}.key"
        assert _host_path(str(site.state_dir), m)[1] == "/state" and not m["/state"][1]
        for task in site.tasks:
            host, target = _host_path(str(task.root), m)
            assert target == "/data" and m["/data"][1], "site data is mounted read-only"
            assert host is not None and host.is_dir(), f"{name}: {task.root} -> {host}"
