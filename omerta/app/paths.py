"""
Where a node keeps its state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """
    The data directory used when no C{--data-dir} is given:

     1. C{$OMERTA_DATA_DIR} when set (and not empty);
     2. C{$XDG_DATA_HOME/omerta} when C{XDG_DATA_HOME} is an absolute path
        (the XDG spec says to ignore a relative one);
     3. C{~/.local/share/omerta}.
    """
    if environ is None:
        environ = os.environ
    explicit = environ.get("OMERTA_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "omerta"
    home = environ.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".local" / "share" / "omerta"
