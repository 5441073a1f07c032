"""Plugin loading: mmkit's builtin plugins and entry points of group "mmkit", errors isolated."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from mmkit import hookspecs
from mmkit.errors import MMKitError, one_line
from mmkit.registry import KINDS, Registry

# mmkit's own components, registered through the same hooks a third party uses.
BUILTIN_PLUGINS = ("mmkit.encoders", "mmkit.data", "mmkit.fusion", "mmkit.tasks")


@dataclass
class PluginInfo:
    """What `mmkit plugins` shows about one loaded plugin."""

    name: str
    version: str
    registers: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plugins:
    """The registry the plugins filled, who they are, and the problems met loading them."""

    registry: Registry
    infos: dict[str, PluginInfo]
    problems: list[str]


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def plugin_manager(problems: list[str]) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """Register builtins and entry points; return the manager and each plugin's version.

    ``MMKIT_PLUGINS=a,b`` loads only those entry-point plugins (empty: none);
    ``MMKIT_DISABLE_PLUGINS=x`` skips plugins by name, builtins included.
    """
    manager = pluggy.PluginManager("mmkit")
    manager.add_hookspecs(hookspecs)
    wanted = _names_from_env("MMKIT_PLUGINS")
    disabled = _names_from_env("MMKIT_DISABLE_PLUGINS") or set()
    versions: dict[str, str] = {}
    dists: dict[str, str] = {}
    own_version = metadata.version("mmkit")
    for name in BUILTIN_PLUGINS:
        if name not in disabled:
            manager.register(importlib.import_module(name), name=name)
            versions[name] = own_version
    entries = sorted(metadata.entry_points(group="mmkit"), key=lambda e: e.name)
    _unknown_names(problems, wanted or set(), disabled, {e.name for e in entries})
    for entry in entries:
        if entry.name in disabled or (wanted is not None and entry.name not in wanted):
            continue
        dist = entry.dist.name if entry.dist else "?"
        if manager.has_plugin(entry.name):
            if dists.get(entry.name) != dist:  # not merely one distribution seen twice on sys.path
                taken = f"a plugin of {dists[entry.name]}" if entry.name in dists else "a builtin plugin of mmkit"
                problems.append(f'plugin "{entry.name}" of {dist} has the name of {taken}; ignored')
            continue
        try:
            manager.register(entry.load(), name=entry.name)
            manager.check_pending()
        except pluggy.PluginValidationError as error:  # e.g. a misspelled hook name
            manager.unregister(name=entry.name)
            problems.append(f'plugin "{entry.name}" ignored: {one_line(error, whole=True)}')
            continue
        except (Exception, SystemExit) as error:  # a broken plugin must not take mmkit down
            problems.append(f'error importing plugin "{entry.name}": {one_line(error)}')
            continue
        versions[entry.name] = entry.dist.version if entry.dist else "?"
        dists[entry.name] = dist
    return manager, versions


def _unknown_names(problems: list[str], wanted: set[str], disabled: set[str], installed: set[str]) -> None:
    """A name in MMKIT_PLUGINS or MMKIT_DISABLE_PLUGINS that matches no plugin is a typo to report."""
    for variable, names in (("MMKIT_PLUGINS", wanted), ("MMKIT_DISABLE_PLUGINS", disabled)):
        for name in sorted(names - installed - set(BUILTIN_PLUGINS)):
            problems.append(f'{variable} names "{name}", which is no installed plugin '
                            f'(installed: {", ".join(sorted(installed)) or "none"})')


def collect(manager: pluggy.PluginManager, versions: dict[str, str], problems: list[str]) -> tuple[Registry, dict[str, PluginInfo]]:
    """Call every plugin's register hooks one by one, so each component knows its plugin."""
    registry = Registry()
    infos = {name: PluginInfo(name, versions.get(name, "?")) for name in versions}
    for kind in KINDS:
        for impl in getattr(manager.hook, f"register_{kind}").get_hookimpls():  # builtins first
            plugin = manager.get_name(impl.plugin)

            def register(name: str, factory: Any, kind: str = kind, plugin: str = plugin) -> None:
                try:
                    registry.add(kind, name, factory, plugin)
                except MMKitError as error:
                    problems.append(str(error))
                    return
                infos[plugin].registers.setdefault(kind, []).append(name)

            try:
                impl.function(register)
            except Exception as error:
                problems.append(f'plugin "{plugin}" failed in register_{kind}: {one_line(error)}')
    return registry, infos


@functools.cache
def loaded_manager() -> tuple[pluggy.PluginManager, dict[str, str], list[str]]:
    """Import every plugin once per process, printing each import problem in one line."""
    problems: list[str] = []
    manager, versions = plugin_manager(problems)
    _report(problems)
    return manager, versions, problems


@functools.cache
def load_plugins() -> Plugins:
    """Load the plugins and fill the registry, once per process."""
    manager, versions, import_problems = loaded_manager()
    problems: list[str] = []
    registry, infos = collect(manager, versions, problems)
    _report(problems)
    return Plugins(registry, infos, import_problems + problems)


def _report(problems: list[str]) -> None:
    for problem in problems:
        print(f"mmkit: {problem}", file=sys.stderr)


def get_registry() -> Registry:
    return load_plugins().registry
