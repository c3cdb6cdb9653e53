"""Name -> module class: registration by decorator, spec-string parsing, list_modules(), create().

A spec is a registered name, optionally called with keyword arguments written as Python literals:
``"se"``, ``"cbam(reduction=8, kernel_size=3)"``, ``"ge(variant='theta', extent=4)"``.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import re
from typing import Any, Callable, Iterable, Mapping, TypeVar

from torch import nn

__all__ = ["BASELINE", "MODULES", "Registry", "build", "check_kwargs", "create", "did_you_mean", "get_module_class", "list_modules",
           "parse_spec", "register", "registered_classes"]

F = TypeVar("F", bound=Callable[..., Any])

#: The name of the network without attention: the variant every attention module is compared with.
BASELINE = "plain"


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest of `valid`, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


class Registry:
    """Names -> factories of one kind (attention modules, models, data sets): registration, spec strings
    ("name(key=value, ...)"), the sorted listing, and errors that list the names and guess the one meant."""

    def __init__(self, kind: str, entries: Mapping[str, Callable[..., Any]] = {}, unknown: str = "Available") -> None:
        self.kind = kind  # "attention module", "model", "dataset"
        self.unknown = unknown  # how the error introduces the listing
        self.entries: dict[str, Callable[..., Any]] = {}
        for name, factory in entries.items():
            self.register(name)(factory)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def register(self, name: str, *, override: bool = False) -> Callable[[F], F]:
        """Decorator registering a class or factory under `name` (an identifier, hyphens allowed)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"register: the name must be a Python identifier such as 'my_gate', got {name!r}.")

        def decorator(factory: F) -> F:
            if not callable(factory):
                raise TypeError(f"register({name!r}): expected a class or callable, got {factory!r}.")
            known = self.entries.get(name)
            if known is not None and known is not factory and not override:
                raise ValueError(f"register: {name!r} is already registered to {getattr(known, '__qualname__', known)}; "
                                 f"pass override=True to replace it.")
            self.entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as `name`; a ValueError listing the names if there is none."""
        try:
            return self.entries[name]
        except KeyError:
            raise ValueError(f"Unknown {self.kind} {name!r}. {self.unknown}: {', '.join(self.names())}."
                             f"{did_you_mean(name, self.entries)}") from None

    def parse(self, spec: str) -> tuple[str, Callable[..., Any], dict[str, Any]]:
        """(name, factory, keyword arguments) of a spec string, the arguments checked against the factory's."""
        name, kwargs = parse_spec(spec, f"{self.kind} spec")
        factory = self.get(name)
        return name, factory, kwargs


MODULES = Registry("attention module", unknown="Registered modules")


def register(name: str, *, override: bool = False) -> Callable[[F], F]:
    """Class decorator that registers an attention module under `name`.

    The class (or factory) must take the channel count as its first positional argument::

        @attnkit.register("my_gate")
        class MyGate(nn.Module):
            def __init__(self, channels: int, reduction: int = 16): ...
    """
    if isinstance(name, str) and not name.isidentifier():
        raise ValueError(f"register: the name must be a Python identifier such as 'my_gate', got {name!r}.")
    return MODULES.register(name, override=override)


def registered_classes() -> set[type]:
    """The registered factories that are classes (the types of the modules the registry builds)."""
    return {factory for factory in MODULES.entries.values() if isinstance(factory, type)}


def list_modules() -> list[str]:
    """The registered module names, sorted."""
    return MODULES.names()


def get_module_class(name: str) -> Callable[..., nn.Module]:
    """The class (or factory) registered under `name`; ValueError listing the names if there is none."""
    return MODULES.get(name)


_NAME = re.compile(r"[A-Za-z_][\w\-]*")


def parse_spec(spec: str, kind: str = "attention spec") -> tuple[str, dict[str, Any]]:
    """Split ``"name(key=value, ...)"`` into the name and a dict of literal keyword arguments.

    Names may contain hyphens ("fashion-mnist"); `kind` names what is being parsed in error messages.
    """
    if not isinstance(spec, str):
        raise TypeError(f"A {kind} must be a string such as 'se' or 'cbam(reduction=8)', got {spec!r}.")
    text = spec.strip()
    name, paren, rest = text.partition("(")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise ValueError(f"Cannot parse {kind} {spec!r}: expected a name or name(key=value, ...), e.g. 'cbam(reduction=8, kernel_size=3)'.")
    if not paren:
        return name, {}
    try:
        node = ast.parse("_spec(" + rest, mode="eval").body
    except SyntaxError:
        raise ValueError(
            f"Cannot parse {kind} {spec!r}: expected a name or name(key=value, ...), e.g. 'cbam(reduction=8, kernel_size=3)'."
        ) from None
    if not isinstance(node, ast.Call):
        raise ValueError(f"Cannot parse {kind} {spec!r}: expected a name or name(key=value, ...).")
    if node.args:
        raise ValueError(
            f"{kind.capitalize()} {spec!r} has positional arguments; use keywords, e.g. '{name}(reduction=8)'."
        )
    kwargs: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError(f"{kind.capitalize()} {spec!r}: '**' is not allowed; write each key=value.")
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise ValueError(
                f"{kind.capitalize()} {spec!r}: the value of {keyword.arg!r} must be a Python literal "
                f"(a number, a quoted string, True/False/None, a tuple or list), got "
                f"{ast.unparse(keyword.value)!r}. Quote strings: {keyword.arg}='{ast.unparse(keyword.value)}'."
            ) from None
    return name, kwargs


def check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any], skip: int = 1) -> None:
    """Raise a ValueError naming the valid arguments when `kwargs` has a key that `factory` does not take
    (the first `skip` parameters, such as the channel count, are not named in specs)."""
    params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid += list(getattr(factory, "accepted_keywords", ()))  # timm's conventions, which attnkit's modules take too
    for key in kwargs:
        if key not in valid:
            raise ValueError(
                f"{name!r} has no argument {key!r}. Valid arguments: {', '.join(valid) or '(none)'}."
                f"{did_you_mean(key, valid)}"
            )


def build(name: str, spec_kwargs: dict[str, Any], channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """The module registered as `name` for `channels` channels, with a parsed spec's keyword arguments and further
    keywords (giving one in both places is an error)."""
    factory = get_module_class(name)
    both = sorted(set(spec_kwargs) & set(kwargs))
    if both:
        raise ValueError(f"Attention module {name!r}: {', '.join(both)} given both in the spec and as keywords.")
    merged = {**spec_kwargs, **kwargs}
    check_kwargs(name, factory, merged)
    return factory(channels, **merged)


def create(spec: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention module that `spec` names for a feature map of `channels` channels.

    Keyword arguments are merged with those in the spec; giving one in both places is an error.
    """
    name, spec_kwargs = parse_spec(spec)
    return build(name, spec_kwargs, channels, kwargs)
