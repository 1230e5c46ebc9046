"""Progress bars that suit both a terminal and a batch log.

On a terminal the bar redraws as usual. In a file (a Slurm job's output, CI logs) tqdm would
write a new carriage-return segment every update, so there it prints at most every
`LOG_INTERVAL_S` seconds. `SELFREWARD_PROGRESS=0` turns bars off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str, **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    options: dict[str, Any] = {"total": total, "desc": desc, "dynamic_ncols": interactive,
                               "mininterval": 0.1 if interactive else LOG_INTERVAL_S,
                               "disable": os.environ.get("SELFREWARD_PROGRESS", "1") == "0"}
    options.update(kwargs)
    return tqdm(**options)
