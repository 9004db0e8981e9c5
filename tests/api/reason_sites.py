"""Every place in kvmd that builds a domain error, found by walking the source (AST): the
test of reasons checks that each names a specific reason (see test_api_reasons)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import kvmd
from kvmd.core.errors import (
    AlreadyExists,
    DomainError,
    KernelError,
    NotFound,
    Reason,
    Unauthenticated,
    Unsupported,
)

ROOT = Path(kvmd.__file__).parent
# Classes whose own default reason is specific whatever the site: a kernel failure, a
# missing capability, no identity.
SPECIFIC_DEFAULTS = (KernelError, Unsupported, Unauthenticated)
# Classes whose reason follows from the kind of `resource=` ("vm/a/vcpu/0" -> VCPU_...).
BY_RESOURCE = (NotFound, AlreadyExists)


@dataclass(frozen=True)
class Site:
    """One call building a domain error: where, which class, and its keyword arguments."""

    path: str
    line: int
    cls: type[DomainError]
    keywords: frozenset[str]
    reason: str | None  # the X of `reason=Reason.X`, if written so

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.cls.__name__}"


def domain_error_classes() -> dict[str, type[DomainError]]:
    """Every DomainError subclass defined anywhere in kvmd, by name."""
    for info in pkgutil.walk_packages([str(ROOT)], "kvmd."):
        if ".gen" not in info.name:
            importlib.import_module(info.name)
    found: dict[str, type[DomainError]] = {}
    todo: list[type[DomainError]] = [DomainError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def raise_sites() -> list[Site]:
    classes = domain_error_classes()
    sites = []
    for path in sorted(ROOT.rglob("*.py")):
        if "gen" in path.parts or (path.name == "errors.py" and path.parent.name == "core"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = (node.func.id if isinstance(node.func, ast.Name) else
                    node.func.attr if isinstance(node.func, ast.Attribute) else None)
            cls = classes.get(name or "")
            if cls is None or cls is DomainError:
                continue
            reason = None
            for kw in node.keywords:
                if kw.arg == "reason" and isinstance(kw.value, ast.Attribute) and \
                        isinstance(kw.value.value, ast.Name) and kw.value.value.id == "Reason":
                    reason = kw.value.attr
            sites.append(Site(str(path.relative_to(ROOT.parent)), node.lineno, cls,
                              frozenset(kw.arg for kw in node.keywords if kw.arg), reason))
    return sites


def unspecific(site: Site) -> str | None:
    """Why `site` would send a reason that is not specific, or None when it is fine."""
    if "reason" in site.keywords:
        if site.reason is None:
            return None  # computed (e.g. from a table): checked where it is computed
        if site.reason not in Reason.__members__:
            return f"Reason.{site.reason} does not exist"
        owner = Reason[site.reason].error
        if not issubclass(site.cls, owner):
            return f"Reason.{site.reason} belongs to {owner.__name__}"
        return None
    if "default_reason" in vars(site.cls) and site.cls.__module__ != "kvmd.core.errors":
        return None  # a subclass with its own reason (HandingOver, CorruptSnapshot)
    if issubclass(site.cls, SPECIFIC_DEFAULTS):
        return None
    if issubclass(site.cls, BY_RESOURCE) and "resource" in site.keywords:
        return None
    return "no reason= (and no resource= its kind could name)"
