"""How a setting is declared: one field of ``Settings`` whose metadata holds its parser,
whether it is a secret, and its documentation (mox and maddy declare their configuration the
same way). Loading, masking in ``repr``, ``check-config`` and docs/configuration.md all read
the declarations through ``declared``; nothing else lists the settings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

# The key of a field's metadata that holds its Setting.
SETTING = "relay.setting"
# What repr and check-config show instead of a secret that is set.
HIDDEN = "***"


def masks_itself(value: object) -> object:
    """The ``mask`` of a secret whose own ``str`` and ``repr`` already hide the password
    (``UpstreamTarget``)."""
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, as declared in its field's metadata."""

    parse: Callable[[str], Any]
    # The Meaning column of docs/configuration.md: what the setting does, and what unset means.
    doc: str
    # Never repeated in an error message (unless its parser's message is a SafeValueError),
    # and shown through ``mask`` (by default as ***) in repr and check-config.
    secret: bool = False
    mask: Callable[[Any], object] | None = None
    # The Default column when the value alone does not say it ("— (embedded)").
    default_doc: str | None = None
    # The TOML key when it is not the field's name; the variable is RELAY_ and the key in
    # upper case.
    key: str | None = None
    # Whether an empty RELAY_ variable is a value (it turns a listener off) rather than unset.
    blank_is_value: bool = False
    # A path that check-config requires to be an existing file.
    file: bool = False
    # A family of keys, one per name (route_<name>_url): the pattern, with the name as its
    # one group; the field holds a mapping from name to parsed value.
    family: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Declared:
    """A setting with what its field adds: the field's name and its default."""

    name: str
    setting: Setting
    default: Any
    default_factory: Callable[[], Any] | None

    @property
    def key(self) -> str:
        """The TOML key; ``route_<name>_url`` for a family."""
        return self.setting.key or self.name

    @property
    def variable(self) -> str:
        """The environment variable; ``RELAY_ROUTE_<NAME>_URL`` for a family."""
        return "RELAY_" + self.key.upper()

    def member_key(self, member: str) -> str:
        """The key of one member of a family: ``route_mailchimp_url``."""
        return self.key.replace("<name>", member)

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default

    def shown(self, value: Any) -> Any:
        """``value`` as repr and check-config may show it: a secret masked."""
        if value is None or not self.setting.secret:
            return value
        mask = self.setting.mask or (lambda _: HIDDEN)
        if isinstance(value, Mapping):
            return {name: mask(member) for name, member in value.items()}
        return mask(value)


def setting(parse: Callable[[str], Any], *, doc: str, default: Any = MISSING,
            default_factory: Callable[[], Any] | None = None, **declaration: Any) -> Any:
    """A ``Settings`` field declared with its parser and documentation; ``declaration``
    takes the other fields of ``Setting``. Typed ``Any`` so that the field keeps its own
    annotation, as ``dataclasses.field`` does."""
    metadata = {SETTING: Setting(parse, doc, **declaration)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls: type) -> tuple[Declared, ...]:
    """Every setting of the dataclass ``cls``, in declaration order (the order of the docs)."""
    found = []
    for f in dataclasses.fields(cls):
        declaration = f.metadata.get(SETTING)
        if declaration is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting()")
        factory = None if f.default_factory is MISSING else f.default_factory
        found.append(Declared(f.name, declaration, f.default, factory))
    return tuple(found)


def as_text(value: object) -> str:
    """A value in the text form its parser reads (empty for none), as the Default column and
    check-config show it; a secret is masked with ``Declared.shown`` first."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ", ".join(str(item) for item in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{name}: {as_text(member)}" for name, member in value.items())
    return str(value)
