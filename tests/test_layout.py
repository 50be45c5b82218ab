"""Repository hygiene that protects users: the verl wheel installs top-level `tests` and
`scripts` packages, so this project must never import its own by those names."""

import ast
import os
import re
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = re.compile(r"^\s*(from|import)\s+(tests|scripts)(\.|\s|$)", re.MULTILINE)


def _python_files():
    for top in ("verl_mtp", "tests", "scripts", "recipes"):
        for dirpath, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_no_module_imports_tests_or_scripts_by_name():
    offenders = [p for p in _python_files() if FORBIDDEN.search(open(p, encoding="utf-8").read())]
    assert offenders == []


def test_pytest_collected_only_this_projects_tests(request):
    own_tests = os.path.join(REPO, "tests") + os.sep
    paths = {str(item.path) for item in request.session.items}
    assert paths, "nothing collected"
    assert all(p.startswith(own_tests) for p in paths), sorted(p for p in paths if not p.startswith(own_tests))


@pytest.mark.slow
def test_wheel_ships_only_the_verl_mtp_package(tmp_path):
    # `pip install verl-mtp` must not overwrite the verl wheel's top-level tests/ or scripts/.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("verl_mtp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names}
    assert {t for t in top_levels if not t.endswith(".dist-info")} == {"verl_mtp"}
    assert "verl_mtp/conf/ppo_megatron_mtp.yaml" in names  # the wrapper config is packaged
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    assert "[verl.plugins]" in text and "verl_mtp = verl_mtp.plugin" in text


# --- the layout: levels, no cycles, no upward imports, product never leans on its tests ------------

PACKAGE = os.path.join(REPO, "verl_mtp")

# Each module's level; a module imports only from its own level or below (function-level imports
# count). The longest matching prefix decides. Keep in step with the README's layout section.
LEVELS = {
    "verl_mtp": 0, "verl_mtp.version": 0, "verl_mtp.errors": 0, "verl_mtp.models.families": 0,
    "verl_mtp.patches.core": 0,
    "verl_mtp.config": 1,
    "verl_mtp.align": 2, "verl_mtp.occ": 2, "verl_mtp.megatron": 2,
    "verl_mtp.loss": 3, "verl_mtp.models": 3, "verl_mtp.ckpt": 3, "verl_mtp.rollout": 3,
    "verl_mtp.run_checks": 4,
    "verl_mtp.patches": 5,
    "verl_mtp.plugin": 6,
    "verl_mtp.local_megatron": 7,
    "verl_mtp.tools": 8,
    "verl_mtp.cli": 9,
    "verl_mtp.testing": 10,
}
# A package's __init__ has its own level where it differs from its modules' (exact names).
PACKAGE_FACES = {
    "verl_mtp.models": 0,  # re-exports the family tables only
    "verl_mtp.patches": 0,  # imports nothing: the catalog lists the patches
}
LONGEST_FUNCTION = 80
LONGEST_PATCH_FUNCTION = 25


def _modules():
    """{module name: path} for every module of the package."""
    found = {}
    for dirpath, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _imports(path, modules):
    """The verl_mtp modules ``path`` imports, anywhere in it (module or function level)."""
    own = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    package = own if own.endswith("__init__") else own.rsplit(".", 1)[0]
    package = package[: -len(".__init__")] if package.endswith(".__init__") else package
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # importing a submodule runs its packages' __init__ first: those are imported too
            while name.startswith("verl_mtp.") and not own.startswith(name + "."):
                targets.add(name)
                name = name.rpartition(".")[0]
    return targets


def _graph():
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _level(module):
    if module in PACKAGE_FACES:
        return PACKAGE_FACES[module]
    best = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[best]


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_no_import_cycle_in_the_package():
    assert _cycles(_graph()) == []


def test_every_import_runs_down_the_levels():
    upward = [
        f"{source} (level {_level(source)}) imports {target} (level {_level(target)})"
        for source, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _level(target) > _level(source)
    ]
    assert upward == []


def test_product_code_never_imports_its_test_fixtures():
    offenders = [
        f"{source} imports {target}"
        for source, targets in sorted(_graph().items())
        if not source.startswith("verl_mtp.testing")
        for target in sorted(targets)
        if target.startswith("verl_mtp.testing")
    ]
    assert offenders == []


def _function_lengths():
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node.name, node.end_lineno - node.lineno + 1


def test_no_function_longer_than_the_limit():
    long = [f"{m}.{f}: {n} lines" for m, f, n in _function_lengths() if n > LONGEST_FUNCTION]
    assert long == []


def test_the_patch_layer_only_wires():
    long = [
        f"{m}.{f}: {n} lines"
        for m, f, n in _function_lengths()
        if m.startswith("verl_mtp.patches") and n > LONGEST_PATCH_FUNCTION
    ]
    assert long == []


def test_the_layout_checks_see_what_they_check():
    # guards the checks above against reading nothing: known arrows and a known cycle are found
    graph = _graph()
    assert "verl_mtp.config" in graph["verl_mtp.run_checks"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _level("verl_mtp.rollout.spec_args") == 3 and _level("verl_mtp.patches.core") == 0
