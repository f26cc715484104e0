"""Dataset rows of any supported shape -> chat messages and typed :class:`ChatRecord` objects.

Three row shapes are recognised, per row, by which fields are present (names via :class:`FieldMap`):

* ``messages``: a list of ``{"role", "content"}`` dicts (ShareGPT ``{"from", "value"}`` with
  ``human``/``gpt`` is accepted too; a JSON string holding such a list, as in a CSV cell, also);
* ``prompt`` / ``response``;
* ``instruction`` / ``input`` / ``output`` (Alpaca): the user turn is ``instruction`` followed by
  a blank line and ``input`` when ``input`` is not empty.

System prompt: a conversation that already starts with a system message keeps it; otherwise the
row's own system field (``FieldMap.system``) is used, else the global ``system_prompt``, else none.

Example ids: the row's ``id`` field as a string when present, otherwise a content hash, the first
16 hex characters of ``sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False))`` over the
final messages (system turn included), so the same conversation gets the same id in every run and
process. Risk caches key their scores by this id.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_safety.errors import DataError, RiskError

Message = dict[str, str]


@dataclass(frozen=True)
class FieldMap:
    """Names of the fields (columns) that hold each part of a row.

    Args:
        messages: List of chat messages (role/content dicts).
        prompt: User prompt, with ``response`` the assistant answer.
        response: Assistant answer for ``prompt``.
        instruction: Alpaca instruction (user turn).
        input: Alpaca optional input, appended to the instruction after a blank line.
        output: Alpaca answer (assistant turn).
        system: Optional per-row system prompt; ``None`` means rows carry none.
        risk: Optional precomputed risk score in [0, 1].
        is_harmful: Optional ground-truth harmfulness flag.
        id: Optional example id; rows without one get a content hash.
    """

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str | None = None
    risk: str = "risk"
    is_harmful: str = "is_harmful"
    id: str = "id"


@dataclass(frozen=True)
class ChatRecord:
    """One training conversation, normalised, with the per-example fields carried to the batch.

    Attributes:
        messages: Chat messages ``[{"role": ..., "content": ...}]`` with at least one non-empty
            assistant turn.
        id: Explicit id (as a string) or content hash (16 hex characters).
        index: Position of the row in its source (for error messages).
        risk: Precomputed risk score in [0, 1], or ``None``.
        is_harmful: Ground-truth flag, or ``None``.
    """

    messages: list[Message]
    id: str
    index: int
    risk: float | None = None
    is_harmful: bool | None = None


class InvalidRiskError(DataError, RiskError):
    """A risk value in the data is not a finite number in [0, 1] (both a data and a risk error)."""


CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles a chat message may have (what chat templates render)."""
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def content_id(messages: Sequence[Mapping[str, str]]) -> str:
    """Stable id of a conversation: first 16 hex chars of sha256 of its canonical JSON."""
    canonical = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def row_id(prefix: str, text: str) -> str:
    """``<prefix>-<12 hex of sha256(text)>``: a stable id for a generated row (ids key risk caches, so
    they must not depend on order or process)."""
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def describe_row(index: int, row_id: str | None) -> str:
    """``"row 3 (id ab12...)"``: how errors name a row."""
    if row_id is None:
        return f"row {index}"
    shown = row_id if len(row_id) <= 40 else row_id[:37] + "..."
    return f"row {index} (id {shown})"


def _present(row: Mapping[str, Any], key: str | None) -> bool:
    """A field counts as present when it exists and is not None/NaN (CSV gaps arrive as either)."""
    if key is None or key not in row:
        return False
    value = row[key]
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _text(row: Mapping[str, Any], key: str | None) -> str:
    """The field as text, '' when absent; numbers from CSV cells are turned into strings."""
    if not _present(row, key):
        return ""
    value = row[key]  # type: ignore[index]
    if isinstance(value, (Mapping, list, tuple)):  # str() would train on a Python repr of it
        raise DataError(
            f"field '{key}' holds a {type(value).__name__}, not text: store plain text there "
            "(or a list of role/content dicts in the messages field)"
        )
    return value if isinstance(value, str) else str(value)


def explicit_id(row: Mapping[str, Any], fields: FieldMap = FieldMap()) -> str | None:
    """The row's own id (``fields.id``) as a string, or None when it has none (then a content hash is used)."""
    if not _present(row, fields.id):
        return None
    value = row[fields.id]
    # 3.0 from a float column means id 3: keep ids written as integers stable across file types.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _no_response(index: int, row_id: str | None, detail: str) -> DataError:
    return DataError(
        f"{describe_row(index, row_id)} has no response: {detail}; "
        "give every training row an assistant answer or drop it"
    )


def _parse_messages(value: Any, index: int, row_id: str | None, key: str) -> list[Message]:
    """Validate a messages field and normalise it to role/content dicts of strings."""
    where = describe_row(index, row_id)
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: field '{key}' is a string but not JSON; store a list of role/content dicts"
            ) from None
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise DataError(
            f"{where}: field '{key}' is a {type(value).__name__}, not a list; store a list of role/content dicts"
        )
    messages: list[Message] = []
    for position, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise DataError(
                f"{where}: message {position} of field '{key}' is not a dict; use {{'role': ..., 'content': ...}}"
            )
        if "role" in item:
            role, content = item.get("role"), item.get("content")
        elif "from" in item:  # ShareGPT
            role, content = _SHAREGPT_ROLES.get(str(item.get("from")), item.get("from")), item.get("value")
        else:
            raise DataError(
                f"{where}: message {position} of field '{key}' has no 'role'; use {{'role': ..., 'content': ...}}"
            )
        if "content" not in item and "value" not in item:  # null content is a tool call's; no key is a typo
            raise DataError(
                f"{where}: message {position} of field '{key}' has no 'content'; use {{'role': ..., 'content': ...}}"
            )
        if content is None:
            content = ""
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(
                f"{where}: message {position} of field '{key}' needs a string role and string content; "
                "flatten multi-part content to text"
            )
        if role not in CHAT_ROLES:
            raise DataError(
                f"{where}: message {position} of field '{key}' has role {role!r}; use one of {', '.join(CHAT_ROLES)}"
            )
        messages.append({"role": role, "content": content})
    return messages


