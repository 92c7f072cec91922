"""The one registry: names are case-normalised, built-ins are never hidden, plug-ins load."""

from __future__ import annotations

from typing import Any

import pytest

from trustpot import registry
from trustpot.errors import ConfigError


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registered", {kind: {} for kind in registry.KINDS})
    monkeypatch.setattr(registry, "_aliases", {kind: {} for kind in registry.KINDS})
    monkeypatch.setattr(registry, "_plugins_loaded", True)


@pytest.mark.parametrize("spelling", ["painn", "PaiNN", "PAINN", " painn "])
def test_lookup_is_case_normalised(spelling: str) -> None:
    from trustpot.models.painn import PaiNN

    assert registry.lookup("backbone", spelling) is PaiNN


def test_aliases_and_underscores() -> None:
    assert registry.canonical_name("backbone", "DeepSet_MoE") == "deepset-moe"
    assert registry.canonical_name("backbone", "EN-GNN") == "egnn"
    assert registry.canonical_name("uq", "MC_Dropout") == "mc-dropout"


def test_every_kind_lists_its_builtins() -> None:
    assert {"schnet", "painn", "egnn", "deepset-moe"} <= set(registry.names("backbone"))
    assert {"potential", "scale-mixture", "uq:probe"} <= set(registry.names("model"))
    assert {"ensemble", "mc-dropout", "probe", "perturb", "llpr", "shallow-ensemble"} == set(
        registry.names("uq")
    )
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert registry.lookup(kind, name) is not None


def test_plugin_does_not_hide_builtins(clean_registry: None) -> None:
    @registry.register("backbone", "MyNet", aliases=("My_Alias",))
    class MyNet:
        pass

    assert registry.lookup("backbone", "mynet") is MyNet
    assert registry.lookup("backbone", "MY-ALIAS") is MyNet
    assert "painn" in registry.names("backbone") and "mynet" in registry.names("backbone")
    assert registry.lookup("backbone", "schnet").__name__ == "SchNet"


def test_taking_a_builtin_name_needs_replace(clean_registry: None) -> None:
    class Fake:
        pass

    with pytest.raises(ConfigError, match="already registered"):
        registry.register("backbone", "PaiNN")(Fake)
    registry.register("backbone", "painn", replace=True)(Fake)
    assert registry.lookup("backbone", "painn") is Fake


def test_unknown_names_and_kinds() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'nope'; known: .*painn"):
        registry.lookup("backbone", "nope")
    with pytest.raises(ConfigError, match="unknown registry kind"):
        registry.names("optimizer")


def test_entry_points_are_loaded(monkeypatch: pytest.MonkeyPatch, clean_registry: None) -> None:
    calls: list[str] = []

    class Entry:
        name = "demo"
        value = "demo.plugin:setup"

        def load(self) -> Any:
            def setup() -> None:
                calls.append("setup")
                registry.register("uq", "demo-method")(type("Demo", (), {}))

            return setup

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [Entry()])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "demo-method" in registry.names("uq")
    registry.names("uq")
    assert calls == ["setup"]


def test_broken_plugin_is_named(monkeypatch: pytest.MonkeyPatch, clean_registry: None) -> None:
    class Broken:
        name = "broken"
        value = "broken:setup"

        def load(self) -> Any:
            raise ImportError("no module named broken")

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [Broken()])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(ConfigError, match=r"plug-in 'broken'.*failed to load"):
        registry.names("backbone")
