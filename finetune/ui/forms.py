"""Forms keyed by config field names: one component per dotted key (`model.source`, `max_steps`), its label and info
from the field, and values turned back into the config by `TrainConfig.from_dict` (its coercion and checks).

    form = {"max_steps": gr.Number(...), **more_settings(defaults, placed=form)}   # every other field, generated
    cfg = form_config(values_by_key, base=defaults)

So a field added to a config dataclass reaches the run's config from the UI with no other edit.
"""

from __future__ import annotations

import dataclasses
import typing

import gradio as gr

from finetune.config import TrainConfig, choices_of, set_dotted

# Not offered in the browser: remote code runs on the server, and a push would use the host's HF_TOKEN; the data
# split settings belong to the Data tab ("Use for training" hands them over).
NOT_IN_FORMS = {"model.trust_remote_code", "push_to_hub", "data.mapping", "data.test_size", "data.seed", "data.clean"}


def leaves(cls=TrainConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """(dotted key, field, type hint) of every scalar setting of a config dataclass, nested ones included."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found += leaves(hint, f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", f, hint))
    return found


def get_dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def metadata_of(key: str, cls=TrainConfig) -> dict:
    return next((dict(f.metadata) for k, f, _ in leaves(cls) if k == key), {})


def help_of(key: str, cls=TrainConfig) -> str:
    return metadata_of(key, cls).get("help", "")


def _label(key: str) -> str:
    return key.replace(".", " ").replace("_", " ").capitalize()


def component(key: str, value, hint=None, cls=TrainConfig, **kwargs) -> gr.components.Component:
    """A component for a field by its type (default: the field's in `cls`): a dropdown of the words its `Literal`
    type allows, a box for bool, a number, a dropdown that also takes `auto` for `int | str` settings, a text box
    for the rest (lists as comma-separated names)."""
    hint = hint if hint is not None else next(h for k, _, h in leaves(cls) if k == key)
    args = typing.get_args(hint)
    kinds = set(args) or {hint}
    metadata = metadata_of(key, cls)
    kwargs = {"label": _label(key), "info": metadata.get("help", ""), **kwargs}
    choices = choices_of(hint)
    if choices:
        return gr.Dropdown(list(choices), value=value, **kwargs)
    if kinds <= {bool, type(None)}:
        return gr.Checkbox(bool(value), **kwargs)
    if str in kinds and kinds & {int, float}:
        return gr.Dropdown(["auto"], value=str(value), allow_custom_value=True, **kwargs)
    if kinds & {int, float} and not kinds & {str, list}:
        precision = 0 if int in kinds and float not in kinds else None
        return gr.Number(value, precision=precision, **kwargs)
    text = ", ".join(value) if isinstance(value, list) else "" if value is None else str(value)
    return gr.Textbox(text, **kwargs)


def more_settings(defaults: TrainConfig, placed: dict) -> dict[str, gr.components.Component]:
    """Components for every setting the tab has not placed itself (call inside the layout block they go in)."""
    return {
        key: component(key, get_dotted(defaults, key), hint)
        for key, f, hint in leaves(type(defaults))
        if key not in placed and key not in NOT_IN_FORMS and _scalar(hint)
    }


def _scalar(hint) -> bool:
    if choices_of(hint):
        return True  # one word of a Literal
    kinds = typing.get_args(hint) or (hint,)
    return all(t in (bool, int, float, str, type(None)) or typing.get_origin(t) is list for t in kinds)


def _parse(value, hint):
    """A form value as the config reads it: empty text or number -> None; comma-separated names -> a list."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    args = typing.get_args(hint)
    if isinstance(value, str) and any(typing.get_origin(t) is list for t in args):
        names = [n.strip() for n in value.split(",") if n.strip()]
        return names[0] if len(names) == 1 and str in args else names
    return value


def form_config(values: dict[str, object], base: TrainConfig) -> TrainConfig:
    """The config of a submitted form: `base` (defaults, or the Data tab's data settings) with each keyed value."""
    hints = {key: hint for key, _, hint in leaves(type(base))}
    nested = base.to_dict()
    for key, value in values.items():
        value = _parse(value, hints[key])
        if value is None and not _optional(hints[key]):
            continue  # an emptied required field keeps its default
        set_dotted(nested, key, value)
    return type(base).from_dict(nested)


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)
