"""The checked-in OpenAPI document is usable by others: a Python client generated from it by a maintained generator
(openapi-python-client) drives a running kasou (its real agent and API over HTTP): the version, the hosts, a VM
defined, shown, listed and deleted, and an error read in kasou's shape."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.api.spec import CHECKED_IN
from tests.integration.conftest import Kasou

# a running kasou (root, the tiny image); no guest is booted, so it runs beside the fast tests
pytestmark = [pytest.mark.qemu, pytest.mark.shares_machine]


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Any]:
    """The client package generated from the document, imported."""
    tool = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert tool, "openapi-python-client is a test dependency (pyproject.toml [test])"
    config = tmp_path / "generator.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run on the generated code
    out = tmp_path / "kasou_client"
    r = subprocess.run([tool, "generate", "--path", str(CHECKED_IN), "--meta", "none", "--output-path", str(out),
                        "--config", str(config)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and out.is_dir(), r.stdout + r.stderr
    assert "Warning" not in r.stdout + r.stderr, r.stdout + r.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("kasou_client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "kasou_client" or m.startswith("kasou_client.")]:
            del sys.modules[name]


def test_a_generated_client_drives_a_running_kasou(kasou: Kasou, generated: Any) -> None:
    api = importlib.import_module("kasou_client.api.default")
    models = importlib.import_module("kasou_client.models")

    def op(name: str) -> Any:
        return importlib.import_module(f"kasou_client.api.default.{name}")

    token = kasou.paths.token_file.read_text().strip()
    client = generated.AuthenticatedClient(base_url=f"http://{kasou.api}", token=token, timeout=30)
    assert api is not None
    version = op("version_v1_version_get").sync(client=client)
    assert version is not None
    hosts = op("hosts_v1_hosts_get").sync(client=client)
    assert hosts and all(h.state == "up" for h in hosts), hosts

    body = models.VMCreate(name="gen1", image="tiny", memory_mib=128, description="made by a generated client")
    accepted = op("create_vm_v1_vms_post").sync(client=client, body=body)
    assert isinstance(accepted, models.CreateAccepted), accepted
    deadline = time.monotonic() + 60
    while True:
        vm = op("get_vm_v1_vms_name_get").sync(client=client, name="gen1")
        if isinstance(vm, models.VMView) and vm.state == "stopped":
            break
        assert time.monotonic() < deadline, vm
        time.sleep(0.2)
    assert vm.description == "made by a generated client" and vm.memory_mib == 128
    assert [v.name for v in op("list_vms_v1_vms_get").sync(client=client)] == ["gen1"]

    missing = op("get_vm_v1_vms_name_get").sync_detailed(client=client, name="nope")
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Error), missing
    assert missing.parsed.code == "not_found" and "nope" in missing.parsed.message
    bad = op("create_vm_v1_vms_post").sync_detailed(client=client, body=models.VMCreate(name="bad name", image="tiny"))
    assert bad.status_code == 422 and isinstance(bad.parsed, models.Error), bad
    unsigned = generated.Client(base_url=f"http://{kasou.api}", timeout=30)
    assert op("list_vms_v1_vms_get").sync_detailed(client=unsigned).status_code == 401

    deleted = op("delete_vm_v1_vms_name_delete").sync_detailed(client=client, name="gen1")
    assert deleted.status_code in (200, 202), deleted
    deadline = time.monotonic() + 60
    while op("list_vms_v1_vms_get").sync(client=client):
        assert time.monotonic() < deadline, "gen1 not deleted"
        time.sleep(0.2)
