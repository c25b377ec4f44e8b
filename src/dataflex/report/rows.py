"""The rows of a run's training set, read back from its local dataset files for the reports.

A run's row ``start + i`` of a source dataset is row ``i`` of that dataset's file (the manifest's
``data_sources.parts``); only local json/jsonl files can be read back. Row text is untrusted: the
HTML cells here are escaped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .svg import esc

TEXT_CHARS = 160  # characters of a row's text shown in a table


def source_of(index: int, parts: list[list[Any]] | None) -> str:
    for name, start, end in parts or []:
        if start <= index < end:
            return name
    return "?"


def _read_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def dataset_info(sources: dict[str, Any]) -> dict[str, Any]:
    """The ``dataset_info.json`` a run's datasets were registered in (ConfigError if unreadable)."""
    info_path = Path(sources["dataset_dir"]) / "dataset_info.json"
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{info_path} is not readable") from None


def source_rows(sources: dict[str, Any], src: str, attrs: dict[str, Any]) -> list[Any]:
    """The rows of one source dataset, in file order: a run's index ``start + i`` is row ``i``.

    Only local json/jsonl files can be read back (hub datasets may have changed since the run).
    """
    file_name = attrs.get("file_name")
    if not file_name or any(k in attrs for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")):
        raise ConfigError(f"dataset '{src}': only local json/jsonl files can be read back")
    path = Path(sources["dataset_dir"]) / file_name
    try:
        return _read_rows(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"dataset '{src}': {path} is not readable ({err})") from None


class Rows:
    """Row text and columns of a run's training set, read back from its local dataset files.

    ``reason`` says why rows cannot be shown (then only indices are).
    """

    def __init__(self, run: dict[str, Any]):
        self.parts = ((run.get("data_sources") or {}).get("parts")) or []
        self.reason: str | None = None
        self._rows: dict[str, tuple[dict[str, Any], list[Any]]] = {}
        sources = run.get("data_sources")
        if not sources or not self.parts:
            self.reason = "the run did not record which dataset each row came from"
            return
        try:
            info = dataset_info(sources)
            for name, start, end in self.parts:
                attrs = dict(info.get(name) or {})
                rows = source_rows(sources, name, attrs)
                if len(rows) < end - start:
                    raise ConfigError(f"dataset '{name}' has {len(rows)} rows now, the run had {end - start}")
                self._rows[name] = (attrs, rows)
        except ConfigError as err:
            self.reason = str(err)
            self._rows = {}

    @property
    def ok(self) -> bool:
        return self.reason is None

    def row(self, index: int) -> tuple[dict[str, Any], Any] | None:
        for name, start, end in self.parts:
            if start <= index < end and name in self._rows:
                attrs, rows = self._rows[name]
                return attrs, rows[index - start]
        return None

    def columns(self) -> set[str]:
        cols: set[str] = set()
        for _, rows in self._rows.values():
            for r in rows[:200]:
                if isinstance(r, dict):
                    cols.update(r)
        return cols

    def value(self, index: int, column: str) -> str:
        found = self.row(index)
        if found is None or not isinstance(found[1], dict):
            return "?"
        value = found[1].get(column)
        return "(none)" if value is None else str(value)

    def text(self, index: int) -> tuple[str, str]:
        """``(prompt, response)`` of a row, each cut to TEXT_CHARS."""
        found = self.row(index)
        if found is None:
            return "", ""
        attrs, row = found
        prompt, response = row_text(row, attrs)
        return _cut(prompt), _cut(response)


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


def row_text(row: Any, attrs: dict[str, Any]) -> tuple[str, str]:
    """The instruction and response of a raw dataset row, using its dataset_info column mapping."""
    if not isinstance(row, dict):
        return str(row), ""
    cols = attrs.get("columns") or {}
    if attrs.get("formatting") == "sharegpt":
        tags = attrs.get("tags") or {}
        messages = row.get(cols.get("messages", "conversations")) or []
        role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        user = {tags.get("user_tag", "human"), "user", "human"}
        prompt = response = ""
        for msg in messages if isinstance(messages, list) else []:
            if not isinstance(msg, dict):
                continue
            if not prompt and msg.get(role) in user:
                prompt = str(msg.get(content, ""))
            elif prompt and not response:
                response = str(msg.get(content, ""))
        return prompt, response
    prompt = str(row.get(cols.get("prompt", "instruction")) or "")
    query = row.get(cols.get("query", "input"))
    if query:
        prompt = f"{prompt}\n{query}" if prompt else str(query)
    response = row.get(cols.get("response", "output"))
    if isinstance(response, list):
        response = response[0] if response else ""
    return prompt, "" if response is None else str(response)


def text_cells(rows: Rows, i: int) -> list[str]:
    if not rows.ok:
        return ['<span class="muted">-</span>', '<span class="muted">-</span>']
    prompt, response = rows.text(i)
    return [f'<span class="text">{esc(prompt)}</span>', f'<span class="text">{esc(response)}</span>']
