"""What the OpenAPI document says beyond what FastAPI finds in the routes' signatures, so that another program can
be generated from it: the schema of every request body, the two ways to sign a request, and examples.

* Routes that take their body as a plain JSON object (``body: dict = Body(...)``) and check it themselves with a
  model's ``parse`` (one line of error, the model's own rules) are listed in :data:`BODIES` with that model: the
  document gives the model's schema as the body's, so no body is a bare ``object``
  (``tests/unit/test_openapi_document.py`` checks there is none).
* Security schemes: ``bearer`` (the API token, or a user's ``ksu_...`` token) and ``session`` (the sign-in cookie;
  a change also needs the header ``X-Kasou-CSRF: 1``). Every operation needs one of them but the public ones of
  :mod:`kasou.api.permissions` (sign-in, the console's websocket with its one-time ticket, the directory's
  status).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kasou.api.auth import CSRF_HEADER, SESSION_COOKIE
from kasou.api.permissions import ROUTES
from kasou.model.desktops import DesktopPoolCreate, DesktopPoolResize, DesktopRequest
from kasou.model.devices import DiskAdd, DiskResize, NicAdd
from kasou.model.directory import DirectorySet, GroupMapping
from kasou.model.imports import VMImport
from kasou.model.maintenance import WindowRequest
from kasou.model.media import MediaInsert
from kasou.model.pools import PoolCreate
from kasou.model.snapshots import SnapshotCreate
from kasou.model.spec import NetworkCreate, NetworkUpdate, VMCreate, VMUpdate
from kasou.model.users import UserCreate

#: (method, path) -> the model a route's plain-object body is parsed with.
BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/v1/vms"): VMCreate,
    ("PATCH", "/v1/vms/{name}"): VMUpdate,
    ("POST", "/v1/networks"): NetworkCreate,
    ("PATCH", "/v1/networks/{name}"): NetworkUpdate,
    ("POST", "/v1/vms/{name}/disks"): DiskAdd,
    ("POST", "/v1/vms/{name}/disks/{disk_id}/resize"): DiskResize,
    ("POST", "/v1/vms/{name}/nics"): NicAdd,
    ("POST", "/v1/vms/{name}/media"): MediaInsert,
    ("POST", "/v1/portal/desktop"): DesktopRequest,
    ("POST", "/v1/desktop-pools"): DesktopPoolCreate,
    ("PATCH", "/v1/desktop-pools/{pool}"): DesktopPoolResize,
    ("POST", "/v1/vms/{name}/snapshots"): SnapshotCreate,
    ("POST", "/v1/pools"): PoolCreate,
    ("POST", "/v1/imports"): VMImport,
    ("POST", "/v1/users"): UserCreate,
    ("POST", "/v1/maintenance-windows"): WindowRequest,
    ("PUT", "/v1/directory"): DirectorySet,
    ("PUT", "/v1/directory/mappings/{group}"): GroupMapping,
}

#: Examples of the bodies a hospital sends most, shown in the document.
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/vms"): {
        "name": "emr-db1",
        "vcpus": 4,
        "memory_mib": 8192,
        "image": "debian",
        "disk": "100G",
        "storage": "replicated",
        "ha": True,
        "priority": 90,
        "department": "emr",
        "criticality": "24h-clinical",
        "start": True,
    },
    ("PATCH", "/v1/vms/{name}"): {"priority": 80, "memory_mib": 16384},
    ("POST", "/v1/users"): {
        "name": "tanaka",
        "role": "operator",
        "password": "correct horse battery",
        "display_name": "Tanaka (IT)",
    },
    ("POST", "/v1/vms/{name}/snapshots"): {"name": "before-update"},
    ("POST", "/v1/maintenance-windows"): {
        "vendor": "lab-vendor",
        "vms": ["lab"],
        "starts_at": 1796904000,
        "ends_at": 1796914800,
        "plan": "replace the lab DB's index",
    },
}

SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API token ($KASOU_HOME/api.token, an administrator) or a user's own token (ksu_...: "
        "kasou user token create).",
    },
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": SESSION_COOKIE,
        "description": f"A signed-in session (POST /v1/auth/login); a request that changes something also carries "
        f"the header {CSRF_HEADER}: 1.",
    },
}


def _schema_ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    """The model's schema (and those it uses) among the document's components; a reference to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document_api(doc: dict[str, Any]) -> dict[str, Any]:
    """Complete kasou's OpenAPI document in place: body schemas, security schemes, examples."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    components["securitySchemes"] = SECURITY_SCHEMES
    doc["security"] = [{"bearer": []}, {"session": []}]
    for path, methods in doc.get("paths", {}).items():
        for method, op in methods.items():
            key = (method.upper(), path)
            model = BODIES.get(key)
            if model is not None and "requestBody" in op:
                media = op["requestBody"]["content"]["application/json"]
                media["schema"] = _schema_ref(model, schemas)
                if key in EXAMPLES:
                    media["example"] = EXAMPLES[key]
            need = ROUTES.get(key)
            if need is not None and need.public:
                op["security"] = []
    return doc
