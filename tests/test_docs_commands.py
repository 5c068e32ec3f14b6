"""The command lines the docs show against the CLI itself: every ``edgeinspect ...`` in the READMEs names a real
command, only options that command takes, choices it accepts, and ``--set`` keys its configuration has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest

from edgeinspect.cli import main
from edgeinspect.config import config_names, default_config, preset_names
from edgeinspect.export.formats import FORMATS, PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/README.md", "ARCHITECTURE.md", "DEVELOPERS.md", *sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
CONTEXT = click.Context(main)


def is_engine_selector(value: str) -> bool:
    """``auto``, ``torch`` (evaluate) or ``FORMAT[:PRECISION]`` of the format table."""
    fmt, _, precision = value.partition(":")
    return value in ("auto", "torch") or (fmt in FORMATS and precision in ("", *PRECISIONS))


# parameters that are free strings to click and checked by the product: what they accept
VALUES = {("export", "fmt"): lambda v: v in FORMATS or v == "all",
          ("export", "precision"): lambda v: v in PRECISIONS or v == "all",
          ("train", "family"): lambda v: v in config_names() and v != "export",
          **{(command, "preset"): lambda v: v in preset_names() for command in ("train", "show")},
          **{(command, "engine"): is_engine_selector for command in ("predict", "serve", "evaluate")},
          ("bench", "engines"): is_engine_selector}


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) for each ``edgeinspect`` command in backticks (which may wrap) or on a line of a fenced
    block."""
    found = []
    for name in DOCS:
        prose, fenced = [], False
        for line in (ROOT / name).read_text().splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced:
                match = re.match(r"\s*(?:\$\s*)?(edgeinspect .*?)\s*(?:&\s*)?(?:#.*)?$", line)
                found += [(name, match.group(1))] if match else []
            else:
                prose.append(line)
        found += [(name, " ".join(span.split())) for span in re.findall(r"`(edgeinspect [^`]*)`", "\n".join(prose))]
    return found


def options(command: click.Command) -> dict[str, click.Option | None]:
    """Every option spelling of ``command`` (``--help`` too), to its option."""
    by_name = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts}
    return by_name | {"--help": None, "-h": None}


def alternatives(token: str) -> list[str]:
    """``a|b`` and ``{a,b}`` (the docs' ways to show a choice) as their alternatives."""
    if token.startswith("{") and token.endswith("}"):
        return token[1:-1].split(",")
    return token.split("|")


def is_placeholder(word: str) -> bool:
    """An upper-case metavariable (B, ROOT, FAMILY), ``<...>``, ``...``: a word the reader replaces."""
    return word.isupper() or word.startswith("<") or "..." in word or not word


def check_set(name: str | None, item: str, where: str) -> None:
    """A ``--set section.key=value`` names a key of configuration ``name`` (its value is not checked: the docs show
    refused values too)."""
    if name is None or is_placeholder(item):
        return
    config: Any = default_config(name)
    for key in item.split("=", 1)[0].strip("'\"").split("."):
        assert isinstance(config, dict) and key in config, f"{where}: --set {item}: {name} has no such key"
        config = config[key]


def check_value(command: click.Command, param: click.Parameter, value: str, where: str) -> None:
    """Each alternative the docs give for a parameter's value is one the command takes."""
    accepts = VALUES.get((command.name, param.name))
    if isinstance(param.type, click.Choice):
        accepts = param.type.choices.__contains__
    for choice in alternatives(value):
        assert is_placeholder(choice) or accepts is None or accepts(choice), (
            f"{where}: {command.name} {param.human_readable_name} does not take {choice}")


def check_command_line(where: str, line: str) -> None:
    """Walk the words of one documented command line through the click groups, checking each option."""
    words = [w.strip("[]") for w in shlex.split(line)[1:] if w.strip("[]") not in ("", "|", "...")]
    command: click.Command = main
    config_name = None
    i = positional = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-") and not is_placeholder(word):
            name, _, inline = word.partition("=")
            known = options(command)
            assert name in known, f"{where}: `{line}`: {command.name} has no option {name}"
            option = known[name]
            if option is not None and not option.is_flag and not option.count:
                value = inline or (words[i + 1] if i + 1 < len(words) else "")
                i += 0 if inline else 1
                if name == "--set":
                    check_set(config_name, value, f"{where}: `{line}`")
                else:
                    check_value(command, option, value, f"{where}: `{line}`")
        elif isinstance(command, click.Group):
            if is_placeholder(word):  # `edgeinspect --registry PATH <command>`
                return
            subcommands = alternatives(word)
            for sub in subcommands:
                assert command.get_command(CONTEXT, sub) is not None, f"{where}: `{line}`: no command {sub}"
            command = command.get_command(CONTEXT, subcommands[0])
            positional = 0
            config_name = "export" if command.name == "export" else None
        else:  # a positional argument: its choices, if it has any
            arguments = [p for p in command.params if isinstance(p, click.Argument)]
            argument = arguments[min(positional, len(arguments) - 1)] if arguments else None
            assert argument is not None, f"{where}: `{line}`: {command.name} takes no argument {word}"
            check_value(command, argument, word, f"{where}: `{line}`")
            if positional == 0 and command.name in ("train", "show") and word in config_names():
                config_name = word  # `train FAMILY`, `config show NAME`
            positional += 1
        i += 1


@pytest.mark.parametrize(("where", "line"), documented_commands())
def test_documented_command_lines_match_the_cli(where: str, line: str) -> None:
    check_command_line(where, line)


def test_the_checker_finds_what_is_wrong() -> None:
    check_command_line("t", "edgeinspect export B --format onnx --precision int8 --set int8.reduce_range=false")
    for bad in ("edgeinspect exports B", "edgeinspect export B --formats onnx", "edgeinspect export B --format pdf",
                "edgeinspect predict B x.png --engine onnx:int4", "edgeinspect serve --frames loose",
                "edgeinspect train patchcore --out B --set model.no_such_key=1", "edgeinspect runs list|drop",
                "edgeinspect train patchcor --out B", "edgeinspect ctl status|halt", "edgeinspect backbones lite0",
                "edgeinspect train patchcore --preset square"):
        with pytest.raises(AssertionError):
            check_command_line("t", bad)


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(doc: Path) -> list[str]:
    """The relative links of ``doc`` (outside code) whose file or heading anchor does not exist."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), flags=re.M)
            if anchor not in {heading_anchor(h) for h in headings}:
                broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("where", DOCS)
def test_documented_links_lead_somewhere(where: str) -> None:
    assert broken_links(ROOT / where) == []


def test_the_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A `b` (c)\n[ok](#a-b-c) [file](b.md) [gone](c.md) [anchor](b.md#nope)\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert [b.split(":")[0] for b in broken_links(tmp_path / "a.md")] == ["c.md", "b.md#nope"]
