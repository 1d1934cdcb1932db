"""One registry class for everything nasdose finds by name: models, ops, search spaces, strategies.

Configs, genotypes and the command line refer to these by a string, so every registry behaves
the same way: a name taken by another object is an error, an unknown name is an error that
lists the known ones, `package.module:attr` loads an object from outside nasdose, and built-in
entries may be imported on first use, so that importing nasdose loads no optional dependency.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Generic, Mapping, TypeVar

from .errors import NasDoseError

T = TypeVar("T")
Obj = TypeVar("Obj")
PATH_HINT = "package.module:attr"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """An object, the name it goes by (its registered name, or the import path it came from) and
    what its registration said about it (a model's small kwargs, an op's slot kinds)."""

    name: str
    obj: T
    meta: Mapping[str, Any] = field(default_factory=dict)


def import_module(module: str, where: str) -> ModuleType:
    """Import a module the user named; a failure is a NasDoseError that starts with `where`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise NasDoseError(f"{where}: cannot import module '{module}' ({e})") from None


class Registry(Generic[T]):
    """Names -> objects of one kind (`kind` names it in errors: "model", "search space", ...).

    `base`: the objects are subclasses of it (else any class or function); `named`: they are
    classes whose `name` is set to the name they go by, so that what they record (a genotype's
    space, a log's strategy) finds them again; `builtins`: name -> module that registers it,
    imported on first use; `paths_need_registration`: an import path must lead to a registered
    object (an op's slot kinds come from its registration).
    """

    def __init__(self, kind: str, *, base: type | None = None, named: bool = False,
                 builtins: Mapping[str, str] | None = None, paths_need_registration: bool = False) -> None:
        self.kind = kind
        self._base = base
        self._named = named
        self._builtins = dict(builtins or {})
        self._paths_need_registration = paths_need_registration
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Obj], Obj]:
        """Decorator registering an object under `name`, with metadata `meta`.

        The same registration again is harmless; another object or other metadata under a taken
        name is an error naming the object that holds it. A built-in's name is taken before its
        module is loaded: registering it loads the module (a no-op within that module's import).
        """

        def decorate(obj: Obj) -> Obj:
            where = f"{self.kind} '{name}'"
            self._check(obj, where, repr(obj))
            if name in self._builtins:
                import_module(self._builtins[name], where)
            existing = self._entries.get(name)
            if existing is not None and (existing.obj is not obj or existing.meta != meta):
                raise NasDoseError(f"{where}: already registered by {qualname(existing.obj)}")
            self._entries[name] = Entry(name, obj, dict(meta))  # type: ignore[arg-type]
            if self._named:
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def get(self, name: str, source: str = "") -> Entry[T]:
        """The entry registered as `name` (a built-in is imported now), or the object at the import
        path `name`; errors start with `source` (e.g. the config key) when given."""
        where = f"{source}: " if source else ""
        if ":" in name:
            return self._load(name, f"{where}{self.kind} '{name}'")
        if name not in self._entries and name in self._builtins:
            import_module(self._builtins[name], f"{where}{self.kind} '{name}'")
        if name not in self._entries:
            raise NasDoseError(f"{where}unknown {self.kind} '{name}' (known: {', '.join(self.names())}; "
                               f"or give {PATH_HINT})")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered and built-in names, sorted (for --help and error messages)."""
        return sorted(set(self._entries) | set(self._builtins))

    def _load(self, path: str, where: str) -> Entry[T]:
        """A registered object keeps its name (the first it was registered under); another is
        named by its path."""
        module_name, _, attr = path.partition(":")
        obj: Any = import_module(module_name, where)
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise NasDoseError(f"{where}: module '{module_name}' has no attribute '{attr}'")
        registered = next((e for e in self._entries.values() if e.obj is obj), None)
        if registered is not None:
            return registered
        if self._paths_need_registration:
            raise NasDoseError(f"{where}: '{attr}' is not a registered {self.kind}")
        self._check(obj, where, f"'{attr}'")
        if self._named:
            obj.name = path
        return Entry(path, obj)

    def _check(self, obj: Any, where: str, label: str) -> None:
        if self._base is None:
            if not callable(obj):
                raise NasDoseError(f"{where}: {label} is not a class or function")
        elif not (isinstance(obj, type) and issubclass(obj, self._base)):
            raise NasDoseError(f"{where}: {label} is not a {self._base.__name__} subclass")


def qualname(obj: object) -> str:
    """`module.Class` of a class or function, for errors that say where an object comes from."""
    name = getattr(obj, "__qualname__", None)
    return f"{getattr(obj, '__module__', '?')}.{name}" if name else repr(obj)
