"""The package layout: ``keras_aesam`` is the library, ``keras_aesam.cli`` the command, ``keras_aesam.bench`` the
experiments. The library never imports the other two; the command loads the bench only to run ``keras-aesam bench``;
the bench's modules import one another without a cycle.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import keras_aesam

PACKAGE = Path(keras_aesam.__file__).parent
APPLICATIONS = ("keras_aesam.cli", "keras_aesam.bench")
LIBRARY_MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def _imported_names(path: Path, package: str):
    """Every module name an import statement in ``path`` names (at any depth, relative ones resolved)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from keras_aesam import cli`


def _import_graph(folder: Path, package: str):
    """``{module: the modules of package it imports}`` for the ``.py`` files of ``folder`` (the package).

    A name the package's ``__init__`` provides (``from package import main``) is an import of ``__init__``.
    """
    modules = {path.stem for path in folder.glob("*.py")}
    graph = {}
    for path in sorted(folder.glob("*.py")):
        targets = set()
        for name in _imported_names(path, package):
            if name.startswith(package + "."):
                first = name[len(package) + 1:].split(".")[0]
                targets.add(first if first in modules else "__init__")
        graph[path.stem] = targets - {path.stem}
    return graph


def _cycle(graph):
    """One cycle of ``graph`` as ``[a, b, …, a]``, or None (depth-first, modules in name order)."""
    done, open_path = set(), []

    def visit(node):
        open_path.append(node)
        for target in sorted(graph.get(node, ())):
            if target in open_path:
                return open_path[open_path.index(target):] + [target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        open_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            found = visit(node)
            if found:
                return found
    return None


def _is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATIONS)


def _loaded_after(statement: str):
    """The keras_aesam modules a fresh interpreter has loaded after ``statement`` (run as plain Python, not as the
    console script)."""
    code = f"import sys\n{statement}\nprint('\\n'.join(m for m in sys.modules if m.startswith('keras_aesam')))\n"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_library_has_modules_and_the_applications_are_packages():
    assert {"model", "policies", "directions", "ops", "methods"} <= set(LIBRARY_MODULES)
    for app in APPLICATIONS:
        assert (PACKAGE.parent / app.replace(".", "/") / "__init__.py").is_file(), app


def test_no_library_module_imports_the_command_or_the_bench():
    offending = {
        f"keras_aesam/{path.name}: {name}"
        for path in [PACKAGE / "__init__.py", *(PACKAGE / f"{stem}.py" for stem in LIBRARY_MODULES)]
        for name in _imported_names(path, "keras_aesam")
        if _is_application(name)
    }
    assert not offending, sorted(offending)


def test_the_import_check_sees_every_form_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from keras_aesam import cli\n    from .bench import plan\n"
                      "import keras_aesam.cli.flags\n")
    names = set(_imported_names(source, "keras_aesam"))
    assert {"keras_aesam.cli", "keras_aesam.bench.plan", "keras_aesam.cli.flags"} <= names
    assert all(_is_application(n) for n in ("keras_aesam.cli", "keras_aesam.bench.plan", "keras_aesam.cli.flags"))
    assert not _is_application("keras_aesam.client")


def test_importing_the_library_loads_neither_the_command_nor_the_bench():
    statement = "import keras_aesam\n" + "".join(f"import keras_aesam.{stem}\n" for stem in LIBRARY_MODULES)
    loaded = _loaded_after(statement)
    assert "keras_aesam.model" in loaded  # the check saw the library load
    assert not {m for m in loaded if _is_application(m)}, sorted(loaded)


def test_importing_the_command_does_not_load_the_bench():
    loaded = _loaded_after("import keras_aesam.cli")
    assert "keras_aesam.cli.training" in loaded
    assert not {m for m in loaded if m == "keras_aesam.bench" or m.startswith("keras_aesam.bench.")}, sorted(loaded)


def test_the_bench_modules_import_one_another_without_a_cycle():
    graph = _import_graph(PACKAGE / "bench", "keras_aesam.bench")
    assert {"noisy_labels_plan", "noisy_labels_report", "stats"} <= graph["noisy_labels"] | graph["noisy_labels_report"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_imports_in_functions_relative_ones_and_the_package_itself(tmp_path):
    (tmp_path / "__init__.py").write_text("from pkg.a import run\n")
    (tmp_path / "a.py").write_text("from pkg import b\nrun = 1\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    assert _cycle(_import_graph(tmp_path, "pkg")) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert _cycle(_import_graph(tmp_path, "pkg")) is None
    (tmp_path / "c.py").write_text("import pkg\nfrom pkg import run\n")  # the package's __init__ imports a
    assert _cycle(_import_graph(tmp_path, "pkg")) == ["__init__", "a", "b", "c", "__init__"]
