"""Progress bars for every long loop: `tqdm.auto` (a widget in Jupyter, a bar in a terminal), or, in a notebook run
headless (papermill), a plain text line every few seconds that papermill streams to the terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm as _text_bar
from tqdm.auto import tqdm as _auto_bar

_STYLE = {"text": False, "interval": 10.0}


def text_bars(on: bool = True, interval: float = 10.0) -> None:
    """Plain-text bars (refreshed at most every `interval` seconds) instead of widgets: for headless notebooks,
    whose widgets nobody sees."""
    _STYLE.update(text=on, interval=interval)


def tqdm(*args, **kwargs):
    """A progress bar in the current style (same arguments as `tqdm.tqdm`)."""
    if _STYLE["text"]:
        return _text_bar(*args, **{"mininterval": _STYLE["interval"], "file": sys.stderr, "ascii": True, **kwargs})
    notebook = sys.modules.get("tqdm.notebook")
    if notebook is not None and _auto_bar is notebook.tqdm and notebook.IProgress is None:
        text_bars(True)  # a kernel whose ipywidgets tqdm cannot use ("IProgress not found"): text lines instead
        return tqdm(*args, **kwargs)
    return _auto_bar(*args, **kwargs)


tqdm.write = _auto_bar.write
