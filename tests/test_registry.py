"""The one Registry: the same behaviour over models, ops, search spaces and strategies, through the
functions callers use, and the class itself."""
from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest
import torch.nn as nn

from nas_dose.errors import NasDoseError
from nas_dose.models import create_model, list_models, register_model, small_kwargs
from nas_dose.models.registry import MODELS
from nas_dose.registry import Registry
from nas_dose.search_spaces import SearchSpace, get_op, get_space, list_ops, list_spaces, register_op, register_space
from nas_dose.search_spaces.ops import OPS
from nas_dose.search_spaces.space import SPACES
from nas_dose.strategies import Strategy, get_strategy, list_strategies, register_strategy
from nas_dose.strategies.base import STRATEGIES


class _Search(Strategy):
    def run(self, ctx):
        return []


@dataclass(frozen=True)
class Public:
    """One registry as its callers see it: the public functions, a built-in name, a fresh object
    it accepts, the plugin attribute of its kind and what an object of the wrong type is not."""

    registry: Registry
    register: Callable[[str], Callable[[Any], Any]]
    get: Callable[[str], Any]
    listing: Callable[[], list[str]]
    builtin: str
    fresh: Callable[[], Any]
    attr: str
    what: str


PUBLIC = {
    # every model name (list_models lists the dose predictors: not a prior's autoencoder, tests/test_prior.py)
    "model": Public(MODELS, register_model, lambda name: create_model(name, **small_kwargs(name)), MODELS.names,
                    "unet3d", lambda: (lambda: nn.Identity()), "model", "a class or function"),
    "op": Public(OPS, lambda name: register_op(name, "cell"), get_op, list_ops, "conv",
                 lambda: (lambda c_in, c_out: nn.Identity()), "op", "a registered op"),
    "search space": Public(SPACES, register_space, get_space, list_spaces, "lenas",
                           lambda: type("Space", (SearchSpace,), {}), "Space", "a SearchSpace subclass"),
    "strategy": Public(STRATEGIES, register_strategy, get_strategy, list_strategies, "random",
                       lambda: type("Search", (_Search,), {}), "Search", "a Strategy subclass"),
}

PLUGIN = '''
"""Registers one object of each kind as "plugin_thing", as a plugin does; Loose* are not registered."""
import torch.nn as nn

from nas_dose.models import register_model
from nas_dose.search_spaces import SearchSpace, register_op, register_space
from nas_dose.strategies import Strategy, register_strategy


@register_model("plugin_thing")
def model():
    return nn.Identity()


@register_op("plugin_thing", "cell")
def op(c_in, c_out):
    """Pass-through."""
    return nn.Identity()


@register_space("plugin_thing")
class Space(SearchSpace):
    pass


@register_strategy("plugin_thing")
class Search(Strategy):
    def run(self, ctx):
        return []


def LooseModel():
    return nn.Identity()


def LooseOp(c_in, c_out):
    return nn.Identity()


class LooseSpace(Space):
    pass


class LooseSearch(Search):
    pass
'''
LOOSE = {"model": "LooseModel", "op": "LooseOp", "search space": "LooseSpace", "strategy": "LooseSearch"}
_modules = itertools.count()


@pytest.fixture(params=list(PUBLIC))
def kind(request, monkeypatch) -> str:
    """Each registry's kind; what a test registers into any of them is dropped afterwards."""
    for public in PUBLIC.values():
        monkeypatch.setattr(public.registry, "_entries", dict(public.registry._entries))
        monkeypatch.setattr(public.registry, "_builtins", dict(public.registry._builtins))
    return request.param


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Iterator[str]:
    """The name of a fresh, not yet imported plugin module (PLUGIN)."""
    name = f"registry_plugin_{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_an_unknown_name_is_an_error_listing_the_known_ones(kind):
    public = PUBLIC[kind]
    known = public.listing()
    assert public.builtin in known
    with pytest.raises(NasDoseError, match=re.escape(f"unknown {kind} 'nope' (known: {', '.join(known)}; "
                                                     "or give package.module:attr)")):
        public.get("nope")


def test_a_taken_name_is_an_error_the_same_registration_again_is_not(kind):
    public = PUBLIC[kind]
    obj = public.fresh()
    assert public.register("twice")(obj) is obj
    public.register("twice")(obj)
    for name in ["twice", public.builtin]:
        with pytest.raises(NasDoseError, match=re.escape(f"{kind} '{name}': already registered by ")):
            public.register(name)(public.fresh())
    with pytest.raises(NasDoseError, match=re.escape(f"{kind} 'broken': 42 is not a")):
        public.register("broken")(42)


def test_an_import_path_is_accepted(kind, plugin):
    public = PUBLIC[kind]
    path = f"{plugin}:{public.attr}"
    public.get(path)
    entry = public.registry.get(path)
    assert entry.name == "plugin_thing" and entry.obj is getattr(sys.modules[plugin], public.attr)
    assert "plugin_thing" in public.listing()  # importing the plugin registered it


def test_an_unregistered_object_by_import_path_goes_by_its_path(kind, plugin):
    public = PUBLIC[kind]
    path = f"{plugin}:{LOOSE[kind]}"
    if kind == "op":  # an op's slot kinds come from its registration
        with pytest.raises(NasDoseError, match=re.escape(f"op '{path}': 'LooseOp' is not a registered op")):
            public.get(path)
        return
    public.get(path)
    entry = public.registry.get(path)
    assert entry.name == path and path not in public.listing()
    if kind != "model":  # spaces and strategies record the name that finds them again
        assert entry.obj.name == path


