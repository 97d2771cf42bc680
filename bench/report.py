"""What every bench script does with its result: print one JSON object, and write it to ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: Path | None = None) -> None:
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
