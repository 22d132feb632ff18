"""The documentation is checked like code: every link resolves, and every command it shows is one the tool takes.

A renamed flag, a moved heading or a deleted page fails here, not in the hands of a reader. Commands are read
from the fenced code blocks (and from inline code that starts with `backfill `, as in the commands table); each
`backfill` command's subcommand must accept `--help`, and each of its options must be an option of that
subcommand. `python -m` lines must name a module that exists; the repository's own modules must accept their
options too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.config import load_settings

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [
        REPO / "README.md",
        REPO / "SECURITY.md",
        *(REPO / "docs").glob("*.md"),
        REPO / "benchmarks" / "README.md",
        REPO / "sample_data" / "README.md",
        REPO / "deploy" / "README.md",
    ]
)
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
# `python -m` modules of this repository: their options are checked too.
REPO_MODULES = {"benchmarks", "tests"}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence


@dataclass(frozen=True)
class Page:
    path: Path
    prose: list[tuple[int, str]]  # (line number, text) outside fenced blocks
    blocks: list[Block]

    def where(self, line: int) -> str:
        return f"{self.path.relative_to(REPO)}:{line}"


def read(path: Path) -> Page:
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    fence: tuple[str, str, int] | None = None  # (marker, lang, line)
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opening = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, body = (opening.group(1), opening.group(2).lower(), number), []
        elif fence is not None and line.strip().startswith(fence[0]) and not line.strip().strip(fence[0][0]):
            blocks.append(Block(fence[1], "\n".join(body), fence[2]))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append((number, line))
    assert fence is None, f"{path}: a code block opened at line {fence[2]} is never closed"
    return Page(path, prose, blocks)


PAGES = {path: read(path) for path in DOCS}


# --- links --------------------------------------------------------------------------------------------------

CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def without_code(text: str) -> str:
    return CODE_SPAN.sub(lambda m: "`" + "x" * len(m.group(2)) + "`", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation but `-` and `_` dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in page.prose:
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links() -> Iterator[tuple[Page, int, str]]:
    for page in PAGES.values():
        for number, line in page.prose:
            for match in LINK.finditer(without_code(line)):
                yield page, number, match.group(1)


def broken(page: Page, target: str) -> str | None:
    """Why the relative link `target` from `page` does not resolve, or None when it does."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
        return None  # https:, mailto: ...: not checked here
    path_part, _, anchor = target.partition("#")
    dest = (page.path.parent / path_part).resolve() if path_part else page.path
    if not dest.exists():
        return f"{path_part} does not exist"
    if REPO not in dest.parents and dest != REPO:
        return f"{path_part} is outside the repository"
    if anchor:
        if dest.suffix != ".md":
            return f"#{anchor} on a file that is not markdown"
        heads = anchors(PAGES.get(dest) or read(dest))
        if anchor not in heads:
            return f"no heading #{anchor} in {dest.relative_to(REPO)} (it has: {', '.join(sorted(heads))})"
    return None


def test_every_link_in_the_docs_resolves() -> None:
    checked, problems = 0, []
    for page, number, target in links():
        why = broken(page, target)
        checked += 1
        if why:
            problems.append(f"{page.where(number)}: ({target}): {why}")
    assert not problems, "\n".join(problems)
    assert checked >= 20  # the README's table of pages alone has a dozen: finding few means the parser broke


def test_the_readme_links_every_page_of_docs() -> None:
    linked = {
        (REPO / t.partition("#")[0]).resolve()
        for p, _, t in links()
        if p.path.name == "README.md" and p.path.parent == REPO
    }
    assert set((REPO / "docs").glob("*.md")) <= linked


def test_the_link_checker_catches_a_missing_page_a_missing_heading_and_a_renamed_one() -> None:
    readme = PAGES[REPO / "README.md"]
    assert broken(readme, "docs/fleet.md") is None
    assert broken(readme, "docs/operating.md#nightly-from-cron") is None
    assert broken(readme, "docs/fleet.mdx")
    assert broken(readme, "docs/operating.md#nightly-from-crontab")
    assert broken(readme, "#no-such-heading")
    assert slug("Scaling out: a fleet on one PostgreSQL") == "scaling-out-a-fleet-on-one-postgresql"
    assert slug("`backfill run` and [its flags](x.md)") == "backfill-run-and-its-flags"
    assert slug("Rate fidelity, retry storm, and a_script") == "rate-fidelity-retry-storm-and-a_script"


