"""Where a benchmark's figures go besides the terminal: `$OUT/<name>` as JSON, when the device run sets OUT (its
files come back to the machine that asked for the run)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(name: str, data) -> Path | None:
    """Write `data` to $OUT/name (indented JSON; values JSON lacks, such as dtypes, as their str) and say so."""
    if not os.environ.get("OUT"):
        return None
    path = Path(os.environ["OUT"]) / name
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}")
    return path
