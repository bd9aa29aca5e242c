"""Whether PyPI has a wheel usable on Python 3.13 (Linux x86_64) for each run-time requirement, at Colab's version
(constraints-colab.txt) and at the locked one (constraints.txt). Needs pip and the network to PyPI; downloads
only wheels, with no dependencies, into a temporary folder.

    python tools/py313_wheels.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from colab_install import canonicalize_name, read_pins, read_requirements  # tools/ is on sys.path when run

ROOT = Path(__file__).resolve().parents[1]


def has_wheel(name: str, version: str, root: str) -> str:
    folder = tempfile.mkdtemp(dir=root)  # one folder per download: the wheel found is this one
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.13", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_24_x86_64", "--platform",
           "manylinux_2_28_x86_64", "-d", folder,
           f"{name}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return "no wheel"
    wheel = max(Path(folder).glob("*.whl"), key=lambda p: p.stat().st_mtime)
    return wheel.name.split("-", 2)[2].removesuffix(".whl")


def main() -> None:
    names = [canonicalize_name(r.name) for r in read_requirements(str(ROOT / "requirements.txt"))]
    colab, lock = read_pins(str(ROOT / "constraints-colab.txt")), read_pins(str(ROOT / "constraints.txt"))
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            for where, table in (("Colab", colab), ("locked", lock)):
                if name in table:
                    print(f"{name:14s} {where:6s} {table[name]:10s} {has_wheel(name, table[name], folder)}")


if __name__ == "__main__":
    main()
