"""The shared frame of the ``python -m training.<tool>`` report tools: JSON out, user errors as exit code 2."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import UserInputError
from training.data.loaders import read_json

log = logging.getLogger(__name__)


def run_report_tool(build: Callable[[], dict[str, Any]], out: Path | None) -> int:
    """Build the report, print it as JSON (and write it to ``out``); a user-input error is logged, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build()
    except UserInputError as exc:
        log.error("%s", exc)
        return 2
    text = json.dumps(report, indent=1)
    if out:
        out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


def read_captions(path: Path) -> dict[int, str]:
    """A captions file in the COCO results format (``[{"image_id", "caption"}]``) as image id -> caption."""
    rows = read_json(path, "captions file")
    try:
        return {int(row["image_id"]): str(row["caption"]) for row in rows}
    except (TypeError, KeyError, ValueError) as exc:
        raise UserInputError(f"{path} is not a COCO results file ([{{image_id, caption}}]): {exc}") from exc