def row_messages(
    row: Mapping[str, Any],
    fields: FieldMap = FieldMap(),
    *,
    system_prompt: str | None = None,
    index: int = 0,
) -> list[Message]:
    """Chat messages of one row, whatever its shape; raises :class:`DataError` if it has no answer.

    Args:
        row: The raw row (a dict from a file, a hub dataset or a Python list).
        fields: Which fields hold which part.
        system_prompt: System prompt added when the conversation has none of its own.
        index: Position of the row in its source, used in error messages.
    """
    row_id = explicit_id(row, fields)
    if _present(row, fields.messages):
        messages = _parse_messages(row[fields.messages], index, row_id, fields.messages)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise _no_response(index, row_id, f"field '{fields.messages}' has no non-empty assistant turn")
    elif _present(row, fields.prompt):
        answer = _text(row, fields.response)
        if not answer.strip():
            raise _no_response(index, row_id, f"field '{fields.response}' is missing or empty")
        messages = [{"role": "user", "content": _text(row, fields.prompt)}, {"role": "assistant", "content": answer}]
    elif _present(row, fields.instruction):
        answer = _text(row, fields.output)
        if not answer.strip():
            raise _no_response(index, row_id, f"field '{fields.output}' is missing or empty")
        user = _text(row, fields.instruction)
        extra = _text(row, fields.input)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    else:
        found = ", ".join(sorted(map(str, row.keys()))) or "none"
        raise DataError(
            f"{describe_row(index, row_id)} has none of the fields '{fields.messages}', '{fields.prompt}', "
            f"'{fields.instruction}' (found: {found}); map your column names with data.fields "
            "(e.g. fields.prompt: question, fields.response: answer)"
        )
    if messages and messages[0]["role"] == "system":
        return messages
    system = _text(row, fields.system) or system_prompt
    return [{"role": "system", "content": system}, *messages] if system else messages


def parse_risk(value: Any, where: str, key: str = "risk") -> float | None:
    """A risk value as a float in [0, 1]; ``None`` or a blank string means absent, NaN is an error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise InvalidRiskError(f"{where}: field '{key}' is a bool; store a risk score as a number in [0, 1]")
    try:
        risk = float(value)
    except (TypeError, ValueError):
        raise InvalidRiskError(
            f"{where}: field '{key}' is {value!r}, not a number; store a risk score in [0, 1]"
        ) from None
    if not math.isfinite(risk) or not 0.0 <= risk <= 1.0:
        raise InvalidRiskError(
            f"{where}: field '{key}' is {risk}, not a finite number in [0, 1]; "
            "fix or drop the score (NaN is not allowed)"
        )
    return risk


def parse_flag(value: Any, where: str, key: str = "is_harmful") -> bool | None:
    """A harmfulness flag from a bool, 0/1 or a yes/no/true/false string; ``None`` means absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if not text:
            return None
    raise DataError(f"{where}: field '{key}' is {value!r}; store true/false (or 1/0)")


def row_to_record(
    row: Mapping[str, Any],
    index: int,
    fields: FieldMap = FieldMap(),
    *,
    system_prompt: str | None = None,
) -> ChatRecord:
    """Normalise one raw row into a :class:`ChatRecord` (messages, id, risk, is_harmful)."""
    if not isinstance(row, Mapping):
        raise DataError(f"row {index} is a {type(row).__name__}, not a dict; give rows as dicts of fields")
    messages = row_messages(row, fields, system_prompt=system_prompt, index=index)
    row_id = explicit_id(row, fields) or content_id(messages)
    where = describe_row(index, row_id)
    # NaN is an error here, not a blank: file loaders turn blank cells into None, not NaN.
    risk = parse_risk(row.get(fields.risk), where, fields.risk)
    flag = parse_flag(row.get(fields.is_harmful), where, fields.is_harmful)
    return ChatRecord(messages=messages, id=row_id, index=index, risk=risk, is_harmful=flag)


def rows_to_records(
    rows: Sequence[Mapping[str, Any]],
    fields: FieldMap = FieldMap(),
    *,
    system_prompt: str | None = None,
) -> list[ChatRecord]:
    """Normalise every row (see :func:`row_to_record`) and check ids (see :func:`check_ids`)."""
    records = [row_to_record(row, i, fields, system_prompt=system_prompt) for i, row in enumerate(rows)]
    check_ids(records)
    return records


def check_ids(records: Sequence[ChatRecord]) -> None:
    """Refuse one id on two different conversations: a risk cache keyed by id would mix them up.

    The same conversation twice under one id is fine (it gets the same score either way).
    """
    seen: dict[str, ChatRecord] = {}
    for record in records:
        first = seen.setdefault(record.id, record)
        if first is not record and first.messages != record.messages:
            raise DataError(
                f"id '{record.id}' is used by rows {first.index} and {record.index} with different content; "
                "make ids unique (or drop the id field so content hashes are used)"
            )
