"""Hugging Face Hub access that never hangs: honour offline mode, probe with a short timeout.

Real users load models and datasets from the Hub; offline machines must fail fast with a
message that says what to do instead. Every loader calls `require_hub` before a download.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

HUB_TIMEOUT_S = float(os.environ.get("POCKET_HUB_TIMEOUT", "4"))


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub is needed but offline mode is on or it cannot be reached."""


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str, timeout: float) -> bool:
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `timeout` seconds (cached per process)."""
    return not hub_offline() and _reachable(hub_endpoint(), timeout)


def require_hub(what: str, fix: str) -> None:
    """Raise HubUnavailableError naming `what` needed the Hub and `fix`, unless the Hub is usable."""
    if hub_offline():
        raise HubUnavailableError(f"{what} needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE or a "
                                  f"sibling is set) and it is not in the local cache. {fix}")
    if not hub_reachable():
        raise HubUnavailableError(f"{what} needs the Hugging Face Hub, but {hub_endpoint()} did not answer within "
                                  f"{HUB_TIMEOUT_S:g} s. {fix}")
