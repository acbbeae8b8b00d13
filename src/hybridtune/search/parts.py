"""The parts a trial may add to its family (`parts:` of a space): regularisers, label losses, layer
sampling, ... — any strategy part that declares the settings a search should try (`Part.search`).

    parts:                     # default: every part that declares `search` (strategy/<key>.py)
      rdrop: {alpha: {low: 0.1, high: 5.0, log: true}}   # on or off per trial, then its settings
      label_loss: {use: true, smoothing: [0.05, 0.1]}     # use: true = in every trial
      l2sp: search                                       # on or off, its declared `search` settings
      mixout: null                                       # (or leave it out) never

Nothing here names a part: a setting is a field of the part's config class (a dotted path for a
nested one, `focal.gamma`), its kind is the field's, and every value a trial could draw (each
choice, both ends of a range) is validated by the part's own config before anything runs, so a
space that cannot make a valid recipe is refused with its key path. Each part is an Optuna
parameter `parts.<key>.use` (a trial with it off has none of its settings: TPE models them
conditionally) and `parts.<key>.<setting>`, named as in the space file. A part the trial's recipe
cannot take (its family, the parts drawn before it, or the model refuse it at some corner of its
settings: search/setup.py's `refusal`) is not drawn in that trial: no `parts.<key>.use` at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from hybridtune import strategy
from hybridtune.errors import did_you_mean
from hybridtune.search.params import Param, parse_param

USE = "use"
DECLARED = "search"  # `key: search`: the settings the part declares (Part.search), as the default space


def default_parts() -> dict[str, dict]:
    """Every registered part that declares the settings a search should try."""
    return {key: declared(key) for key, part in strategy.PARTS.items() if part.search is not None}


def declared(key: str) -> dict:
    """The search settings part `key` declares (`parts: {key: search}`); ValueError if it has none."""
    search = strategy.PARTS[key].search
    if search is None:
        raise ValueError(
            f"parts.{key}: found {DECLARED!r}, but the part declares no search settings; expected a "
            "mapping of its settings"
        )
    return dict(search)


def _field(config: type[BaseModel], path: str) -> tuple[type, Any]:
    """The kind (bool, int, float, str) of a config field named by a dotted path, and its FieldInfo."""
    cls, info = config, None
    for name in path.split("."):
        fields = getattr(cls, "model_fields", None)
        if not fields or name not in fields:
            raise ValueError(
                f"found setting {path!r}; expected a field of the part's config{_hint(name, fields or ())}"
            )
        info = fields[name]
        cls = _plain(info.annotation)
    if cls not in (bool, int, float, str):
        raise ValueError(f"found setting {path!r} of type {cls}; expected a number, a bool or a string")
    return cls, info


def _hint(word: str, choices) -> str:
    hint = did_you_mean(word, list(choices))
    return f" ({hint})" if hint else ""


def _plain(annotation: Any) -> Any:
    """`float`, `int | None` -> int, `Optional[Config]` -> Config, `Literal["a", "b"]` -> str;
    anything else as it is."""
    if get_origin(annotation) is Literal:
        return type(get_args(annotation)[0])
    args = [a for a in get_args(annotation) if a is not type(None)]
    if len(args) == 1 and get_origin(annotation) is not list:
        return _plain(args[0])
    return annotation


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """{"focal.gamma": 2} -> {"focal": {"gamma": 2}}."""
    out: dict[str, Any] = {}
    for path, value in values.items():
        *heads, last = path.split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return out


def parse_parts(raw: Any) -> dict[str, dict[str, Param]]:
    """The `parts:` section -> {key: {setting: Param}}, every reachable value checked by the part's
    config (ValueError naming `parts.<key>.<setting>`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"found {type(raw).__name__}; expected a mapping of part keys to their settings")
    out: dict[str, dict[str, Param]] = {}
    for key, settings in raw.items():
        if settings is None:
            continue  # `rdrop: null`: never
        if key not in strategy.PARTS:
            raise ValueError(
                f"parts.{key}: found an unknown part; expected a part key{_hint(key, strategy.PARTS)}"
            )
        if settings == DECLARED:
            settings = declared(key)
        if not isinstance(settings, dict):
            raise ValueError(
                f"parts.{key}: found {settings!r}; expected a mapping of its settings or {DECLARED!r}"
            )
        config = strategy.PARTS[key].config
        params: dict[str, Param] = {USE: parse_param(settings.get(USE, [False, True]), bool)}
        for path, value in settings.items():
            if path == USE:
                continue
            try:
                kind, _ = _field(config, path)
                params[path] = parse_param(value, kind)
            except ValueError as e:
                raise ValueError(f"parts.{key}.{path}: {e}") from None
        # each reachable value, as the part's own config takes it (the other settings at their first)
        first = {path: p.corners()[0] for path, p in params.items() if path != USE}
        for path, p in params.items():
            if path == USE:
                continue
            for corner in p.corners():
                try:
                    config.model_validate(nest(first | {path: corner}))
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(map(str, err["loc"])) or path  # the setting the config refused
                    found = repr(err["input"] if err["loc"] else corner)
                    if err["type"] == "missing":
                        found = "no value (the part requires one: a fixed value or choices)"
                    raise ValueError(f"parts.{key}.{where}: found {found}; {err['msg']}") from None
        if params[USE].choices == (False,):
            continue  # `use: false`: never
        out[key] = params
    return out


def corners(params: dict[str, Param]) -> list[dict]:
    """The part's sections that bound what a trial can draw: each setting at each of its corners
    (every choice, both ends of a range), the others at their first."""
    first = {path: p.corners()[0] for path, p in params.items() if path != USE}
    out = [nest(first)]
    for path, p in params.items():
        if path != USE:
            out += [nest(first | {path: corner}) for corner in p.corners()[1:]]
    return out


def sample_parts(
    parts: dict[str, dict[str, Param]], trial: Any, fits: Callable[[dict, str], bool] | None = None
) -> dict[str, dict]:
    """The recipe sections of the parts this trial adds: {key: its config} (off: absent).
    `fits(sections, key)`: whether part `key` can go beside the sections drawn so far; a part that
    cannot is not drawn at all (no `parts.<key>.use`: TPE models it as absent, like its settings)."""
    sections: dict[str, dict] = {}
    for key, params in parts.items():
        if fits is not None and not fits(sections, key):
            continue
        if not params[USE].sample(trial, f"parts.{key}.{USE}"):
            continue
        values = {path: p.sample(trial, f"parts.{key}.{path}") for path, p in params.items() if path != USE}
        sections[key] = nest(values)
    return sections


def parts_off(parts: dict[str, dict[str, Param]]) -> dict[str, bool]:
    """The Optuna parameters that leave every part out of a trial (`parts.<key>.use` false), for the
    parts the space lets be off (a `use: true` part stays in every trial)."""
    return {f"parts.{key}.{USE}": False for key, params in parts.items() if False in params[USE].corners()}


def to_yaml(parts: dict[str, dict[str, Param]]) -> dict:
    return {key: {path: p.to_yaml() for path, p in params.items()} for key, params in parts.items()}
