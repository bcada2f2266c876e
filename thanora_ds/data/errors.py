"""Validation problems and the one exception that reports them.

Data problems are collected, not raised one at a time: a user fixing a 50k-record file wants every
bad record listed in one run, each with the file, the line (JSONL) or record number (JSON array),
the record id when it has one, and the field at fault. `ProblemLog` is the collector; it keeps the
first `max_errors` problems in full and only counts the rest, so a completely wrong file cannot
flood memory or the terminal.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger("thanora_ds.data")

NO_TASK = "<no task>"  # bucket for skipped records whose task could not be read


@dataclass(frozen=True)
class Problem:
    """One invalid record (or file).

    `line` is the 1-based line in a JSONL file; `record` the 1-based record number (for JSON
    arrays, where lines mean nothing). `field` uses a JSONPath-like spelling,
    e.g. ``conversations[3].value``.
    """

    file: str
    message: str
    field: Optional[str] = None
    line: Optional[int] = None
    record: Optional[int] = None
    record_id: Optional[str] = None
    task: Optional[str] = None
    # a problem of a whole file whose records cannot be counted (not found, an unreadable JSON array):
    # skipping it would drop an unknown number of records, so `skip_invalid` does not skip it
    fatal: bool = False

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        elif self.record is not None:
            where += f" record {self.record}"
        if self.record_id is not None:
            where += f" (id={self.record_id!r})"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"


class DataValidationError(ValueError):
    """Raised before any model is loaded when the data has problems.

    `problems` holds the first `max_errors` problems; `total` counts all of them.
    """

    def __init__(self, problems: list[Problem], total: Optional[int] = None, hint: str = ""):
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        lines = [f"{self.total} problem(s) in the training data:"]
        lines += [f"  - {p}" for p in self.problems]
        if self.total > len(self.problems):
            lines.append(f"  ... and {self.total - len(self.problems)} more (raise data.max_errors to list them)")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class RecordProblem(Exception):
    """Raised inside per-record checks; the caller adds file/line/id and files it as a Problem."""

    def __init__(self, field: Optional[str], message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass
class ProblemLog:
    """Collects problems up to a cap and counts them per task; also collects notices (oddities that are not
    errors, e.g. duplicate ids) that are logged as warnings, counted, with a few examples each."""

    max_errors: int = 50
    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    per_task: Counter = field(default_factory=Counter)
    fatal: list[Problem] = field(default_factory=list)
    notices: dict[str, list[str]] = field(default_factory=dict)
    notice_counts: Counter = field(default_factory=Counter)
    notice_tasks: dict[str, Counter] = field(default_factory=dict)

    def add(self, problem: Problem) -> None:
        self.total += 1
        self.per_task[problem.task or NO_TASK] += 1
        if problem.fatal:
            self.fatal.append(problem)
        if len(self.problems) < self.max_errors:
            self.problems.append(problem)

    def notice(self, kind: str, example: str, task: Optional[str] = None) -> None:
        self.notice_counts[kind] += 1
        self.notice_tasks.setdefault(kind, Counter())[task or NO_TASK] += 1
        examples = self.notices.setdefault(kind, [])
        if len(examples) < 3:
            examples.append(example)

    def __bool__(self) -> bool:
        return self.total > 0

    def finish(self, skip_invalid: bool) -> dict[str, int]:
        """Raise (default) or log the per-task skip counts (skip_invalid); never stay silent. A file-level problem
        whose records cannot be counted raises even with skip_invalid."""
        for kind, examples in self.notices.items():
            per_task = ", ".join(f"{t}={n}" for t, n in sorted(self.notice_tasks[kind].items()))
            logger.warning("%s: %d; per task: %s (e.g. %s)", kind, self.notice_counts[kind], per_task,
                           "; ".join(examples))
        if not self.total:
            return {}
        if self.fatal:
            raise DataValidationError(
                self.fatal, len(self.fatal),
                hint="data.skip_invalid cannot skip these: the records of such a file cannot be counted; fix the file.")
        if not skip_invalid:
            raise DataValidationError(
                self.problems, self.total, hint="Fix the records, or set data.skip_invalid: true to skip them."
            )
        counts = dict(sorted(self.per_task.items()))
        logger.warning(
            "skip_invalid: skipped %d invalid record(s) or line(s); per task: %s",
            self.total,
            ", ".join(f"{t}={n}" for t, n in counts.items()),
        )
        for p in self.problems:
            logger.warning("  skipped: %s", p)
        if self.total > len(self.problems):
            logger.warning("  ... and %d more", self.total - len(self.problems))
        return counts
