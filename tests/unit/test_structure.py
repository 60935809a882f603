"""The rule "no module calls another module's underscore names", checked on the source.

Inside kasou, a name that starts with an underscore belongs to its object (``self._x``,
``cls._x``) or its module. Another object's private attribute (``self.vms._record``,
``svc._submit``) or another module's private name (``from kasou.model.spec import _parse``)
is a dependency that no interface shows. What several modules share is public (for the VM
sub-services: :mod:`kasou.control.base`). Dunder names (``__version__``) are not private.
A class may reach its own private class attributes by name (``Name._x``) in its own module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kasou"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(root: Path) -> list[str]:
    """Every use of another object's or module's underscore name under ``root``, as ``path:line: what``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value
                if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in classes):
                    continue
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                if node.level == 0 and not module.startswith("kasou"):
                    continue
                found += [
                    f"{where}:{node.lineno}: from {module} import {a.name}"
                    for a in node.names
                    if _private(a.name) or any(_private(part) for part in module.lstrip(".").split(".") if part)
                ]
            elif isinstance(node, ast.Import):
                found += [
                    f"{where}:{node.lineno}: import {a.name}"
                    for a in node.names
                    if a.name.startswith("kasou") and any(_private(part) for part in a.name.split("."))
                ]
    return found


def test_no_module_uses_another_modules_underscore_names() -> None:
    uses = private_uses(SRC)
    assert not uses, "underscore names used outside their object or module:\n" + "\n".join(uses)


def test_the_check_sees_what_it_forbids(tmp_path: Path) -> None:
    pkg = tmp_path / "kasou"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        "from kasou.b import _helper, __version__\n"
        "class Counter:\n"
        "    _next = 0\n"
        "    def take(self, svc):\n"
        "        Counter._next += 1\n"
        "        self._mine()\n"
        "        return svc._record('x'), svc.__class__\n"
    )
    (pkg / "b.py").write_text("from kasou.a import Counter\nCounter._next = 5\n")
    assert private_uses(pkg) == [
        "kasou/a.py:1: from kasou.b import _helper",
        "kasou/a.py:7: svc._record",
        "kasou/b.py:2: Counter._next",
    ]