# --- commands -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str
    line: str
    words: list[str]  # from the program on: ["backfill", "run", ...] or ["python", "-m", ...]


SUBSTITUTION = re.compile(r"\$\([^()]*\)")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of one shell line: env assignments, redirections and comments dropped."""
    while SUBSTITUTION.search(line):
        line = SUBSTITUTION.sub("PLACEHOLDER", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token in SEPARATORS:
            while words and ASSIGNMENT.match(words[0]):
                words.pop(0)
            cut = next((i for i, w in enumerate(words) if w[:1] in "<>"), len(words))
            if words[:cut]:
                yield words[:cut]
            words = []
        else:
            words.append(token)


def logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    pending, start = "", 0
    for offset, raw in enumerate(block.text.splitlines(), 1):
        if not pending:
            start = block.line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def is_program(word: str, *names: str) -> bool:
    return Path(word).name in names


def commands() -> Iterator[Command]:
    for page in PAGES.values():
        for block in page.blocks:
            if block.lang not in SHELL_BLOCKS:
                continue
            for number, line in logical_lines(block):
                if not re.search(r"\b(backfill|python3?)\b", line):
                    continue
                try:
                    found = list(simple_commands(line))
                except ValueError as exc:
                    raise AssertionError(f"{page.where(number)}: not a shell line ({exc}): {line}") from None
                for words in found:
                    if is_program(words[0], "backfill", "python", "python3"):
                        yield Command(page.where(number), line.strip(), words)
        # Inline code that is a backfill command, as in the commands table: `backfill run MANIFEST [--rate R] ...`
        for number, text in page.prose:
            for match in CODE_SPAN.finditer(text):
                span = match.group(2).strip()
                if span.startswith("backfill "):
                    # `[--out DIR \| --output FILE]`: brackets and alternatives go; a word after a pipe
                    # (`backfill export \| head`) is an argument here, which names no option or subcommand.
                    words = re.sub(r"[\[\]]|\\\|", " ", span).split()
                    yield Command(page.where(number), span, words)


COMMANDS = list(commands())


def option_names(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


def resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command a `backfill ...` line names, and its subcommand path."""
    command: click.Command = main
    path: list[str] = []
    for word in words[1:]:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            path.append(word)
        elif not word.startswith("-"):
            break
    return command, path


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if re.match(r"^--?[A-Za-z]", w)]


def backfill_problem(cmd: Command) -> str | None:
    command, path = resolve(cmd.words)
    unknown = sorted(set(flags(cmd.words)) - option_names(command))
    if unknown:
        return f"`backfill {' '.join(path)}` has no option {', '.join(unknown)}"
    result = CliRunner().invoke(main, [*path, "--help"])
    if result.exit_code != 0:
        return f"`backfill {' '.join(path)} --help` exits {result.exit_code}: {result.output}"
    return None


