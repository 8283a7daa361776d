"""The .pyi stubs of the compiled fastpath modules say what the modules are.

mypy reads ``broker/_fastpath/<name>.pyi`` for the compiled module; nothing
generates it at build time, so this test holds it to two references: the
pure twin ``<name>_py.py`` (names, parameters, defaults and annotations) and
the built module (its public names, its members, and the parameters that
Cython's ``embedsignature`` exposes).
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import broker._fastpath as fastpath
from broker._fastpath import MODULES, load

HERE = Path(fastpath.__file__).parent

# Where the compiled module's type deliberately differs from its twin's.
DIFFERENCES = {
    ("subtable", "SubscriptionTable.subscribers", "return"): "memoryview",
}


def _aliases(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level type aliases (``Buffer = Union[...]``, ``_B: TypeAlias = ...``)."""
    found: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        if isinstance(value, ast.BinOp | ast.Subscript):
            found[target] = value
    return found


class _Normalize(ast.NodeTransformer):
    """One spelling per type: aliases expanded, Union/Optional as ``|``."""

    def __init__(self, aliases: dict[str, ast.expr]) -> None:
        self.aliases = aliases

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id in self.aliases:
            return self.visit(self.aliases[node.id])
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.expr:
        node = self.generic_visit(node)  # type: ignore[assignment]
        name = node.value.id if isinstance(node.value, ast.Name) else None
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Optional":
            args = [*args, ast.Constant(None)]
        if name in ("Union", "Optional"):
            joined = args[0]
            for arg in args[1:]:
                joined = ast.BinOp(joined, ast.BitOr(), arg)
            return joined
        return node


def _annotation(text: str | ast.expr | None, aliases: dict[str, ast.expr]) -> str | None:
    if text is None:
        return None
    expr = ast.parse(text, mode="eval").body if isinstance(text, str) else text
    return ast.unparse(_Normalize(aliases).visit(expr))


def _stub_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """``name`` / ``Class.name`` -> def, for public names (and ``__init__``)."""
    found: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return {k: v for k, v in found.items() if not k.rsplit(".", 1)[-1].startswith("_") or k.endswith("__init__")}


def _stub_members(tree: ast.Module) -> dict[str, set[str]]:
    """Public names of the module ("") and of each public class."""
    members: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            name = node.name
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        if name.startswith("_"):
            continue
        members[""].add(name)
        if isinstance(node, ast.ClassDef):
            members[name] = {
                item.name if isinstance(item, ast.FunctionDef) else item.target.id  # type: ignore[union-attr]
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AnnAssign)
            }
            members[name] = {n for n in members[name] if not n.startswith("_")}
    return members


def _stub(name: str) -> ast.Module:
    return ast.parse((HERE / f"{name}.pyi").read_text())


def _resolve(module: object, dotted: str) -> object:
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


@pytest.mark.parametrize("name", MODULES)
def test_stub_names_are_the_compiled_modules_names(name: str) -> None:
    compiled = load(name, "compiled")
    members = _stub_members(_stub(name))
    exported = set(compiled.__all__)
    assert members[""] == exported, "the stub declares exactly the module's __all__"
    for cls, names in members.items():
        if cls:
            assert names == _public(getattr(compiled, cls)), f"{name}.{cls}: members differ from the built class"


@pytest.mark.parametrize("name", MODULES)
def test_stub_signatures_match_the_twin(name: str) -> None:
    tree = _stub(name)
    stub_aliases = _aliases(tree)
    twin = load(name, "pure")
    twin_aliases = _aliases(ast.parse(Path(twin.__file__).read_text()))
    functions = _stub_functions(tree)
    assert functions, "the stub declares functions"
    for dotted, node in functions.items():
        reference = _resolve(twin, dotted)
        if isinstance(reference, property):
            assert any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list), dotted
            reference = reference.fget
        signature = inspect.signature(reference)  # type: ignore[arg-type]
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        assert [a.arg for a in args] == list(signature.parameters), f"{name}.{dotted}: parameters"
        defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults)
        for arg, default in zip(node.args.args, defaults, strict=True):
            expected = signature.parameters[arg.arg].default
            if default is None:
                assert expected is inspect.Parameter.empty, f"{name}.{dotted}({arg.arg}): the twin has a default"
            else:
                assert ast.literal_eval(default) == expected, f"{name}.{dotted}({arg.arg}): default"
        for arg in args:
            if arg.arg == "self":
                continue
            want = _annotation(signature.parameters[arg.arg].annotation, twin_aliases)
            assert _annotation(arg.annotation, stub_aliases) == want, f"{name}.{dotted}({arg.arg}): type"
        want_return = DIFFERENCES.get((name, dotted, "return")) or _annotation(
            signature.return_annotation, twin_aliases)
        assert _annotation(node.returns, stub_aliases) == want_return, f"{name}.{dotted}: return type"


@pytest.mark.parametrize("name", MODULES)
def test_stub_parameters_match_the_built_module(name: str) -> None:
    compiled = load(name, "compiled")
    checked = 0
    for dotted, node in _stub_functions(_stub(name)).items():
        if dotted.endswith("__init__"):
            continue  # a cdef class's __init__ has no introspectable signature
        target = _resolve(compiled, dotted)
        if not callable(target):
            continue  # a property
        params = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
        assert list(inspect.signature(target).parameters) == params, f"{name}.{dotted}"
        checked += 1
    assert checked > 0
