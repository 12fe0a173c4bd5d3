"""A retrieval run's journal: every trial appended to OUT/trials.jsonl the moment it is judged, so
an hour-long run that is stopped keeps what it measured and `--resume` goes on from there.

The first line holds the settings that decide the cases and the answers (model, tasks, lengths,
depths, trials, seed, strategies and their rules); a run that ended writes a last line
{"done": true}. An unfinished journal is never overwritten: without --resume the CLI stops and
says so, and --resume with other settings names the settings that differ.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from camelot.cli import UserError

NAME = "trials.jsonl"
# what does not change a case or its answer: where results go and how the run is shown or threaded
IGNORED = {"out", "no_progress", "threads", "resume", "report", "func"}


def run_settings(args: dict) -> dict:
    """The settings a journal must match to be continued (JSON-safe: values as repr where needed)."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
            for k, v in sorted(args.items()) if k not in IGNORED}


def read_journal(path: Path, settings: dict | None) -> tuple[list[dict], bool]:
    """(trials, finished) of a journal, read only (a run may still be appending to it); with
    `settings`, a journal written with other settings is refused, naming those that differ."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line may be cut short by a kill
                raise UserError(f"{path}: line {i + 1} is not JSON; move the file away to start over") from None
    if not rows or "settings" not in rows[0]:
        raise UserError(f"{path} is not a retrieval journal; move it away or choose another --out")
    if settings is not None:
        differ = sorted(k for k in set(settings) | set(rows[0]["settings"])
                        if settings.get(k) != rows[0]["settings"].get(k))
        if differ:
            raise UserError(f"{path} was written with other settings ({', '.join(differ)} differ); "
                            "run with those settings or choose another --out")
    return [r for r in rows[1:] if "run" in r], any(r.get("done") for r in rows[1:])


class Journal:
    """Appends trials per run label; `done(label)` gives the trials an earlier, stopped run kept."""

    def __init__(self, out: Path, settings: dict, resume: bool):
        self.path = Path(out) / NAME
        self._done: dict[str, list[dict]] = {}
        kept = self._read(settings, resume)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # rewritten whole so that a partial last line of a killed run is dropped
        with self.path.open("w") as f:
            f.write(json.dumps({"settings": settings}) + "\n")
            for line in kept:
                f.write(json.dumps(line) + "\n")

    def _read(self, settings: dict, resume: bool) -> list[dict]:
        if not self.path.exists():
            return []
        trials, finished = read_journal(self.path, settings if resume else None)
        if not resume:
            if finished or not trials:
                return []
            raise UserError(f"{self.path} holds {len(trials)} trials of a run that did not finish: add --resume to "
                            "go on from there, or choose another --out (or delete the file) to start over")
        for r in trials:
            self._done.setdefault(r["run"], []).append(r)
        return trials

    def done(self, label: str) -> list[dict]:
        return self._done.get(label, [])

    def add(self, label: str, trial) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"run": label, **asdict(trial)}) + "\n")
            f.flush()

    def finish(self) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"done": True}) + "\n")
