"""The README against the command line it documents: every option it gives a command is one that command
takes, and every option of a command is in the section on that command (its Python example runs in test_search.py)."""

import re
from pathlib import Path

import click
import pytest

from vlpcache.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND = re.compile(r"vlpcache (models (?:list|fetch|verify)|[a-z]+)([^\n`|]*)")  # up to the end of a code span or cell
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command_params(words: str) -> list[click.Parameter] | None:
    """The parameters of `vlpcache WORDS`; None when there is no such command."""
    command = cli
    for word in words.split():
        if not isinstance(command, click.Group) or word not in command.commands:
            return None
        command = command.commands[word]
    return command.params


def command_options(words: str) -> set[str] | None:
    """The option names (--x and --no-x both, short ones too) of `vlpcache WORDS`; None when there is no such command."""
    params = command_params(words)
    if params is None:
        return None
    return {name for param in params if isinstance(param, click.Option) for name in (*param.opts, *param.secondary_opts)} | {"--help"}


def documented_uses() -> list[tuple[str, str]]:
    """(command, option) for each option written after `vlpcache COMMAND` on one line of the README."""
    uses = []
    for match in COMMAND.finditer(README.read_text(encoding="utf-8")):
        uses += [(match.group(1), option) for option in OPTION.findall(match.group(2))]
    return uses


def test_the_readme_documents_commands_with_options_they_take():
    uses = documented_uses()
    assert {"extract", "pretrain", "search", "index", "eval"} <= {command for command, _ in uses}  # the parse found them
    unknown = sorted({(command, option) for command, option in uses
                      if command_options(command) is not None and option not in command_options(command)})
    assert unknown == [], "the README gives options these commands do not take"


def command_section(command: str) -> str:
    """The README's section(s) on `vlpcache COMMAND`: those whose heading names it (`vlpcache extract ROOT...`,
    `search` in "`vlpcache index`, `search`, `eval`"); the models commands' is "Detector weights"."""
    sections = re.split(r"(?m)^(?=## )", README.read_text(encoding="utf-8"))
    word = command.split()[0]
    heading = re.compile(r"Detector weights" if word == "models" else rf"`(vlpcache )?{word}[` ]")
    return "\n".join(section for section in sections if heading.search(section.splitlines()[0]))


def mentions(text: str, option: str) -> bool:
    """Whether `option` is in `text` as itself (--frames not found in --frames-per-second)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("command", ["extract", "pretrain", "search", "index", "eval", "compare", "inspect", "serve",
                                     "models list", "models fetch", "models verify"])
def test_every_option_of_a_command_is_in_its_section_of_the_readme(command):
    section = command_section(command)
    assert section.count("\n") > 10, f"vlpcache {command}: no section of the README names it in its heading"
    # a flag pair is documented by either of its names (--global-path by --no-global-path)
    flags = [param for param in command_params(command) if isinstance(param, click.Option)]
    missing = [param.opts[0] for param in flags if not any(mentions(section, name) for name in (*param.opts, *param.secondary_opts))]
    assert missing == [], f"vlpcache {command}: options its section of the README does not mention"


def test_an_option_is_found_as_itself_in_its_own_commands_section():
    assert mentions("`--frames T`", "--frames") and not mentions("--frames-per-second", "--frames")
    assert not mentions("--no-frames", "--frames") and mentions("(--frames)", "--frames")
    assert "--qbnorm" in command_section("search") and "--qbnorm" not in command_section("pretrain")


@pytest.mark.parametrize("command, option", [("search", "--nope"), ("models fetch", "--frames")])
def test_an_option_a_command_does_not_take_is_found(command, option):
    assert option not in command_options(command)
