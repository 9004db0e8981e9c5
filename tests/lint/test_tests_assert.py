"""Every test must be able to fail: a lint over the suite's own source.

A test function (``test_*`` at module level or in a ``Test*`` class, anywhere under tests/)
passes this check when its body, or a helper it calls, asserts something:

* an ``assert`` statement, ``raise AssertionError``, ``pytest.raises``/``pytest.warns``/
  ``pytest.fail``;
* a call to an *asserting helper*: a function defined under tests/ (not a fixture) whose
  body does one of the above, or calls another asserting helper, found by name to a fixed
  point: ``api.assert_code(...)``, ``ok(kvmctl(...))``, ``wait_until(...)``,
  ``handler.claimed()``. In helpers, ``assert x is not None`` and ``assert isinstance(...)``
  are type narrowing, not checks. A name counts only if every helper of that name asserts
  (so ``start()`` or ``close()`` never pass for a check), and a test's call of its own
  parameter (a fixture such as ``kvmctl``) is not a helper call.

Name matching is still generous, so a hit is certain: a test whose body cannot fail short of
an unexpected exception. Each hit is fixed, or listed in ALLOWED with its reason.

Run it alone: ``.venv/bin/pytest -q tests/lint``; ``.venv/bin/python
tests/lint/test_tests_assert.py`` prints every hit (allowed ones with their reason).
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# "path::name" -> why the test is allowed to have no assertion of its own.
ALLOWED: dict[str, str] = {
    "kvm/test_kvm_vm.py::test_set_tss_address":
        "fails only if KVM_SET_TSS_ADDR itself fails; the file belongs to another branch's "
        "work. To do: assert the kernel's range check (an address above 4 GiB - 3 pages is "
        "EINVAL) so the test shows the call reached the kernel.",
}

_PYTEST_ASSERTING = {"raises", "warns", "fail", "deprecated_call"}


@dataclass(frozen=True)
class Func:
    """One function definition under tests/."""

    path: Path
    name: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    is_test: bool

    @property
    def key(self) -> str:
        return f"{self.path.relative_to(TESTS).as_posix()}::{self.name}"


def _functions(path: Path) -> Iterator[Func]:
    """Module-level and class-level functions (tests if named so), and functions nested in
    those (closures in fixtures or tests: helpers that assert for their callers)."""
    tree = ast.parse(path.read_text(), str(path))
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)

    def nested(node: ast.AST) -> Iterator[Func]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, defs):
                yield Func(path, child.name, child, False)
            yield from nested(child)

    for node in tree.body:
        members: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool]] = []
        if isinstance(node, defs):
            members.append((node, node.name.startswith("test")))
        elif isinstance(node, ast.ClassDef):
            members += [(item, node.name.startswith("Test") and item.name.startswith("test"))
                        for item in node.body if isinstance(item, defs)]
        for func, is_test in members:
            yield Func(path, func.name, func, is_test)
            yield from nested(func)


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _narrowing(test: ast.expr) -> bool:
    """`assert x is not None` / `assert isinstance(x, T)`: a type-narrowing precondition in
    a helper, not a check of behaviour."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 \
            and isinstance(test.ops[0], ast.IsNot) \
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value is None:
        return True
    return isinstance(test, ast.Call) and isinstance(test.func, ast.Name) \
        and test.func.id == "isinstance"


def _asserts_directly(node: ast.AST, *, helper: bool = False) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert):
            if helper and _narrowing(sub.test):
                continue
            return True
        if isinstance(sub, ast.Raise) and sub.exc is not None:
            exc = sub.exc.func if isinstance(sub.exc, ast.Call) else sub.exc
            if isinstance(exc, ast.Name) and exc.id == "AssertionError":
                return True
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) \
                and isinstance(sub.func.value, ast.Name) and sub.func.value.id == "pytest" \
                and sub.func.attr in _PYTEST_ASSERTING:
            return True
    return False


def _calls(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names the function calls, except its own parameters (fixtures such as `kvmctl` are
    called by tests, and must not be taken for a helper of the same name)."""
    params = {a.arg for a in (*node.args.posonlyargs, *node.args.args,
                              *node.args.kwonlyargs)}
    return {name for sub in ast.walk(node) if isinstance(sub, ast.Call)
            if (name := _called_name(sub)) is not None
            and not (isinstance(sub.func, ast.Name) and name in params)}


def suite_functions() -> list[Func]:
    return [f for path in sorted(TESTS.rglob("*.py")) for f in _functions(path)]


def _is_fixture(f: Func) -> bool:
    for dec in f.node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "fixture":
            return True
    return False


def asserting_helpers(funcs: list[Func]) -> set[str]:
    """Names of helpers that assert, directly or through another such helper. A name counts
    only if every non-test, non-fixture function of that name under tests/ asserts, so a
    call of a common method name (``start``, ``close``) is not taken for a check."""
    helpers = [f for f in funcs if not f.is_test and not _is_fixture(f)
               and not f.name.startswith("__")]
    calls = {id(f): _calls(f.node) for f in helpers}
    asserting = {id(f) for f in helpers if _asserts_directly(f.node, helper=True)}

    def names() -> set[str]:
        by_name: dict[str, list[bool]] = {}
        for f in helpers:
            by_name.setdefault(f.name, []).append(id(f) in asserting)
        return {name for name, verdicts in by_name.items() if all(verdicts)}

    changed = True
    while changed:
        changed = False
        known = names()
        for f in helpers:
            if id(f) not in asserting and calls[id(f)] & known:
                asserting.add(id(f))
                changed = True
    return names()


@functools.cache
def unasserting_tests() -> tuple[str, ...]:
    """Keys ("path::name") of test functions that assert nothing, even through helpers."""
    funcs = suite_functions()
    helpers = asserting_helpers(funcs)
    return tuple(sorted(f.key for f in funcs if f.is_test
                        and not _asserts_directly(f.node) and not _calls(f.node) & helpers))


def test_every_test_asserts_something() -> None:
    hits = [key for key in unasserting_tests() if key not in ALLOWED]
    assert hits == [], ("tests that cannot fail (no assert, pytest.raises or asserting "
                        "helper); fix them or list them in ALLOWED with a reason:\n  "
                        + "\n  ".join(hits))


def test_allow_list_is_current() -> None:
    """Every allowed entry names an existing test that still needs the exception."""
    stale = sorted(set(ALLOWED) - set(unasserting_tests()))
    assert stale == [], f"ALLOWED entries that no longer apply: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_the_lint_sees_a_test_without_assertions(tmp_path: Path) -> None:
    """The checker itself can fail: a module with one asserting and one empty test."""
    module = tmp_path / "test_sample.py"
    module.write_text("def helper(x):\n    assert x\n\n"
                      "def test_checked():\n    helper(1)\n\n"
                      "def test_empty():\n    print('ran')\n")
    funcs = list(_functions(module))
    helpers = asserting_helpers(funcs)
    verdict = {f.name: _asserts_directly(f.node) or bool(_calls(f.node) & helpers)
               for f in funcs if f.is_test}
    assert verdict == {"test_checked": True, "test_empty": False}


if __name__ == "__main__":
    found = unasserting_tests()
    for key in found:
        print(f"{key}{'  (allowed: ' + ALLOWED[key] + ')' if key in ALLOWED else ''}")
    sys.exit(1 if set(found) - set(ALLOWED) else 0)