def test_import_path_errors(kind, plugin):
    public = PUBLIC[kind]
    for path, problem in [("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz' (No module"),
                          (f"{plugin}:Nothing", f"module '{plugin}' has no attribute 'Nothing'"),
                          ("math:pi", f"'pi' is not {public.what}")]:
        with pytest.raises(NasDoseError, match=re.escape(f"{kind} '{path}': {problem}")):
            public.get(path)


def test_the_listing_is_sorted(kind):
    public = PUBLIC[kind]
    for name in ["zz_last", "aa_first"]:
        public.register(name)(public.fresh())
    names = public.listing()
    assert names == sorted(names) and {"aa_first", "zz_last", public.builtin} <= set(names)


def test_a_builtin_is_listed_at_once_and_imported_on_first_use(kind, plugin):
    public = PUBLIC[kind]
    public.registry._builtins["plugin_thing"] = plugin
    assert "plugin_thing" in public.listing() and plugin not in sys.modules
    public.get("plugin_thing")
    assert public.registry.get("plugin_thing").obj is getattr(sys.modules[plugin], public.attr)


def test_importing_nasdose_loads_no_strategy_and_no_nni(tmp_path):
    code = ("import sys, nas_dose.cli, nas_dose.cli.search, nas_dose.strategies\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nni' or m in "
            "{'nas_dose.strategies.nni_backend', 'nas_dose.strategies.differentiable'}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command, listing", [("search", lambda: list_spaces() + list_strategies()),
                                              ("train", list_models)])
def test_help_lists_the_registered_names(command, listing, capsys):
    from nas_dose.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in listing()), out


# ---------------------------------------------------------------------------------------------
# the class itself


class _Base:
    name = ""


class _Child(_Base):
    pass


def test_register_get_and_metadata():
    things: Registry[Callable[..., Any]] = Registry("thing")

    @things.register("one", small={"n": 1})
    def one() -> int:
        return 1

    entry = things.get("one")
    assert entry.name == "one" and entry.obj is one and entry.meta == {"small": {"n": 1}}
    with pytest.raises(NasDoseError, match=re.escape("thing 'one': already registered by ")):
        things.register("one", small={"n": 2})(one)  # other metadata: another registration
    with pytest.raises(NasDoseError, match=re.escape("where: unknown thing 'two' (known: one; or give")):
        things.get("two", source="where")


def test_a_base_class_and_names(monkeypatch):
    monkeypatch.setattr(_Base, "name", "")
    kinds: Registry[type[_Base]] = Registry("kind", base=_Base, named=True)
    kinds.register("child")(_Child)
    assert _Child.name == "child" and kinds.get(f"{__name__}:_Child").name == "child"
    assert kinds.get(f"{__name__}:_Base").obj is _Base and _Base.name == f"{__name__}:_Base"
    for bad in [object, _Child()]:
        with pytest.raises(NasDoseError, match="kind 'bad': .* is not a _Base subclass"):
            kinds.register("bad")(bad)
    with pytest.raises(NasDoseError, match="'Registry' is not a _Base subclass"):
        kinds.get("nas_dose.registry:Registry")


def test_import_paths_reach_into_attributes_and_registered_objects_keep_their_name():
    things: Registry[Callable[..., Any]] = Registry("thing")
    things.register("sqrt")(math.sqrt)
    assert things.get("math:sqrt").name == "sqrt"
    assert things.get("os:path.join").obj is os.path.join
    with pytest.raises(NasDoseError, match=re.escape("thing 'os:path.nope': module 'os' has no attribute 'path.nope'")):
        things.get("os:path.nope")
    strict: Registry[Callable[..., Any]] = Registry("op", paths_need_registration=True)
    with pytest.raises(NasDoseError, match="'sqrt' is not a registered op"):
        strict.get("math:sqrt")


LAZY_MODULE = """
from registry_holder import LAZY


@LAZY.register("lazy")
def lazy():
    return 1
"""


def test_builtins_load_on_first_use_and_their_names_are_taken(tmp_path, monkeypatch):
    (tmp_path / "registry_lazy_thing.py").write_text(LAZY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    holder = ModuleType("registry_holder")
    holder.LAZY = lazy = Registry("thing", builtins={"lazy": "registry_lazy_thing"})
    monkeypatch.setitem(sys.modules, "registry_holder", holder)
    monkeypatch.delitem(sys.modules, "registry_lazy_thing", raising=False)
    assert lazy.names() == ["lazy"] and "registry_lazy_thing" not in sys.modules
    with pytest.raises(NasDoseError, match="thing 'lazy': already registered by registry_lazy_thing.lazy"):
        lazy.register("lazy")(print)  # loads the built-in first
    assert lazy.get("lazy").obj() == 1
    sys.modules.pop("registry_lazy_thing")
    broken = Registry("thing", builtins={"gone": "no_such_module_xyz"})
    with pytest.raises(NasDoseError, match="thing 'gone': cannot import module 'no_such_module_xyz'"):
        broken.get("gone")
