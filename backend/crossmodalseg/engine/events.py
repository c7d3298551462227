"""Progress events: JSON lines for machines (file and, on request, stdout) and a progress bar for people."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class EventLog:
    def __init__(self, path: Path | None = None, json_stdout: bool = False, progress_bar: bool = True,
                 enabled: bool = True):
        self.path, self.json_stdout, self.enabled = path, json_stdout, enabled
        self.bar: tqdm | None = None
        self.use_bar = progress_bar and enabled and not json_stdout
        self.start = time.time()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if not self.enabled:
            return record
        line = json.dumps(record, default=_jsonable)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        if self.json_stdout:
            print(line, flush=True)
        if self.use_bar:
            self._render(record)
        return record

    def _render(self, record: dict[str, Any]) -> None:
        if record["event"] == "start":
            done = record.get("resumed_from") or 0
            self.bar = tqdm(total=record.get("epochs"), desc="training", unit="epoch", file=sys.stderr,
                            dynamic_ncols=True, initial=done)
        elif record["event"] == "epoch" and self.bar is not None:
            self.bar.total = record["of"]
            self.bar.update(record["epoch"] - self.bar.n)
            post = {"loss": f"{record.get('loss', float('nan')):.3f}"}
            if record.get("val_dice"):
                post["dice"] = f"{record['val_dice'].get('mean', float('nan')):.3f}"
            self.bar.set_postfix(post)
        elif record["event"] in ("done", "stopped") and self.bar is not None:
            self.bar.close()
            self.bar = None
        elif record["event"] in ("log", "warning"):
            msg = record.get("message", "")
            (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr))(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_events(path: Path) -> list[dict[str, Any]]:
    """Events of a run; a torn last line (crash while writing) is skipped."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
