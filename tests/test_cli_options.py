"""No option is ignored: every flag of every ``trustpot`` subcommand changes the options its
``resolve`` step builds, or is rejected with an error that names it.

Flags are discovered from the parsers that :func:`trustpot.cli.main.build_parser` builds, so a
new flag that is not wired into its command's options fails here. Commands with several
modes (``uq fit METHOD``, ``data split --rule``, ``scales run --testbed``) also reject every
flag of another mode, naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustpot.cli.main import build_parser
from trustpot.errors import ConfigError

Leaf = tuple[tuple[str, ...], argparse.ArgumentParser]

#: Extra arguments a command needs to resolve at all, one list per mode it has: a flag must be
#: effective in at least one of them, and in each either effective or rejected by name.
BASES: dict[tuple[str, ...], list[list[str]]] = {
    ("uq", "fit", "ensemble"): [["--train", "t.xyz"], ["--members", "a.ckpt", "b.ckpt"]],
    ("uq", "fit", "mc-dropout"): [["--train", "t.xyz"], ["--from", "a.ckpt"]],
    ("uq", "fit", "probe"): [["--from", "a.ckpt", "--calibration", "c.xyz"]],
    ("uq", "fit", "perturb"): [["--from", "a.ckpt", "--train", "t.xyz"]],
    ("uq", "fit", "llpr"): [
        ["--from", "a.ckpt", "--train", "t.xyz"],
        ["--from", "a.ckpt", "--train", "t.xyz", "--calibration", "c.xyz"],
    ],
    ("uq", "fit", "shallow-ensemble"): [["--from", "a.ckpt", "--train", "t.xyz"]],
    ("data", "split"): [
        ["--rule", "random", "--sizes", "train=3"],
        ["--rule", "info-key", "--assign", "test=A"],
        ["--rule", "composition", "--assign", "test=CH4O"],
        ["--rule", "temperature", "--threshold", "300"],
    ],
    ("scales", "run"): [
        ["--train", "a.xyz", "--test", "b.xyz"],
        ["--testbed", "dft"],
        ["--testbed", "openmm"],
    ],
    ("finetune",): [
        [],
        ["--strategy", "freeze"],
        ["--strategy", "llrd"],
        ["--strategy", "mft", "--replay", "r.xyz"],
        ["--target", "homo_lumo_gap"],
    ],
    ("learn",): [
        [],
        ["--engine", "nbody", "--particles", "3"],
        ["--engine", "nacl-water", "--pairs", "1"],
        ["--uq", "probe"],
        ["--uq", "random"],
    ],
}
#: Extra arguments under which a flag that only acts with another one takes effect (not
#: modes: no flag is rejected for being of "another mode"). Without them it is rejected by name.
REQUIRES: dict[tuple[str, ...], list[list[str]]] = {
    ("md",): [["--harvest", "force-std>0.2"]],  # --harvest-file
}
#: The flag that selects the mode of a command (exercised through BASES).
MODE_FLAGS = {
    ("data", "split"): "--rule",
    ("scales", "run"): "--testbed",
    ("finetune",): "--strategy",
    ("learn",): "--engine",
}

#: Values of string options that must be meaningful: (base, other).
TEXT_VALUES: dict[str, tuple[str, str]] = {
    "model": ("schnet", "egnn"),
    "models": ("schnet", "painn"),
    "overrides": ("train.lr=0.5", "model.hypers.n_features=8"),
    "override": ("train.lr=0.5", "model.hypers.n_features=8"),
    "sizes": ("train=3", "test=0.5"),
    "assign": ("test=A", "valid=B,C"),
    "device": ("cpu", "cuda:1"),
    "short_backbone": ("schnet", "egnn"),
    "long_backbone": ("schnet", "egnn"),
    "smiles": ("CCO", "CC"),
    "elements": ("H", "O"),
    "task": ("all", "duplication"),
    "rest": ("none", "valid"),
    "warn": ("force-std>0.2", "reliability<0.5"),
    "harvest": ("force-std>0.2", "frame-force-std>0.1"),
    "halt": ("force-error>0.15@0.95", "reliability<0.5"),
}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


PARSER = build_parser()
LEAVES = dict(_leaves(PARSER))


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def _name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _values(action: argparse.Action, other: bool, tmp: Path) -> list[str]:
    """Command-line values for ``action``: a base value, or (``other``) a different one."""
    if action.nargs == 0:
        return []
    k = int(other)
    if action.choices:
        choices = list(action.choices)
        one = [str(choices[min(k, len(choices) - 1)])]
    elif action.dest == "config":
        path = tmp / f"run{k}.yaml"
        path.write_text(f"train:\n  epochs: {3 + k}\n")
        one = [str(path)]
    elif action.dest in TEXT_VALUES:
        one = [TEXT_VALUES[action.dest][k]]
    elif action.type is int:
        one = ["3", "11"][k : k + 1]
    elif action.type is float:
        one = ["0.31", "0.77"][k : k + 1]
    else:
        one = [f"{action.dest}{k}.xyz"]
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many and other and not action.choices:
        return [*one, one[0].replace("0", "9").replace("3", "4")]
    return one


def _argv(action: argparse.Action, values: list[str]) -> list[str]:
    return [action.option_strings[-1], *values] if action.option_strings else values


def _base_argv(
    path: tuple[str, ...],
    parser: argparse.ArgumentParser,
    tmp: Path,
    swap: argparse.Action | None = None,
    values: list[str] | None = None,
) -> list[str]:
    """Positionals first, then the required flags, with base values (``values`` for ``swap``)."""
    positionals: list[str] = []
    flags: list[str] = []
    for action in _flags(parser):
        given = values if action is swap and values is not None else _values(action, False, tmp)
        if not action.option_strings:
            positionals += given
        elif action.required:
            flags += _argv(action, given)
    return [*path, *positionals, *flags]


def _resolve(argv: list[str]) -> Any:
    args = PARSER.parse_args(argv)
    return args.resolve(args)


def _current(resolved: Any, dest: str) -> Any:
    """The value of option ``dest`` in resolved options (a dataclass, or one inside a dict or
    a tuple), else None."""
    if isinstance(resolved, dict):
        items = list(resolved.values())
    elif isinstance(resolved, tuple):
        items = list(resolved)
    elif dataclasses.is_dataclass(resolved):
        items = [getattr(resolved, f.name) for f in dataclasses.fields(resolved)]
    else:
        items = []
    for item in [resolved, *items]:
        if dataclasses.is_dataclass(item) and hasattr(item, dest):
            return getattr(item, dest)
    return None


def _cases() -> Iterator[Any]:
    for path, parser in LEAVES.items():
        for action in _flags(parser):
            if MODE_FLAGS.get(path) == _name(action):
                continue
            if action.choices and len(action.choices) < 2 and not action.option_strings:
                continue  # a positional with one possible value (``config show``)
            yield pytest.param(path, _name(action), id=" ".join([*path, _name(action)]))


@pytest.mark.parametrize(("path", "flag"), list(_cases()))
def test_every_flag_changes_the_options(path: tuple[str, ...], flag: str, tmp_path: Path) -> None:
    parser = LEAVES[path]
    action = next(a for a in _flags(parser) if _name(a) == flag)
    changed_somewhere = False
    for extra in BASES.get(path, [[]]) + REQUIRES.get(path, []):
        base = [*_base_argv(path, parser, tmp_path), *extra]
        before = _resolve(base)
        if action.choices and action.option_strings:  # every choice but the one in force
            current = _current(before, action.dest)
            tries = [[str(c)] for c in action.choices if c != current or current is None]
        else:
            tries = [_values(action, True, tmp_path)]
        outcomes = []
        for values in tries:
            if action.required or not action.option_strings:  # swap the base value
                argv = [*_base_argv(path, parser, tmp_path, action, values), *extra]
            else:
                argv = base + _argv(action, values)
            try:
                after = _resolve(argv)
            except ConfigError as err:
                assert flag in str(err), f"{argv}: rejected without naming {flag}: {err}"
                outcomes.append("rejected")
                continue
            outcomes.append("changed" if after != before else "ignored")
        assert "ignored" not in outcomes or "changed" in outcomes, (
            f"{' '.join(path)} {flag} (base {extra}): resolved options do not change"
        )
        changed_somewhere |= "changed" in outcomes
    assert changed_somewhere, f"{' '.join(path)} {flag}: no mode uses it"


def _mode_cases() -> Iterator[Any]:
    for path, bases in BASES.items():
        for k, extra in enumerate(bases):
            yield pytest.param(path, k, id=" ".join([*path, *extra[:2]]))


@pytest.mark.parametrize(("path", "k"), list(_mode_cases()))
def test_flags_of_other_modes_are_rejected_by_name(
    path: tuple[str, ...], k: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag of another method/rule/testbed fails with an error naming it."""
    parser = LEAVES[path]
    base = [*_base_argv(path, parser, tmp_path), *BASES[path][k]]
    _resolve(base)
    if len(path) == 3 and path[:2] == ("uq", "fit"):
        own = {s for a in _flags(parser) for s in a.option_strings}
        foreign = {
            a.option_strings[-1]: a
            for other, p in LEAVES.items()
            if other[:2] == ("uq", "fit") and other != path
            for a in _flags(p)
            if a.option_strings and not own & set(a.option_strings)
        }
        assert foreign, f"{path}: every method takes the same flags?"
        for flag, action in foreign.items():
            with pytest.raises(SystemExit) as exc:
                _resolve([*base, flag, *_values(action, True, tmp_path)])
            assert exc.value.code == 2
            assert flag in capsys.readouterr().err
        return
    # one parser for every mode: the flags another mode uses must be rejected by name
    rejected = 0
    for action in _flags(parser):
        flag = _name(action)
        if not action.option_strings or flag == MODE_FLAGS[path] or flag in BASES[path][k]:
            continue
        try:
            _resolve([*base, *_argv(action, _values(action, True, tmp_path))])
        except ConfigError as err:
            assert flag in str(err)
            rejected += 1
    assert rejected, f"{path} {BASES[path][k]}: no flag of another mode is rejected"


