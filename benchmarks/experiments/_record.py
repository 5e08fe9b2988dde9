"""What the training experiments share: the command line a result records, and how a result is written
(``<stem>.json`` and ``<stem>.md`` in the results folder, the Markdown printed)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def command(script: str, argv) -> str:
    """The command that reruns ``script`` (a file of benchmarks/experiments/) with these arguments."""
    return f"python benchmarks/experiments/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def write(out: Path, stem: str, record: dict, text: str) -> None:
    """``out/<stem>.json`` (the record) and ``out/<stem>.md`` (``text``); prints the text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)