def module_help(module: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """What `python -m module --help` prints, run in this process."""
    out = io.StringIO()
    with monkeypatch.context() as m, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        m.setattr(sys, "argv", [module, "--help"])
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exit_.value.code in (0, None), f"python -m {module} --help: exit {exit_.value.code}"
    return out.getvalue()


def python_problem(cmd: Command, monkeypatch: pytest.MonkeyPatch) -> str | None:
    args = cmd.words[1:]
    if not args or args[0] != "-m":
        script = next((a for a in args if a.endswith(".py")), None)
        if script and not (REPO / script).is_file():
            return f"no script {script}"
        return None
    module, rest = args[1], args[2:]
    if importlib.util.find_spec(module) is None:
        return f"no module {module}"
    if module.split(".")[0] not in REPO_MODULES:
        return None
    helped = set(re.findall(r"--[\w-]+", module_help(module, monkeypatch))) | {"--help"}
    unknown = sorted(set(flags(rest)) - helped)
    if unknown:
        return f"`python -m {module}` has no option {', '.join(unknown)}"
    if module == "benchmarks" and "--only" in rest:
        from benchmarks.run import NAMES

        missing = sorted(set(rest[rest.index("--only") + 1].split(",")) - set(NAMES))
        if missing:
            return f"no benchmark {', '.join(missing)} (there are: {', '.join(NAMES)})"
    return None


def test_every_command_in_the_docs_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = []
    for cmd in COMMANDS:
        is_backfill = is_program(cmd.words[0], "backfill")
        why = backfill_problem(cmd) if is_backfill else python_problem(cmd, monkeypatch)
        if why:
            problems.append(f"{cmd.where}: {why}\n    {cmd.line}")
    assert not problems, "\n".join(problems)


def test_the_docs_show_commands_enough_to_be_checked() -> None:
    backfills = [c for c in COMMANDS if is_program(c.words[0], "backfill")]
    subcommands = {" ".join(resolve(c.words)[1]) for c in backfills}
    assert len(backfills) >= 40 and len(flags([w for c in backfills for w in c.words])) >= 100
    every = {"run", "check", "validate", "status", "retry", "export", "report", "sandbox", "demo"}
    assert every <= subcommands
    modules = {c.words[2] for c in COMMANDS if c.words[1:2] == ["-m"]}
    documented = {"benchmarks", "benchmarks.fleet", "benchmarks.remote", "benchmarks.adaptive", "tests.soak"}
    assert documented <= modules


def test_the_command_checker_catches_a_renamed_flag_and_a_missing_subcommand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def problem(line: str) -> str | None:
        (words,) = [w for w in simple_commands(line) if is_program(w[0], "backfill", "python")]
        cmd = Command("here", line, words)
        return backfill_problem(cmd) if words[0] == "backfill" else python_problem(cmd, monkeypatch)

    assert problem("SMILE_PARTNER_ID=000 backfill run users.csv --env local --rate=5  # a comment") is None
    assert problem('export K="$(cat key)"; backfill export --status failed | head -3 >out.txt 2>&1') is None
    assert problem("backfill run users.csv --ratee 5") == "`backfill run` has no option --ratee"
    assert problem("backfill status --limit 5") == "`backfill status` has no option --limit"
    assert problem("backfill config show --json") is None
    assert problem("python -m benchmarks --only scale,client_overhead --no-profile") is None
    assert problem("python -m benchmarks --only scales")
    fleet = "python -m benchmarks.fleet"
    assert problem(f"{fleet} --latency 5") == f"`{fleet}` has no option --latency"
    assert problem("python -m benchmarks.nothing") == "no module benchmarks.nothing"
    assert problem("python sample_data/make_sample_data.py") is None
    assert problem("python sample_data/make_more.py") == "no script sample_data/make_more.py"


# --- what the pages promise about each other ----------------------------------------------------------------

# The README's test command, which .ci/run runs (keep the two identical).
README_TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest"
)


def test_ci_runs_the_readmes_test_command() -> None:
    readme = PAGES[REPO / "README.md"]
    assert any(README_TEST_COMMAND in b.text.splitlines() for b in readme.blocks)
    assert README_TEST_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()


def block_starting(page: Path, first_line: str) -> str:
    (text,) = [b.text for b in PAGES[page].blocks if b.text.startswith(first_line)]
    return text


def test_the_cron_jobs_env_file_is_shell_that_sets_only_real_settings(tmp_path: Path) -> None:
    """The env file the nightly job sources: valid sh, and every variable in it is one the tool reads."""
    env_file = tmp_path / "smile.env"
    env_file.write_text(block_starting(REPO / "docs" / "operating.md", "# /srv/backfill/smile.env"))
    done = subprocess.run(
        ["sh", "-c", '. "$1" && env -0', "sh", str(env_file)], capture_output=True, check=True, env={}
    )
    loaded = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    ours = {k: v for k, v in loaded.items() if k.startswith(("SMILE_", "BACKFILL_"))}
    assert {"SMILE_PARTNER_ID", "SMILE_API_KEY"} <= set(ours)
    settings = load_settings(environ=ours)
    assert settings.warnings == ()  # no misspelt BACKFILL_* name
    assert settings.partner_id == "085" and settings.sources["api_key"] == "environment SMILE_API_KEY"
    assert {k for k, v in settings.sources.items() if v.startswith("environment BACKFILL_")} == {
        k.removeprefix("BACKFILL_").lower() for k in ours if k.startswith("BACKFILL_")
    }


def test_the_cron_script_runs_the_alert_that_is_tested() -> None:
    assert CRON_ALERT in block_starting(REPO / "docs" / "operating.md", "#!/bin/sh").splitlines()


def exit_codes_table(text: str) -> set[int]:
    """The codes of docs/operating.md's "Exit codes" table: the first cell of each row, e.g. `| 130, 143 |`."""
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if re.match(r"\|\s*\d", line)]
    return {int(code) for cell in rows for code in cell.split(",")}