def test_walk_finds_every_command() -> None:
    """The walk reaches the per-method, per-rule and per-testbed commands."""
    names = {" ".join(p) for p in LEAVES}
    for expected in ("train", "eval", "md", "uq fit probe", "uq fit perturb", "uq eval",
                     "data split", "scales run", "bench compositional", "data nbody"):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize(
    ("rule", "flags", "params"),
    [
        ("random", ["--sizes", "train=18", "test=6", "--seed", "2"],
         {"sizes": {"train": 18.0, "test": 6.0}}),
        ("info-key", ["--assign", "test=odd"],
         {"key": "config_type", "assign": {"test": ["odd"]}, "rest": "train"}),
        ("composition", ["--assign", "test=CH4O", "--rest", "none"],
         {"assign": {"test": ["CH4O"]}, "rest": "none"}),
    ],
)  # fmt: skip
def test_split_manifest_records_exactly_the_options_used(
    rule: str, flags: list[str], params: dict[str, Any], ethanol_file: Path, tmp_path: Path
) -> None:
    import json

    from trustpot.cli.main import main

    out = tmp_path / "split.json"
    assert (
        main(["data", "split", str(ethanol_file), "--rule", rule, *flags, "--out", str(out)]) == 0
    )
    manifest = json.loads(out.read_text())
    assert manifest["params"] == params
    assert manifest["seed"] == (2 if rule == "random" else None)
    assert main(["data", "split", str(ethanol_file), "--rule", rule, *flags, "--threshold", "400",
                 "--out", str(out)]) == 2  # fmt: skip
