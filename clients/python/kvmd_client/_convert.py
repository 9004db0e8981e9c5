"""Conversions between kvmd protobuf messages and plain Python dicts.

Two directions, both driven by the message descriptors so they follow the proto as it grows:

- :func:`message_to_dict`: a JSON-friendly dict (integers stay integers, bytes become hex
  strings, enums their names, unset ``optional`` scalars ``None``), for ``kvmctl --json``.
- :func:`merge_into`: apply a (possibly nested, possibly partial) mapping of field values onto a
  message in place, for partial updates such as ``set_regs(vm, 0, rip=0x1000)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

__all__ = ["coerce", "merge_into", "message_to_dict", "unflatten"]


def _is_repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)  # protobuf < 5.29


def _is_map(field: Any) -> bool:
    return (
        _is_repeated(field)
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def _is_synthetic_optional(field: Any) -> bool:
    """True for a proto3 ``optional`` scalar (its own one-field synthetic oneof)."""
    oneof = field.containing_oneof
    return (
        oneof is not None
        and len(oneof.fields) == 1
        and oneof.name == f"_{field.name}"
        and field.message_type is None
    )


def _scalar_to_json(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes(value).hex()
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else int(value)
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    """Convert ``message`` into a JSON-serializable dict keyed by proto field names.

    Every field is present (proto3 defaults included), except members of a real ``oneof`` that
    are not set; unset ``optional`` scalars are ``None``. Integers (including 64-bit ones) stay
    integers; bytes become lowercase hex strings; enums become their value names.
    """
    out: dict[str, Any] = {}
    fields: Any = message.DESCRIPTOR.fields
    for field in fields:
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                out[field.name] = {k: message_to_dict(v) for k, v in value.items()}
            else:
                out[field.name] = {k: _scalar_to_json(value_field, v) for k, v in value.items()}
        elif _is_repeated(field):
            if field.message_type is not None:
                out[field.name] = [message_to_dict(v) for v in value]
            else:
                out[field.name] = [_scalar_to_json(field, v) for v in value]
        elif field.containing_oneof is not None and not message.HasField(field.name):
            if _is_synthetic_optional(field):
                out[field.name] = None
            # members of a real oneof that are not set are left out
        elif field.message_type is not None:
            out[field.name] = message_to_dict(value)
        else:
            out[field.name] = _scalar_to_json(field, value)
    return out


def _coerce_scalar(message: Message, field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM and isinstance(value, str):
        wanted = value.strip().upper().replace("-", "_")
        enum_value = field.enum_type.values_by_name.get(wanted)
        if enum_value is None:
            choices = ", ".join(field.enum_type.values_by_name)
            raise ValueError(
                f"{message.DESCRIPTOR.name}.{field.name}: unknown value {value!r} "
                f"(choose from {choices})"
            )
        return enum_value.number
    if field.type == FieldDescriptor.TYPE_BYTES:
        if isinstance(value, str):
            return bytes.fromhex(value)
        return bytes(value)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool(value)
    if field.cpp_type in (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    ):
        if isinstance(value, str):
            return int(value, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"{message.DESCRIPTOR.name}.{field.name} takes an integer, "
                f"not {type(value).__name__}"
            )
    return value


def merge_into(message: M, updates: Mapping[str, Any]) -> M:
    """Apply ``updates`` onto ``message`` in place and return it.

    Keys are field names. A nested message field takes a mapping (merged recursively), a
    message of its type (copied), or None (cleared). Repeated and map fields are replaced as a
    whole. Enums take their value name (case-insensitive) or number; bytes take bytes or a hex
    string; integers take ints or strings in any base Python's ``int(s, 0)`` accepts.

    Raises:
        ValueError: a key names no field of the message, or an enum name is unknown.
        TypeError: a value has the wrong type for its field.
    """
    fields: Any = message.DESCRIPTOR.fields_by_name
    for key, value in updates.items():
        field = fields.get(key)
        if field is None:
            known = ", ".join(fields)
            raise ValueError(f"{message.DESCRIPTOR.name} has no field {key!r} (fields: {known})")
        if _is_map(field):
            container: Any = getattr(message, key)
            container.clear()
            value_field = field.message_type.fields_by_name["value"]
            for k, v in dict(value or {}).items():
                if value_field.message_type is None:
                    container[k] = _coerce_scalar(message, value_field, v)
                elif isinstance(v, Message):
                    container[k].CopyFrom(v)
                else:
                    merge_into(container[k], v)
        elif _is_repeated(field):
            container = getattr(message, key)
            del container[:]
            for item in _iterable(value):
                if field.message_type is not None:
                    element = container.add()
                    if isinstance(item, Message):
                        element.CopyFrom(item)
                    else:
                        merge_into(element, item)
                else:
                    container.append(_coerce_scalar(message, field, item))
        elif field.message_type is not None:
            if value is None:
                message.ClearField(key)
            elif isinstance(value, Message):
                getattr(message, key).CopyFrom(value)
            elif isinstance(value, Mapping):
                sub = getattr(message, key)
                merge_into(sub, value)
                if not value:
                    sub.SetInParent()
            else:
                raise TypeError(
                    f"{message.DESCRIPTOR.name}.{key} takes a mapping or a "
                    f"{field.message_type.name}, not {type(value).__name__}"
                )
        elif value is None:
            message.ClearField(key)
        else:
            setattr(message, key, _coerce_scalar(message, field, value))
    return message


def _iterable(value: Any) -> Iterable[Any]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError(f"expected a sequence, not {type(value).__name__}")
    return list(value)


def coerce(cls: type[M], value: M | Mapping[str, Any] | None, **fields: Any) -> M:
    """Build a ``cls`` message from a message, a mapping or nothing, then apply ``fields``."""
    message = cls()
    if isinstance(value, Message):
        if not isinstance(value, cls):
            raise TypeError(f"expected {cls.__name__}, not {type(value).__name__}")
        message.CopyFrom(value)
    elif value is not None:
        merge_into(message, value)
    if fields:
        merge_into(message, fields)
    return message


def unflatten(assignments: Mapping[str, Any]) -> dict[str, Any]:
    """Turn dotted keys into nested dicts: ``{"cs.base": 0}`` -> ``{"cs": {"base": 0}}``."""
    out: dict[str, Any] = {}
    for key, value in assignments.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key!r}: {part!r} is both a value and a message")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"{key!r}: is a message, assign its fields ({key}.FIELD=...)")
        node[parts[-1]] = value
    return out
