"""The oldest version of each run-time package that this project is tested with, and a clear error when a
feature meets an older one (Colab keeps the packages it pins or has imported; see tools/colab_install.py).

`FLOORS` are requirements.txt's lower ends (tests/test_colab.py keeps the two equal); `make test-colab` runs the
tests at exactly those versions (Colab's GPU runtime), `make test` at the upper end.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

FLOORS = {"transformers": "5.15.0", "accelerate": "1.14.0", "datasets": "4.0.0", "gguf": "0.19.0",
          "reasoning-gym": "0.1.25", "bitsandbytes": "0.50.2", "matplotlib": "3.10.0", "pandas": "2.2.3",
          "numpy": "2.1.3", "pyyaml": "6.0.3", "tqdm": "4.67.3", "filelock": "3.32.3"}

# Where a floor is above Colab's version (constraints-colab.txt), why: the install cell would then upgrade that
# package. None today: every floor is Colab's own version or, for what Colab lacks, the locked one.
ABOVE_COLAB: dict[str, str] = {}


class VersionError(RuntimeError):
    """A package is missing or older than the range this project is tested with."""


def require(package: str, feature: str) -> str:
    """The installed version of `package`; raises VersionError naming `feature` and the one-line fix when it is
    missing or older than its floor."""
    floor = FLOORS[package]
    fix = f"pip install '{package}>={floor}'"
    try:
        have = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise VersionError(f"{feature}: needs {package}, which is not installed. Fix: {fix}") from None
    if Version(have) < Version(floor):
        raise VersionError(f"{feature}: needs {package}>={floor} (the oldest version tested); this environment has "
                           f"{have}. Fix: {fix}, then restart the Python process (Colab: Runtime > Restart session).")
    return have
