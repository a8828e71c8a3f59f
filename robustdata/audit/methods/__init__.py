"""The audit-method registry: one object per method, found by name (DESIGN.md section 6).

Every module of this package except `base` holds one audit method: a subclass
of base.Method whose `name` is the module's name, registered with @register
when the module is imported (robustdata.registry). So the method names are the
module names, and robustdata.config lists them (AuditMethod) from the package's
files without importing torch; the first lookup imports every module. Adding a
method is adding one module here and its test.

This module stays light (no torch): the config imports it. (A method module
named `filter` becomes an attribute of this package once imported, shadowing
the builtin in this namespace: don't call the builtin here.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from robustdata.registry import Registry

if TYPE_CHECKING:
    from robustdata.audit.methods.base import Method

REGISTRY = Registry(__name__, "audit method", support={"base"}, make=lambda cls: cls())  # one instance each
method_names = REGISTRY.names
register = REGISTRY.register


def registry() -> dict[str, "Method"]:
    """name -> method, in the order the audit runs them on each class (Method.order)."""
    return dict(sorted(REGISTRY.all().items(), key=lambda item: item[1].order))


def get_method(name: str) -> "Method":
    """The method called `name`; an unknown name raises an error listing the valid ones."""
    return REGISTRY.get(name)
