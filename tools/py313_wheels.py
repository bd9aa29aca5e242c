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

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out


def has_wheel(name: str, version: str, folder: str) -> str:
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
    names = [line.split(">=")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    colab, lock = pins(ROOT / "constraints-colab.txt"), pins(ROOT / "constraints.txt")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            for where, table in (("Colab", colab), ("locked", lock)):
                if name in table:
                    print(f"{name:14s} {where:6s} {table[name]:10s} {has_wheel(name, table[name], folder)}")


if __name__ == "__main__":
    main()