def test_the_exit_codes_the_docs_list_are_the_ones_the_tool_has() -> None:
    from backfill.vocab import EXIT_MEANINGS, ExitCode

    assert exit_codes_table((REPO / "docs" / "operating.md").read_text()) == {int(c) for c in ExitCode}
    assert set(EXIT_MEANINGS) == set(ExitCode)  # the report can say what every code means


def exit_fixes_table(text: str) -> dict[int, str]:
    """Each code's "what to do" cell in docs/operating.md's "Exit codes" table, as plain text (no backticks)."""
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    fixes = {}
    for line in section.splitlines():
        if re.match(r"\|\s*\d", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for code in cells[0].split(","):
                fixes[int(code)] = cells[-1].replace("`", "").replace("\\|", "|")
    return fixes


def test_a_json_lines_fix_for_each_exit_code_is_what_the_docs_say_to_do() -> None:
    from backfill.vocab import EXIT_FIXES

    assert exit_fixes_table((REPO / "docs" / "operating.md").read_text()) == EXIT_FIXES


def test_the_exit_codes_reader_sees_a_missing_code() -> None:
    table = "## Exit codes\n\n| code | meaning |\n|---|---|\n| 0 | fine |\n| 130, 143 | signals |\n\n## Next\n| 9 | x |"
    assert exit_codes_table(table) == {0, 130, 143}


# --- the settings table: every setting, with its names in the file, the environment and on the command line ---


def settings_table() -> str:
    """docs/configuration.md's table of settings, as the settings' Specs make it."""
    from backfill.config import SPECS, Spec

    def code(*names: str) -> str:
        return ", ".join(f"`{name}`" for name in names)

    def old(names: tuple[str, ...]) -> str:
        return f" (old name: {code(*names)})" if names else ""

    def row(spec: Spec) -> str:
        key = code(spec.key) + old(spec.aliases) + ("" if spec.in_file else " (never in the file)")
        flag = code(spec.flag_name) + old(spec.old_flags) if spec.flag else "—"
        olds = spec.variables[: len(spec.aliases)] if spec.env is None else ()
        env = code(*spec.variables[len(olds) :]) + old(olds)
        return f"| {key} | {flag} | {env} | {spec.help.replace('|', chr(92) + '|')} |"

    header = ["| setting (the file's key) | flag | environment | what it is |", "|---|---|---|---|"]
    return "\n".join([*header, *(row(spec) for spec in SPECS.values())])


def test_the_configuration_page_lists_every_setting_as_the_code_declares_it() -> None:
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = settings_table()
    assert table in page, f"docs/configuration.md's table of settings, as the code has them:\n{table}"
    # The old name is said here, since --help hides it.
    assert "`--ledger` (old name: `--checkpoint`)" in table


# --- the nightly job's alert in docs/operating.md names backfill's exit code, not `test`'s ------------------


# The nightly job in docs/operating.md, after the command: `$?` read once, into a variable, before anything else runs.
CRON_ALERT = 'code=$?; [ "$code" -le 1 ] || mail -s "backfill exit $code" ops@example.com </dev/null'

OLD_CRON_ALERT = 'test $? -le 1 || mail -s "backfill exit $?" ops@example.com </dev/null'


def alert(shell: str, snippet: str, exit_code: int) -> str:
    """What the snippet mails after a backfill that exits `exit_code` (mail replaced by echo)."""
    script = f'mail() {{ echo "mail $*"; }}\nbackfill() {{ return {exit_code}; }}\nbackfill run users.csv\n{snippet}'
    return subprocess.run([shell, "-c", script], capture_output=True, text=True, check=False).stdout.strip()


@pytest.mark.parametrize("shell", ["bash", "sh"])  # cron runs /bin/sh
def test_the_cron_alert_mails_backfills_exit_code(shell: str) -> None:
    assert alert(shell, CRON_ALERT, 4) == "mail -s backfill exit 4 ops@example.com"
    assert alert(shell, CRON_ALERT, 130) == "mail -s backfill exit 130 ops@example.com"
    assert alert(shell, CRON_ALERT, 0) == alert(shell, CRON_ALERT, 1) == ""
    # The old line mailed the exit code of `test` (1), whatever backfill said.
    assert alert(shell, OLD_CRON_ALERT, 4) == "mail -s backfill exit 1 ops@example.com"
