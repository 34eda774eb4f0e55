"""The README's command blocks, as the README-execution test runs them.

Every fenced ```bash block of README.md is a step of one walkthrough, run in order in one working directory. An HTML
comment on the lines right before a block changes how it runs (GitHub shows none of them):

    <!-- readme-test: skip REASON -->             not run; the test reports REASON
    <!-- readme-test: replace "OLD" "NEW" -->     run with OLD replaced by NEW (a smaller budget, through a flag the
                                                  README documents)
    <!-- readme-test: env NAME=VALUE -->          run with this environment variable set
    <!-- readme-test: background URL -->          the block's first command is a server: it runs in the background
                                                  until URL answers, the rest of the block runs, then it gets Ctrl-C
    <!-- readme-test: timeout SECONDS -->         how long the block may take (default BLOCK_TIMEOUT_S)
    <!-- readme-test: cleanup "COMMAND" -->       run at the end of the walkthrough even when a step failed
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

#: a guard against a hung block, not a speed target: the audit-campaigns block ran past 600 s on a 2-core machine
#: whose cores a training run shared
BLOCK_TIMEOUT_S = 1500
FENCE_OPEN = "```bash"
FENCE_CLOSE = "```"
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
_HEADING = re.compile(r"^#+\s+(?P<title>.+)$")
KNOWN_DIRECTIVES = ("skip", "replace", "env", "background", "timeout", "cleanup")


class ReadmeDirectiveError(ValueError):
    """A readme-test comment the harness does not understand (named with its line)."""


@dataclass
class ReadmeBlock:
    """One bash block: its script as the README shows it and how the test runs it."""

    number: int
    line: int
    section: str
    script: str
    skip: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    background_url: str | None = None
    timeout_s: float = BLOCK_TIMEOUT_S
    cleanup: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{self.number:02d}-{slug or 'top'}"

    def runnable_script(self) -> str:
        script = self.script
        for old, new in self.replacements:
            if old not in script:
                raise ReadmeDirectiveError(f"README line {self.line}: replace {old!r}: not in the block")
            script = script.replace(old, new)
        return script


def split_background(script: str) -> tuple[str, str]:
    """The first command of a script (with its backslash continuations) and the rest."""
    lines = script.splitlines()
    first: list[str] = []
    for index, line in enumerate(lines):
        if not first and (not line.strip() or line.lstrip().startswith("#")):
            continue
        first.append(line)
        if not line.rstrip().endswith("\\"):
            return "\n".join(first), "\n".join(lines[index + 1:])
    return "\n".join(first), ""


def _apply(block: ReadmeBlock, body: str, line: int) -> None:
    kind, _, rest = body.partition(" ")
    if kind == "skip" and rest.strip():
        block.skip = rest.strip()  # free prose: apostrophes and all
        return
    try:
        args = shlex.split(rest)
    except ValueError as exc:
        raise ReadmeDirectiveError(f"README line {line}: readme-test directive {body!r}: {exc}") from exc
    if kind == "replace" and len(args) == 2:
        block.replacements.append((args[0], args[1]))
    elif kind == "env" and len(args) == 1 and "=" in args[0]:
        name, value = args[0].split("=", 1)
        block.env[name] = value
    elif kind == "background" and len(args) == 1:
        block.background_url = args[0]
    elif kind == "timeout" and len(args) == 1 and args[0].isdigit():
        block.timeout_s = float(args[0])
    elif kind == "cleanup" and len(args) == 1:
        block.cleanup.append(args[0])
    else:
        raise ReadmeDirectiveError(f"README line {line}: readme-test directive {body!r} not understood; "
                                   f"known: {', '.join(KNOWN_DIRECTIVES)} (see tests/readme_blocks.py)")


def read_blocks(readme: Path) -> list[ReadmeBlock]:
    """Every ```bash block of the README in order, with the directives written right before it."""
    blocks: list[ReadmeBlock] = []
    pending: list[tuple[str, int]] = []
    section = ""
    lines = readme.read_text().splitlines()
    index = 0
    while index < len(lines):
        text = lines[index]
        if heading := _HEADING.match(text):
            section = heading["title"]
        if directive := _DIRECTIVE.match(text.strip()):
            pending.append((directive["body"], index + 1))
        elif text.strip() == FENCE_OPEN:
            end = lines.index(FENCE_CLOSE, index + 1)
            block = ReadmeBlock(len(blocks) + 1, index + 1, section, "\n".join(lines[index + 1:end]))
            for body, line in pending:
                _apply(block, body, line)
            blocks.append(block)
            pending, index = [], end
        elif text.strip().startswith(FENCE_CLOSE):  # another language's block: not run, and no headings inside
            index = lines.index(FENCE_CLOSE, index + 1)
            if pending:
                raise ReadmeDirectiveError(f"README line {pending[0][1]}: a readme-test directive belongs before a "
                                           f"```bash block, not before {text.strip()!r}")
        elif text.strip() and pending:
            raise ReadmeDirectiveError(f"README line {pending[0][1]}: a readme-test directive must come right "
                                       f"before a ```bash block (line {index + 1} is in between)")
        index += 1
    return blocks
