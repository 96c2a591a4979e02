"""One front door for mechanisms and tasks: registration, discovery, construction.

A mechanism is one file in ``mechanisms/`` (or a module exposed through the entry-point
group ``harness.mechanisms`` of another installed package)::

    @dataclass
    class MyConfig:
        rank: int = 64

    @register_mechanism("mine", MyConfig, causal=True, key_padding=True)
    class Mine(Attention): ...

Registration stores the typed config in Hydra's ConfigStore under the group
``mechanism`` (tasks: ``task``), so ``mechanism=mine mechanism.rank=32`` works and is
type-checked with no YAML. A mechanism's settings under a ``scale=lra`` protocol (whose
settings a cell follows, docs/protocols.md), e.g. LRA's own Linformer k, are given with it
(``protocols=``) and composed for the cells of that protocol (group ``mechanism_protocol``).

Discovery imports every ``mechanisms/*.py`` and
``tasks/*.py`` not starting with ``_``, the entry-point groups, and the directories in
``$HARNESS_PLUGIN_PATH`` (os.pathsep-separated). A plugin that fails to import is
recorded in ``plugin_errors()`` with its error and never stops the others.

A plugin file is imported once per process, with its folder on ``sys.path`` (so it can
import its own helper modules, e.g. a ``_kernels.py`` beside it). A name must be a plain
name (it becomes a folder of the results). Two different files registering one name is an
error naming both; that name is then left out of ``list_mechanisms()`` and looking it up
raises that error, so neither silently wins.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from harness.core.attention import CAPABILITIES, Attention, Capabilities, building

log = logging.getLogger(__name__)

MECHANISM_ENTRY_POINTS = "harness.mechanisms"
TASK_ENTRY_POINTS = "harness.tasks"
PLUGIN_PATH_ENV = "HARNESS_PLUGIN_PATH"


# How a mechanism avoids (or keeps) the L x L score matrix: the speed plots draw one panel per family,
# softmax in each as the reference. A plugin names its own with ``register_mechanism(..., family=...)``.
FAMILIES = {
    "full": "full attention and its variants (O(L²))",
    "kernel": "kernel feature maps (linear in L)",
    "low_rank": "low rank and landmarks",
    "sparse": "sparse and local patterns",
    "routing": "hashing and sorting",
    "mixer": "token mixers without attention",
    "other": "other",
}


class UnknownNameError(KeyError):
    """An unknown mechanism or task name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class MechanismSpec:
    name: str
    cls: type[Attention]
    config_class: type
    capabilities: Capabilities
    module: str
    file: str = ""  # the source file that registered it
    family: str = "other"  # one of FAMILIES: the speed plots draw a panel per family
    protocols: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # protocol -> task -> settings

    @property
    def doc(self) -> str:
        return first_line(self.cls.__doc__) or first_line(sys.modules[self.cls.__module__].__doc__)


@dataclass
class TaskSpec:
    name: str
    cls: type
    config_class: type
    sources: tuple[str, ...]
    module: str
    requires: frozenset[str] = field(default_factory=frozenset)
    file: str = ""

    @property
    def doc(self) -> str:
        return first_line(self.cls.__doc__) or first_line(sys.modules[self.cls.__module__].__doc__)


_MECHANISMS: dict[str, MechanismSpec] = {}
_TASKS: dict[str, TaskSpec] = {}
_ERRORS: dict[str, str] = {}
_CONFLICTS: dict[tuple[str, str], str] = {}  # (kind, name) registered by two different files -> the error
_LOADED: set[str] = set()  # plugin files imported in this process (resolved paths)
_DISCOVERED = False


