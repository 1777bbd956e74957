"""The package's shape: subpackages by stage, no import cycles, the DAG built without heavy
imports, and an installed (non-editable) shardtune that runs the workflow without src/."""

import ast
import os
import subprocess
import sys

from conftest import BIN, REPO, copy_workflow, plain_shell_env, snakemake

PKG = REPO / "src" / "shardtune"
STAGES = ("inputs", "data", "plan", "launch", "train", "export", "evaluate", "publish", "report")
HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")


def module_name(path):
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """shardtune modules `path` imports anywhere (function-level imports too)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    modules = {module_name(p) for p in PKG.rglob("*.py")}
    return {m for m in found if m in modules and m != here}


def test_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # a planted cycle: two modules importing each other
    pkg = tmp_path / "shardtune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from shardtune.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from shardtune import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "shardtune.a -> shardtune.b -> shardtune.a" in str(err)
    else:
        raise AssertionError("the cycle was not found")


def test_stages_are_subpackages_with_a_one_line_docstring():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PKG / stage / "__init__.py").read_text()))
        assert doc and "\n" not in doc.strip(), stage
    flat = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    assert flat == ["config", "config_docs", "errors", "io"]  # shared, at the bottom


BLOCKER = """
import importlib.abc, sys
HEAVY = {heavy!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"building the DAG imported {{name}}")
sys.meta_path.insert(0, Blocker())
"""


def test_building_the_dag_imports_nothing_heavy(tmp_path):
    """A dry run with torch, transformers, peft, ... made unimportable still builds the DAG."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(heavy=HEAVY))
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "--cores", "2", "all", "upload", env={"PYTHONPATH": str(blocker)})
    assert "fsdp_train" in result.stdout
    # the blocker is active: a job-side import fails under it
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(blocker)}, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "building the DAG imported torch" in probe.stderr


def test_an_installed_package_runs_the_workflow_without_the_source_tree(tmp_path):
    """`pip install .` (not editable): the schema and everything read at run time are package
    data; the workflow, copied without src/, prepares the data with the installed package."""
    target = tmp_path / "site"
    subprocess.run(
        [str(BIN / "pip"), "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert (target / "shardtune" / "schemas" / "config.schema.yaml").is_file()
    workdir = copy_workflow(tmp_path / "wf", {"runs": {"demo": {}}, "dataset": {"builtin": {"conversations": 60}}})
    import shutil

    shutil.rmtree(workdir / "src")
    env = {"PYTHONPATH": str(target)}
    result = snakemake(workdir, "--cores", "2", "data", env=env)
    assert "Finished" in result.stdout
    assert list((workdir / "resources/prepared").glob("*/stats.json"))
    # the jobs ran the installed package, not a source tree
    check = subprocess.run(
        [str(BIN / "python"), "-c", "import shardtune; print(shardtune.__file__)"],
        env={**plain_shell_env(), **env},
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert check.stdout.startswith(str(target))
