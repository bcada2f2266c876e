"""Read the data files and check every record's structure, before any tokenizer or model exists.

All three input formats are normalized to one `Record`: a list of chat messages
(`{"role": "system"|"user"|"assistant", "content": str}`) plus image paths. Downstream code
(tokenization, splits) then has a single shape to deal with, and the checks here are the ones
that need no tokenizer; the length check comes later, in `encode.py`.

Files are read with `datasets`' JSON loader (which handles JSON arrays, JSON Lines, mixed-type
fields such as an `image` that is sometimes a string and sometimes a list, and streaming). It does
not report line numbers, so a record's line is recovered only when a problem must be reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..typed_config import ConfigError
from .config import DataConfig, SourceConfig
from .errors import DataValidationError, Problem, ProblemLog, RecordProblem

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Record:
    """One validated training conversation, whatever file format it came from."""

    id: str
    task: str
    messages: list[dict[str, str]]  # roles alternate user/assistant after an optional system turn
    images: list[str] = field(default_factory=list)  # absolute paths, in placeholder order
    source: str = ""  # file path
    index: int = 0  # 0-based position of the record in its file
    fields: dict[str, str] = field(default_factory=dict)  # message index -> original field name, for errors

    def field_of(self, message_index: int) -> str:
        return self.fields.get(str(message_index), f"messages[{message_index}]")


@dataclass
class LoadedRecords:
    """What `load_records` returns: valid records grouped by task (tasks sorted), and skip counts."""

    by_task: dict[str, list[Record]]
    skipped: dict[str, int]
    problems: ProblemLog
    # every image path checked, with None if it is fine, else the reason (the data cache watches all of them: an
    # image fixed since, or broken since, changes what is valid)
    image_checks: dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.by_task)


def load_records(cfg: DataConfig, *, _defer: bool = False) -> LoadedRecords:
    """Read every source and check every record's structure (no tokenizer needed).

    Raises `DataValidationError` listing all problems (up to `cfg.max_errors`) unless
    `cfg.skip_invalid`, in which case invalid records are dropped and counted per task (logged).
    `_defer` lets `build_multitask_data` merge these problems with the tokenizer-level ones
    into a single report.
    """
    log = ProblemLog(cfg.max_errors)
    lines = _LineIndex()
    image_ok: dict[str, Optional[str]] = {}  # path -> None if readable, else the reason
    by_task: dict[str, list[Record]] = {}
    seen_ids: dict[tuple[str, str], tuple[str, int]] = {}  # (task, id) -> (file, index) where it first occurred
    if not cfg.sources:
        raise ConfigError("data.sources: empty; name at least one data file")
    for src in cfg.sources:
        for index, raw in _read_rows(src, cfg, log):
            try:
                rec = _to_record(raw, src, index, cfg, image_ok, log)
            except RecordProblem as p:
                log.add(_problem(src.path, index, raw.get("id"), p.field, p.message, _task_or_none(raw, src, cfg),
                                 lines))
                continue
            by_task.setdefault(rec.task, []).append(rec)
            key = (rec.task, rec.id)
            if raw.get("id") is not None and key in seen_ids:
                path, i = seen_ids[key]
                log.notice("duplicate record ids within a task (both records are kept)",
                           f"task {rec.task} id={rec.id!r} at {_where(path, i, lines)} and {_where(src.path, index, lines)}",
                           rec.task)
            elif raw.get("id") is not None:
                seen_ids[key] = (src.path, index)
    by_task = {t: by_task.get(t, []) for t in sorted(set(by_task) | set(cfg.tasks))}
    out = LoadedRecords(by_task, {}, log, image_ok)
    if not _defer:
        out.skipped = log.finish(cfg.skip_invalid)
        missing = [t for t in cfg.tasks if not by_task[t]]
        if missing:  # skipping cannot fix a configured task that has no data
            raise DataValidationError(
                [Problem(file="<config>", field=f"tasks.{t}", message="configured task has no valid record", task=t) for t in missing]
            )
        out.by_task = {t: r for t, r in by_task.items() if r}
    return out


def problem_for(rec: Record, field: Optional[str], message: str, lines: Optional["_LineIndex"] = None) -> Problem:
    """A Problem about an already-normalized record (used by the tokenizer-level checks); pass
    one `line_index()` for many calls so each file is scanned once."""
    return _problem(rec.source, rec.index, rec.id, field, message, rec.task, lines or _LineIndex())


def line_index() -> "_LineIndex":
    return _LineIndex()


# ----------------------------------------------------------------------------------------------
# reading


def _read_rows(src: SourceConfig, cfg: DataConfig, log: ProblemLog) -> Iterator[tuple[int, dict]]:
    """Yield (index, row) from one file through `datasets`. Where `datasets` cannot read the file, a JSON
    Lines file is read again line by line so that every bad line becomes its own Problem (with its line
    number and, where it can be read, its task) and every good line still becomes a record; a JSON array
    that does not parse is a file-level problem that `skip_invalid` cannot skip."""
    import datasets

    if not os.path.isfile(src.path):
        log.add(Problem(file=src.path, message="data file not found", task=src.task, fatal=True))
        return
    if os.path.getsize(src.path) == 0:
        log.add(Problem(file=src.path, message="the data file is empty (0 bytes, no record)", task=src.task))
        return
    datasets.disable_progress_bars()
    # datasets logs its own parse failure at ERROR level before raising; the Problem below says it better
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    index = 0
    try:
        ds = datasets.load_dataset("json", data_files=src.path, split="train", streaming=cfg.streaming)
        for row in ds:
            yield index, row
            index += 1
        return
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow parse errors carry no line; find it ourselves
        error = e
    if _is_json_array(src.path):
        yield from _recover_json_array(src, log, error, already=index)
    else:
        yield from _recover_json_lines(src, log, already=index)


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _recover_json_array(src: SourceConfig, log: ProblemLog, err: Exception, already: int):
    with open(src.path, "rb") as f:
        data = f.read()
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as ue:
        line = data[: ue.start].count(b"\n") + 1
        log.add(Problem(file=src.path, line=line, message=f"not valid UTF-8 (byte 0x{data[ue.start]:02x}); the JSON "
                        "array cannot be read, so none of its records can be kept", task=src.task, fatal=True))
        return
    except json.JSONDecodeError as je:
        log.add(Problem(file=src.path, line=je.lineno, message=f"not valid JSON ({je.msg}); the JSON array cannot be "
                        "read, so none of its records can be kept", task=src.task, fatal=True))
        return
    if not isinstance(rows, list):
        log.add(Problem(file=src.path, message=f"the top level is a JSON {type(rows).__name__}, not an array of records",
                        task=src.task, fatal=True))
        return
    for index, row in enumerate(rows):
        if index < already:
            continue
        if not isinstance(row, dict):
            log.add(Problem(file=src.path, record=index + 1, task=src.task,
                            message=f"a record must be a JSON object, got {type(row).__name__}"))
            continue
        yield index, row


_TASK_IN_LINE = re.compile(rb'"task"\s*:\s*"([^"\\]{1,200})"')


def _recover_json_lines(src: SourceConfig, log: ProblemLog, already: int):
    """Every non-blank line of a JSON Lines file: good ones yielded (index = their position among the non-blank
    lines, as `_LineIndex` counts), bad ones logged with their line number and task (when it can be read)."""
    good = 0
    with open(src.path, "rb") as f:
        position = -1
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            position += 1
            match = _TASK_IN_LINE.search(line)
            task = src.task or (match.group(1).decode("utf-8", "replace") if match else None)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as ue:
                log.add(Problem(file=src.path, line=number, task=task,
                                message=f"not valid UTF-8 (byte 0x{line[ue.start]:02x} at column {ue.start + 1})"))
                continue
            try:
                row = json.loads(text.strip())
            except json.JSONDecodeError as je:
                log.add(Problem(file=src.path, line=number, task=task, message=f"not valid JSON ({je.msg}, column "
                                f"{je.colno}){' - a truncated line?' if not text.rstrip().endswith('}') else ''}"))
                continue
            if not isinstance(row, dict):
                log.add(Problem(file=src.path, line=number, task=task,
                                message=f"a record must be a JSON object, got {type(row).__name__}"))
                continue
            good += 1
            if good > already:  # rows `datasets` yielded before it failed are not yielded twice
                yield position, row
    if position < 0:
        log.add(Problem(file=src.path, message="the data file holds no record (only blank lines)", task=src.task))


class _LineIndex:
    """Maps a record index to its line in a JSONL file, read lazily and only for error reports
    (the JSON loader skips blank lines, so index + 1 is not always the line)."""

    def __init__(self):
        self._cache: dict[str, Optional[list[int]]] = {}

    def line(self, path: str, index: int) -> Optional[int]:
        if path not in self._cache:
            self._cache[path] = None
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    first = f.read(1)
                    while first.isspace():
                        first = f.read(1)
                    if first != "[":  # JSON Lines
                        f.seek(0)
                        self._cache[path] = [n for n, l in enumerate(f, 1) if l.strip()]
            except OSError:
                pass
        lines = self._cache[path]
        return lines[index] if lines is not None and index < len(lines) else None


def _where(path: str, index: int, lines: "_LineIndex") -> str:
    line = lines.line(path, index)
    return f"{path}:{line}" if line is not None else f"{path} record {index + 1}"


def _problem(path, index, record_id, field, message, task, lines: _LineIndex) -> Problem:
    line = lines.line(path, index)
    return Problem(
        file=path,
        line=line,
        record=None if line is not None else index + 1,
        record_id=None if record_id is None else str(record_id),
        field=field,
        message=message,
        task=task,
    )


# ----------------------------------------------------------------------------------------------
# normalization and structural checks


def _to_record(raw: dict, src: SourceConfig, index: int, cfg: DataConfig, image_ok: dict, log: ProblemLog) -> Record:
    task = _task_of(raw, src, cfg)
    fmt = src.format if src.format != "auto" else _detect_format(raw)
    if fmt == "llava":
        messages, fields = _llava_messages(raw)
        dropped = _drop_leading_answers(messages, fields)
        if not messages or all(m["role"] == "system" for m in messages):
            raise RecordProblem("conversations", "no human turn: nothing trainable is left once the leading gpt "
                                                 "turns are dropped")
        if dropped:
            log.notice("leading gpt turns dropped, as LLaVA's preprocessing does",
                       f"{src.path} id={raw.get('id')!r}: {dropped} turn(s)", task)
    elif fmt == "chat":
        messages, fields = _chat_messages(raw)
    else:
        messages, fields = _prompt_response_messages(raw)
    _check_turn_order(messages, fields)
    images = _images_of(raw, src, cfg, image_ok, log) if fmt == "llava" else []
    _check_placeholders(messages, fields, images, fmt)
    rid = raw.get("id")
    rid = str(rid) if rid is not None else f"{os.path.basename(src.path)}#{index + 1}"
    return Record(rid, task, messages, images, src.path, index, fields)


def _task_of(raw: dict, src: SourceConfig, cfg: DataConfig) -> str:
    if src.task is not None:
        task, where = src.task, "sources.task"
    elif raw.get("task") is None and src.task_from is not None:
        task, where = _task_by_rule(raw, src), "sources.task_from"
    else:
        task, where = raw.get("task"), "task"
        if task is None:
            raise RecordProblem("task", "missing task (give it in the record, or in the source's `task` or "
                                        "`task_from` rule)")
        if not isinstance(task, str) or not task.strip():
            raise RecordProblem("task", f"task must be a non-empty string, got {task!r}")
    if cfg.tasks and task not in cfg.tasks:
        raise RecordProblem(where, f"unknown task {task!r}; data.tasks lists: {', '.join(sorted(cfg.tasks))}")
    return task


def _task_or_none(raw: dict, src: SourceConfig, cfg: DataConfig) -> Optional[str]:
    """The task of an invalid record for the per-task skip counts, if it can be told at all."""
    try:
        return _task_of(raw, src, cfg)
    except RecordProblem:
        return raw.get("task") if isinstance(raw.get("task"), str) else None


def _task_by_rule(raw: dict, src: SourceConfig) -> str:
    """The task a source's `task_from` rule gives a record (see SourceConfig)."""
    if src.task_from == "image_folder":
        image = raw.get("image")
        first = image[0] if isinstance(image, list) and image else image
        if not first:
            name = src.text_task
        elif not isinstance(first, str):
            raise RecordProblem("image", f"must be a path or a list of paths, got {image!r}")
        else:
            parts = first.replace("\\", "/").lstrip("/").split("/")
            name = parts[0] if len(parts) > 1 else "images"  # an image at the top of the image folder
    else:
        key = src.task_from[len("field:"):]
        name = raw.get(key)
        if not isinstance(name, (str, int)) or isinstance(name, bool) or str(name) == "":
            raise RecordProblem(key, f"task_from field {key!r} is missing or not a name ({name!r})")
        name = str(name)
    return src.task_map.get(name, name)