def first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def _config_node(name: str, config_class: type) -> type:
    """The dataclass stored in Hydra: the mechanism's config plus its ``name``."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config of '{name}' must be a dataclass, got {config_class!r}")
    for f in dataclasses.fields(config_class):
        if f.name == "name":
            raise TypeError(f"config of '{name}' may not have a field called 'name' (it is reserved)")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"config field '{name}.{f.name}' needs a default")
    return dataclasses.make_dataclass(
        f"{config_class.__name__}Node", [("name", str, field(default=name))], bases=(config_class,)
    )


def _source_file(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    return str(getattr(module, "__file__", None) or cls.__module__)


def _same_code(a: str, b: str) -> bool:
    try:
        return Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:
        return False


def _check_new(kind: str, registry: dict, name: str, cls: type) -> str:
    """The source file of ``cls``, after checking ``name`` is a plain name and is not
    registered by another file (the same file imported again, or an identical copy of it,
    is the same mechanism)."""
    from harness.core.names import UnsafeName, check_safe_name

    file = _source_file(cls)
    try:
        check_safe_name(kind, name)
    except UnsafeName as exc:
        raise ValueError(f"{exc} (registered in {file})") from None
    old = registry.get(name)
    if old is None or (old.file == file and old.cls.__qualname__ == cls.__qualname__):
        return file
    if old.cls.__qualname__ == cls.__qualname__ and _same_code(old.file, file):
        return file
    message = f"{kind} '{name}' is registered twice: by {old.file or old.module} and by {file}; rename one of them"
    _CONFLICTS[(kind, name)] = message
    raise ValueError(message)


PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "conf" / "protocol"


def protocol_tasks(protocol: str) -> list[str]:
    """The tasks a scale=lra protocol covers: its ``harness/conf/protocol/<protocol>/<task>.yaml`` files."""
    return sorted(p.stem for p in (PROTOCOL_DIR / protocol).glob("[!_]*.yaml"))


def _protocol_settings(
    name: str, config_class: type, protocols: dict[str, dict[str, dict[str, Any]]] | None
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{protocol: {task or "*": settings}}`` -> ``{protocol: {task: settings}}``, "*" being every
    task of the protocol (a task's own entry adds to it); fields checked against the config."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol, per_task in (protocols or {}).items():
        tasks = protocol_tasks(protocol)
        if not tasks:
            raise ValueError(
                f"mechanism '{name}': protocols= names '{protocol}', which has no harness/conf/protocol/{protocol}/"
            )
        unknown_tasks = sorted(set(per_task) - {"*", *tasks})
        if unknown_tasks:
            raise ValueError(f"mechanism '{name}': protocol {protocol} has no task {unknown_tasks}; it covers {tasks}")
        for settings in per_task.values():
            unknown = sorted(set(settings) - fields)
            if unknown:
                raise TypeError(
                    f"mechanism '{name}': protocol {protocol} sets unknown fields {unknown}; valid: {sorted(fields)}"
                )
        common = per_task.get("*", {})
        out[protocol] = {t: {**common, **per_task.get(t, {})} for t in tasks if common or t in per_task}
    return out


def register_mechanism(
    name: str,
    config_class: type,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding: bool = False,
    relations: bool = False,
    family: str = "other",
    protocols: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: make an ``Attention`` subclass known as ``name``; ``family`` is one of
    ``FAMILIES`` (a peer, ``peer_of = "<ours>"``, is drawn in its counterpart's).

    ``protocols`` gives the mechanism's settings under a scale=lra protocol, per task of it
    (``"*"``: every task the protocol covers), e.g. ``{"lra": {"*": {"k": 16}, "text": {...}}}``:
    they are stored as Hydra config ``mechanism_protocol/<mechanism>_<protocol>_<task>`` and
    composed into the preset cells of that protocol, so command-line overrides still win."""
    if family not in FAMILIES:
        raise ValueError(f"mechanism '{name}': family={family!r} is not one of {', '.join(FAMILIES)}")

    def decorate(cls: type[Attention]) -> type[Attention]:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"mechanism '{name}' must subclass harness.core.attention.Attention")
        file = _check_new("mechanism", _MECHANISMS, name, cls)
        settings = _protocol_settings(name, config_class, protocols)
        caps = Capabilities(causal=causal, cross=cross, key_padding=key_padding, relations=relations)
        cls.name, cls.capabilities, cls.config_class = name, caps, config_class
        store = ConfigStore.instance()
        store.store(group="mechanism", name=name, node=_config_node(name, config_class))
        for protocol, per_task in settings.items():
            for task_name, values in per_task.items():
                store.store(
                    group="mechanism_protocol",
                    name=f"{name}_{protocol}_{task_name}",
                    node={"mechanism": dict(values)},
                    package="_global_",
                )
        _MECHANISMS[name] = MechanismSpec(name, cls, config_class, caps, cls.__module__, file, family, settings)
        return cls

    return decorate


