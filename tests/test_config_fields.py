"""Every config field is read by some code: a field nothing reads lies to the user who sets it.

The config dataclasses are found by walking the type annotations from the top-level configs
(``ExperimentConfig`` and the configs of the other entry points) through nested dataclasses,
lists, tuples, dicts and unions. A field counts as read when the library or an entry point
(``cmr/``, ``launch/``, ``shards/``) loads it, as an attribute (``cfg.name``) or through
``getattr(x, "name")``. Reads inside a config's own ``validate`` do not count: checking a
value is not using it.

Which config a read is of comes from a little typing (``_Types``): where the receiver's class
is known (an annotated parameter, ``self`` in a config method, ``cfg.data`` of a known
config, ``for s in cfg.train.stages``, ``self.cfg`` of a class that stored an annotated
parameter), the read counts for that class only, and a receiver known not to be a config
(a tensor, an int) counts for none. Where the receiver is unknown (the trainer's ``cfg`` is
not annotated; a lambda's argument), the read counts for every config with a field of that
name. So a new field that no code reads fails this test when its name is its own or when
every read of that name has a typed receiver (LoggingConfig.keep_last would: the
Checkpointer's reads of ``keep_last`` are typed); it can slip through only behind a
same-named field read through an untyped receiver.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from cmr.eval.metrics import MetricsConfig
from cmr.experiment import ExperimentConfig
from cmr.export import InferenceConfig
from cmr.extract import ExtractConfig
from cmr.search import SearchConfig
from shards.pipeline import BuildConfig

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("cmr", "launch", "shards")
ROOTS = (ExperimentConfig, InferenceConfig, ExtractConfig, SearchConfig, MetricsConfig, BuildConfig)
# Methods whose reads are checks, not uses.
CHECK_METHODS = {"validate", "validate_all", "__post_init__"}

# "Class.field": why it is fine that no code reads it by name. Keep this short.
ALLOWED_UNREAD: dict[str, str] = {}


def config_classes(roots=ROOTS) -> list[type]:
    """Every dataclass reachable from ``roots`` through field annotations, in walk order."""
    found: dict[type, None] = {}

    def walk(tp) -> None:
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if tp in found:
                return
            found[tp] = None
            for hint in typing.get_type_hints(tp).values():
                walk(hint)
            return
        for arg in typing.get_args(tp):
            walk(arg)

    for root in roots:
        walk(root)
    return list(found)


class _Other:
    """The type of a value known not to be a config or a class of the scanned code (an int,
    a tensor...)."""


OTHER = _Other()


class _Types:
    """Just enough typing to say which config class ``x`` is in ``x.field``.

    A type is a config class; ``("seq", cls)`` for a list of them; ``("obj", name)`` for an
    instance of a class of the scanned code, whose ``self.x = ...`` assignments say what its
    attributes are (``self.cfg = cfg`` with ``cfg: DataConfig``); ``OTHER``; or None: unknown.
    It comes from annotations, ``self``, assignments, ``for`` over a list of configs,
    ``a or b``, constructor calls and ``from_dict(Cls, ...)``."""

    def __init__(self, classes: list[type], class_names: set[str]):
        self.by_name = {cls.__name__: cls for cls in classes}
        # A subclass reads its base's fields (LossWeights is a LossConfig with weights).
        self.by_name.update({sub.__name__: cls for cls in classes for sub in cls.__subclasses__()})
        self.class_names = class_names - set(self.by_name)
        self.attrs: dict[str, dict] = {}  # class name -> attribute -> type
        self.fields = {}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            self.fields[cls] = {f.name: self._of_hint(hints[f.name]) for f in dataclasses.fields(cls)}

    def _of_hint(self, hint):
        configs = set(self.by_name.values())
        if hint in configs:
            return hint
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (list, tuple) and args and args[0] in configs:
            return ("seq", args[0])
        if type(None) in args and any(a in configs for a in args):
            return next(a for a in args if a in configs)
        return OTHER

    def of_name(self, name: str | None):
        if name in self.by_name:
            return self.by_name[name]
        return ("obj", name) if name in self.class_names else None

    def annotation(self, node):
        """The type an annotation names; None when it says nothing (no annotation, Any)."""
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.annotation(ast.parse(node.value, mode="eval").body)
        if isinstance(node, ast.BinOp):  # X | None
            sides = [self.annotation(node.left), self.annotation(node.right)]
            return next((t for t in sides if t not in (None, OTHER)), OTHER)
        if isinstance(node, ast.Subscript):
            inner = self.annotation(node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice)
            return ("seq", inner) if isinstance(inner, type) else OTHER
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
        if name in ("Any", "object", None):
            return None
        return self.of_name(name) or OTHER

    def of(self, node, env: dict):
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.of(node.value, env)
            if isinstance(owner, type):
                return self.fields[owner].get(node.attr)  # None: a method or property
            if isinstance(owner, tuple) and owner[0] == "obj":
                return self.attrs.get(owner[1], {}).get(node.attr)
            return None
        if isinstance(node, (ast.BoolOp, ast.IfExp)):  # cfg or CheckpointConfig(), a if c else b
            options = node.values if isinstance(node, ast.BoolOp) else [node.body, node.orelse]
            found = {self.of(option, env) for option in options} - {None}
            return found.pop() if len(found) == 1 else None
        if isinstance(node, ast.Subscript):
            seq = self.of(node.value, env)
            return seq[1] if isinstance(seq, tuple) and seq[0] == "seq" else None
        if isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if func in ("from_dict", "load_config", "config_from_args") and node.args:
                name = node.args[0].id if isinstance(node.args[0], ast.Name) else None
                return self.by_name.get(name)
            return self.of_name(func)
        return None


def _bindings(func, types: _Types, env: dict, attrs: dict) -> None:
    """Add the names ``func`` binds to a known type to ``env``, and the types of the ``self.x``
    it assigns to ``attrs`` (flow-insensitive, two passes)."""
    args = func.args
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        typed = types.annotation(arg.annotation)
        if typed is not None:
            env[arg.arg] = typed
    for _ in range(2):
        for node in ast.walk(func):
            if isinstance(node, (ast.For, ast.comprehension)):
                seq = types.of(node.iter, env)
                if isinstance(seq, tuple) and seq[0] == "seq" and isinstance(node.target, ast.Name):
                    env[node.target.id] = seq[1]
                continue
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                pairs = [(node.targets[0], node.value)]
                if isinstance(node.value, ast.Tuple) and isinstance(node.targets[0], ast.Tuple):
                    pairs = list(zip(node.targets[0].elts, node.value.elts))  # a, b = x, y
                pairs = [(target, types.of(value, env)) for target, value in pairs]
            elif isinstance(node, ast.AnnAssign):
                pairs = [(node.target, types.annotation(node.annotation)
                          or (node.value and types.of(node.value, env)))]
            else:
                continue
            for target, typed in pairs:
                if typed is None:
                    continue
                if isinstance(target, ast.Name):
                    env[target.id] = typed
                elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                      and target.value.id == "self"):
                    attrs[target.attr] = typed


def _functions(tree):
    """(function, name of the class it is a method of, or None) for every function in ``tree``;
    module-level statements come as one function of their own."""
    loose = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in ast.walk(node):
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield item, node.name
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, None
        else:
            loose.append(node)
    yield ast.FunctionDef(name="<module>", args=ast.arguments([], [], None, [], [], None, []),
                          body=loose, decorator_list=[]), None


def fields_read(classes: list[type], sources: dict[str, str] | None = None) -> set[tuple[type | None, str]]:
    """(config class, field) for every read whose receiver's type is known; (None, field) when
    it is not (such a read counts for every config with a field of that name)."""
    if sources is None:
        sources = {str(p): p.read_text() for folder in SCANNED for p in sorted((REPO / folder).rglob("*.py"))}
    trees = [ast.parse(text, filename=path) for path, text in sources.items()]
    class_names = {n.name for tree in trees for n in tree.body if isinstance(n, ast.ClassDef)}
    types = _Types(classes, class_names)

    def environment(func, owner):
        env: dict = {"self": types.of_name(owner)} if owner else {}
        _bindings(func, types, env, types.attrs.setdefault(owner, {}) if owner else {})
        return env

    for _ in range(2):  # what the attributes of the scanned classes are, through each other
        for tree in trees:
            for func, owner in _functions(tree):
                environment(func, owner)

    reads: set = set()
    for tree in trees:
        for func, owner in _functions(tree):
            if owner in types.by_name and func.name in CHECK_METHODS:
                continue
            env = environment(func, owner)
            for node in ast.walk(func):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    receiver, name = node.value, node.attr
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                      and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                      and isinstance(node.args[1].value, str)):
                    receiver, name = node.args[0], node.args[1].value
                else:
                    continue
                typed = types.of(receiver, env)
                if isinstance(typed, type):
                    reads.add((typed, name))
                elif typed is None:
                    reads.add((None, name))
    return reads


def unread_fields(classes: list[type], sources: dict[str, str] | None = None) -> list[str]:
    reads = fields_read(classes, sources)
    untyped = {name for owner, name in reads if owner is None}
    return [
        f"{cls.__module__}.{cls.__name__}.{field.name}"
        for cls in classes
        for field in dataclasses.fields(cls)
        if (cls, field.name) not in reads and field.name not in untyped
        and f"{cls.__name__}.{field.name}" not in ALLOWED_UNREAD
    ]


def test_the_walk_reaches_nested_list_and_optional_configs():
    names = {cls.__name__ for cls in config_classes()}
    # StageConfig sits in a list, CheckpointConfig two levels down, ImageTransformConfig in DataConfig.
    assert {"StageConfig", "CheckpointConfig", "ImageTransformConfig", "VocabConfig", "LossConfig",
            "AdversarialConfig", "BuildConfig", "SearchConfig"} <= names


def test_every_config_field_is_read_by_some_code():
    unread = unread_fields(config_classes())
    assert not unread, (
        "config fields that no code in cmr/, launch/ or shards/ reads (outside validate): "
        f"{unread}; wire them up or remove them"
    )


def test_the_allowlist_names_real_fields():
    fields = {f"{cls.__name__}.{f.name}" for cls in config_classes() for f in dataclasses.fields(cls)}
    assert set(ALLOWED_UNREAD) <= fields, set(ALLOWED_UNREAD) - fields


@dataclasses.dataclass
class ProbeInner:
    every_n: int = 1  # also a field of ProbeOuter: only a typed read tells them apart


@dataclasses.dataclass
class ProbeOuter:
    inner: ProbeInner = dataclasses.field(default_factory=ProbeInner)
    every_n: int = 1
    checked_only: int = 0


PROBE_SOURCE = """
class ProbeOuter:
    def validate(self):
        assert self.checked_only >= 0 and self.every_n > 0

def use(cfg: ProbeOuter):
    return cfg.inner.every_n
"""


def test_a_field_only_validate_reads_or_of_the_same_name_elsewhere_is_unread():
    probes = config_classes([ProbeOuter])
    unread = unread_fields(probes, {"probe.py": PROBE_SOURCE})
    assert unread == [f"{__name__}.ProbeOuter.every_n", f"{__name__}.ProbeOuter.checked_only"]
    # A read through an untyped receiver counts for every config with that field name.
    assert unread_fields(probes, {"probe.py": PROBE_SOURCE + "\ndef f(x):\n    return x.checked_only + x.every_n\n"}) == []