def _detect_format(raw: dict) -> str:
    if raw.get("conversations") is not None:
        return "llava"
    if raw.get("messages") is not None:
        return "chat"
    if raw.get("prompt") is not None or raw.get("response") is not None:
        return "prompt_response"
    raise RecordProblem(
        "conversations", "cannot tell the format: the record has none of 'conversations', 'messages', 'prompt'/'response'"
    )


def _turns(raw: dict, list_key: str, role_key: str, text_key: str, roles: dict[str, str], what: str):
    """Messages [{role, content}] and, per message index, the record field holding its text."""
    turns = raw.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise RecordProblem(list_key, f"missing or empty (expected a list of {{{role_key}, {text_key}}} {what}s)")
    messages, fields = [], {}
    for i, turn in enumerate(turns):
        f = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(f, f"a {what} must be an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise RecordProblem(f"{f}.{role_key}", f"unknown role {role!r}; expected one of {sorted(roles)}")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise RecordProblem(f"{f}.{text_key}", f"missing or not a string ({text!r})")
        messages.append({"role": roles[role], "content": text})
        fields[str(i)] = f"{f}.{text_key}"
    return messages, fields


def _llava_messages(raw: dict):
    return _turns(raw, "conversations", "from", "value", LLAVA_ROLES, "turn")


def _drop_leading_answers(messages: list[dict], fields: dict) -> int:
    """Drop the assistant turns before the first user turn (after an optional system turn), in place, keeping each
    remaining message's field name (conversations[i]) for error messages. Returns how many were dropped."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    n = 0
    while start + n < len(messages) and messages[start + n]["role"] == "assistant":
        n += 1
    if n:
        names = [fields[str(i)] for i in range(len(messages))]
        del messages[start:start + n], names[start:start + n]
        fields.clear()
        fields.update({str(i): name for i, name in enumerate(names)})
    return n


def _chat_messages(raw: dict):
    return _turns(raw, "messages", "role", "content", CHAT_ROLES, "message")


def _prompt_response_messages(raw: dict):
    prompt, response = raw.get("prompt"), raw.get("response")
    if not isinstance(prompt, str):
        raise RecordProblem("prompt", f"missing or not a string ({prompt!r})")
    if response is None:
        raise RecordProblem("response", "missing assistant turn (no response)")
    if not isinstance(response, str):
        raise RecordProblem("response", f"not a string ({response!r})")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return messages, {"0": "prompt", "1": "response"}


def _check_turn_order(messages: list[dict], fields: dict) -> None:
    """Optional system turn, then user/assistant alternating, ending with a non-empty assistant
    turn: what chat templates and the label masking both assume."""
    start = 1 if messages[0]["role"] == "system" else 0
    body = messages[start:]
    if not any(m["role"] == "assistant" for m in body):
        raise RecordProblem(fields.get(str(len(messages) - 1), "messages"), "missing assistant turn")
    for j, m in enumerate(body):
        i = start + j
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            article = "an" if want == "assistant" else "a"
            raise RecordProblem(fields[str(i)], f"expected {article} {want} turn here, got {m['role']} (turns must alternate)")
        if want == "assistant" and not m["content"].strip():
            raise RecordProblem(fields[str(i)], "empty assistant turn")
    if body[-1]["role"] != "assistant":
        raise RecordProblem(fields[str(len(messages) - 1)], "missing assistant turn after the last user turn")


def _images_of(raw: dict, src: SourceConfig, cfg: DataConfig, image_ok: dict, log: ProblemLog) -> list[str]:
    img = raw.get("image")
    if img is None:
        return []
    names = [img] if isinstance(img, str) else img
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise RecordProblem("image", f"must be a path or a list of paths, got {img!r}")
    folder = os.path.abspath(cfg.image_folder or os.path.dirname(os.path.abspath(src.path)))
    paths = []
    for k, name in enumerate(names):
        f = "image" if isinstance(img, str) else f"image[{k}]"
        path = name if os.path.isabs(name) else os.path.normpath(os.path.join(folder, name))
        if not os.path.isabs(name) and os.path.commonpath([folder, path]) != folder:
            log.notice("image paths that lead out of the image folder (.. in a relative path)",
                       f"{src.path} id={raw.get('id')!r}: {name} -> {path}", _task_or_none(raw, src, cfg))
        if path not in image_ok:
            image_ok[path] = image_problem(path)
        if image_ok[path]:
            raise RecordProblem(f, f"{image_ok[path]}: {path}")
        paths.append(path)
    return paths


# the bytes a complete file of these formats ends with (a truncated download or copy lacks them)
_END_MARKERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b";",)}


def image_problem(path: str) -> Optional[str]:
    """None if the image file is complete and readable, else the reason. Cheap: the header (format, size) and,
    for JPEG/PNG/GIF, the end-of-image marker that a truncated file lacks; PIL's verify() reads the rest of the
    structure (PNG chunk checksums) without decoding pixels."""
    if not os.path.isfile(path):
        return "image file not found"
    try:
        from PIL import Image

        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for broken files
        return f"image unreadable ({type(e).__name__}: {e})"
    if width < 1 or height < 1:
        return f"image has size {width}x{height}"
    markers = _END_MARKERS.get(fmt)
    if markers:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            tail = f.read().rstrip(b"\x00\r\n ")
        if not tail.endswith(markers):
            return f"image truncated (the {fmt} file does not end with its end-of-image marker)"
    return None


def _check_placeholders(messages: list[dict], fields: dict, images: list[str], fmt: str) -> None:
    counts = [m["content"].count(IMAGE_PLACEHOLDER) for m in messages]
    for i, (m, c) in enumerate(zip(messages, counts)):
        if c and m["role"] != "user":
            raise RecordProblem(fields[str(i)], f"{IMAGE_PLACEHOLDER} placeholder outside a user turn")
    if sum(counts) != len(images):
        where = next((fields[str(i)] for i, c in enumerate(counts) if c), "image" if fmt == "llava" else fields["0"])
        raise RecordProblem(
            where,
            f"{sum(counts)} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
            + ("" if fmt == "llava" else " (only the llava format carries images)"),
        )