def register_task(
    name: str,
    config_class: type,
    *,
    sources: tuple[str, ...],
    requires: tuple[str, ...] = (),
    scales: dict[str, dict[str, Any]] | None = None,
) -> Callable[[type], type]:
    """Class decorator: make a ``harness.data.task.Task`` subclass known as ``name``.

    ``sources`` names the data sources the config's ``source`` field accepts (the
    offline default first). ``requires`` lists capabilities every mechanism must have
    to run it (e.g. ``("causal",)``). ``scales`` maps a scale name to config overrides
    for that task at that scale, e.g. ``{"lra": {"task": {"max_len": 2000},
    "model": {"dim": 512}}}``; they are stored as Hydra config ``task_scale/<task>_<scale>``
    and composed after the scale, so command-line overrides still win.
    """
    unknown = set(requires) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"task '{name}' requires unknown capabilities {sorted(unknown)}; valid: {CAPABILITIES}")

    def decorate(cls: type) -> type:
        file = _check_new("task", _TASKS, name, cls)
        for attribute, value in (
            ("name", name),
            ("config_class", config_class),
            ("sources", tuple(sources)),
            ("requires", frozenset(requires)),
        ):
            setattr(cls, attribute, value)
        store = ConfigStore.instance()
        store.store(group="task", name=name, node=_config_node(name, config_class))
        for scale, preset in (scales or {}).items():
            store.store(group="task_scale", name=f"{name}_{scale}", node=preset, package="_global_")
        _TASKS[name] = TaskSpec(name, cls, config_class, tuple(sources), cls.__module__, frozenset(requires), file)
        return cls

    return decorate


# ----------------------------------------------------------------------------- discovery


def _import_package_modules(package: str) -> None:
    try:
        pkg = importlib.import_module(package)
    except (Exception, SystemExit) as exc:  # the package itself is broken: report, go on
        _ERRORS[package] = _describe(exc)
        return
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        _guarded_import(f"{package}.{info.name}", functools.partial(importlib.import_module, f"{package}.{info.name}"))


