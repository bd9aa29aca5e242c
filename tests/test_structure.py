"""The package's shape, kept by tests: imports run one way (no cycle, no function-local import of the package's own
modules), no signature wider than 10 parameters, no function body over 80 lines, and one training step nests at
most 7 of the package's frames (Experiment.distil down to the divergence)."""

import ast
import os
import sys
from pathlib import Path

from pocket_teacher import experiment

PACKAGE = Path(experiment.__file__).resolve().parent


def _trees():
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def _functions(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_imports_run_one_way():
    graph, local = {}, []
    for module, tree in _trees().items():
        top = {node for node in tree.body if isinstance(node, ast.ImportFrom)}
        graph[module] = {(node.module or "").split(".")[0] or alias.name for node in top if node.level == 1
                         for alias in node.names} - {module}
        for function in _functions(tree):
            local += [f"{module}.{function.name}: from .{node.module}" for node in ast.walk(function)
                      if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert not local, f"function-local imports of the package's own modules: {local}"
    done, path = set(), []

    def visit(module):  # depth-first: a module met again on the current path closes a cycle
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph.get(module, ())):
            visit(dependency)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        visit(module)


def test_no_signature_over_10_parameters_and_no_body_over_80_lines():
    wide, long = [], []
    for module, tree in _trees().items():
        for f in _functions(tree):
            names = [a.arg for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]
            count = len(names) - (names[:1] in (["self"], ["cls"], ["ctx"])) + bool(f.args.vararg) + bool(f.args.kwarg)
            if count > 10:
                wide.append(f"{module}.{f.name} ({count})")
            if f.end_lineno - f.body[0].lineno + 1 > 80:
                long.append(f"{module}.{f.name} ({f.end_lineno - f.body[0].lineno + 1} lines)")
    assert not wide and not long, f"wider than 10 parameters: {wide}; bodies over 80 lines: {long}"


def test_one_training_step_nests_at_most_7_of_the_package_frames(tmp_path):
    exp = experiment.Experiment(experiment.configure("tiny", [f"run.out_dir={tmp_path}", "eval.baseline=false",
                                                              "eval.on_policy_preview=0"]), progress=False)
    for method in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student", "build_cache"):
        getattr(exp, method)()
    deepest = []

    def profile(frame, event, arg):
        if event == "call":
            chain = []
            while frame is not None:
                if frame.f_code.co_filename.startswith(str(PACKAGE) + os.sep):
                    chain.append(f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}")
                frame = frame.f_back
            if len(chain) > len(deepest):
                deepest[:] = chain[::-1]
    sys.setprofile(profile)
    try:
        exp.distil(["train.max_steps=2", "train.eval_every=1"])
    finally:
        sys.setprofile(None)
    assert deepest[0] == "experiment.distil" and len(deepest) <= 7, " -> ".join(deepest)