def _import_file(path: Path) -> None:
    """Import a plugin file under a name of its own (two folders may hold files of one name),
    its folder on ``sys.path`` for the helper modules it imports."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"harness_plugin_{path.parent.name}_{path.stem}_{digest}"
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)  # after everything else: a helper never shadows an installed module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _guarded_import(label: str, load: Callable[[], Any]) -> None:
    try:
        load()
        _ERRORS.pop(label, None)
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() on import is just broken
        _ERRORS[label] = _describe(exc) if not isinstance(exc, SystemExit) else f"SystemExit({exc.code!r}) on import"
        log.warning("plugin %s failed to load: %s", label, _ERRORS[label])


def discover(extra_paths: Sequence[str | Path] | None = None, *, force: bool = False) -> None:
    """Import every mechanism and task: built-in packages, entry points, plugin paths.

    Safe to call many times; built-ins and entry points load once unless ``force``."""
    global _DISCOVERED
    if not _DISCOVERED or force:
        _import_package_modules("mechanisms")
        _import_package_modules("tasks")
        for group in (MECHANISM_ENTRY_POINTS, TASK_ENTRY_POINTS):
            for ep in importlib.metadata.entry_points(group=group):
                _guarded_import(f"{group}:{ep.name}", ep.load)
        _DISCOVERED = True
    paths = [p for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
    for folder in [*paths, *(extra_paths or [])]:
        folder = Path(folder)
        if not folder.is_dir():
            _ERRORS[str(folder)] = f"plugin folder {folder} does not exist"
            continue
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_") or (str(path.resolve()) in _LOADED and not force):
                continue  # a helper, or imported already in this process
            _LOADED.add(str(path.resolve()))
            _guarded_import(str(path), functools.partial(_import_file, path))


def plugin_errors() -> dict[str, str]:
    """Plugins that failed to import, with their error (one line each)."""
    return dict(_ERRORS)


# ----------------------------------------------------------------------------- lookup


def _lookup(kind: str, registry: dict, name: str):
    discover()
    if (kind, name) in _CONFLICTS:
        raise UnknownNameError(_CONFLICTS[(kind, name)])
    if name not in registry:
        valid = ", ".join(sorted(registry)) or "(none)"
        hint = f" (failed plugins: {', '.join(sorted(_ERRORS))})" if _ERRORS else ""
        from harness.core.overrides import did_you_mean

        close = did_you_mean(name, registry)
        raise UnknownNameError(f"unknown {kind} '{name}'{close}; registered {kind}s: {valid}{hint}")
    return registry[name]


def get_mechanism(name: str) -> MechanismSpec:
    return _lookup("mechanism", _MECHANISMS, name)


def get_task(name: str) -> TaskSpec:
    return _lookup("task", _TASKS, name)


def list_mechanisms() -> list[str]:
    discover()
    return sorted(n for n in _MECHANISMS if ("mechanism", n) not in _CONFLICTS)


def mechanism_modules(*, plugins: bool = True) -> list[str]:
    """The modules that registered mechanisms (sorted); ``plugins=False`` leaves out the plugin
    files loaded from a path (``harness_plugin_*``), which a fresh process cannot import by name."""
    return sorted({s.module for s in _MECHANISMS.values() if plugins or not s.module.startswith("harness_plugin_")})


def list_tasks() -> list[str]:
    discover()
    return sorted(n for n in _TASKS if ("task", n) not in _CONFLICTS)


def build_config(config_class: type, overrides: dict[str, Any] | Any | None, *, what: str) -> Any:
    """A typed config from a dict / DictConfig / dataclass of overrides, rejecting unknown
    fields and wrongly typed values (through OmegaConf's structured-config validation)."""
    from omegaconf import OmegaConf

    if overrides is None:
        return config_class()
    if dataclasses.is_dataclass(overrides) and not isinstance(overrides, type):
        given: Any = dataclasses.asdict(overrides)
    elif isinstance(overrides, dict):
        given = overrides
    else:
        given = OmegaConf.to_container(overrides, resolve=True)
    overrides = {k: v for k, v in dict(given).items() if k != "name"}
    valid = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"{what} has no field(s) {unknown}; its fields are {sorted(valid)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_class), overrides)
    except Exception as exc:
        raise TypeError(f"bad value for {what}: {exc}".splitlines()[0]) from exc
    return OmegaConf.to_object(merged)


def create_mechanism(name: str, *, heads: int, dim_head: int, max_len: int, **config_overrides: Any) -> Attention:
    """Build a registered mechanism, ready to call (like timm's ``create_model``)."""
    spec = get_mechanism(name)
    cfg = build_config(spec.config_class, config_overrides, what=f"mechanism '{name}'")
    with building(cfg, heads, dim_head, max_len):
        return spec.cls(cfg, heads=heads, dim_head=dim_head, max_len=max_len)


def create_task(name: str, *, scale: str = "tiny", **config_overrides: Any):
    """Build a registered task object from its typed config."""
    spec = get_task(name)
    cfg = build_config(spec.config_class, config_overrides, what=f"task '{name}'")
    return spec.cls(cfg, scale=scale)


def describe() -> dict[str, Any]:
    """Everything registered, as plain data (what ``python -m harness list json=true`` prints)."""
    discover()
    mechanisms = {
        name: {
            "family": spec.family,
            "capabilities": spec.capabilities.as_dict(),
            "config": {f.name: _default(f) for f in dataclasses.fields(spec.config_class)},
            "protocols": spec.protocols,
            "doc": spec.doc,
            "module": spec.module,
        }
        for name, spec in sorted(_MECHANISMS.items())
    }
    tasks = {
        name: {
            "sources": list(spec.sources),
            "requires": sorted(spec.requires),
            "config": {f.name: _default(f) for f in dataclasses.fields(spec.config_class)},
            "doc": spec.doc,
            "module": spec.module,
        }
        for name, spec in sorted(_TASKS.items())
    }
    return {"mechanisms": mechanisms, "tasks": tasks, "errors": plugin_errors()}


def _default(f: dataclasses.Field) -> Any:
    from harness.core.overrides import field_default

    value = field_default(f)
    return value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else repr(value)
