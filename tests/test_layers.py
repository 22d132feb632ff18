"""The import layers of backfill/: no arrow climbs back up, each library stays in its one home, no room loops.

Every module under backfill/ is read with `ast`: top-level imports, imports inside functions and under
`TYPE_CHECKING`, relative ones resolved. A room is a subpackage or a top-level module (`run`, `config`,
`__main__`; the package's own `__init__.py` is `__init__`); a rule may also name a module or subpackage inside a
room (`run.engine`, `outputs.report`). The rules are the whiteboard of the structure review, written as data:
who is bound, which rooms they never import, and why. An import a rule forbids today, kept only until it is
fixed, is listed in KNOWN; an entry there that no longer happens fails too, so it is deleted with the fix.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "backfill"


@dataclass(frozen=True)
class Import:
    where: str  # "backfill/run/engine.py:25"
    source: str  # the importing module, dotted: "backfill.run.engine"
    target: str  # a module of the package ("backfill.config"), or a library's top-level name ("tenacity")
    internal: bool


def modules(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name; a package is named by its `__init__.py`."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(package: Path) -> list[Import]:
    """Every import statement of every module, wherever it sits in the file."""
    known = modules(package)

    def resolve(dotted: str) -> str:  # the longest prefix that is a module: a name imported from it isn't one
        while dotted not in known and "." in dotted:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found = []
    for source, path in known.items():
        home = source if path.name == "__init__.py" else source.rpartition(".")[0]
        where = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = ".".join(home.split(".")[: len(home.split(".")) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                internal = name.split(".")[0] == package.name
                target = resolve(name) if internal else name.split(".")[0]
                found.append(Import(f"{where}:{node.lineno}", source, target, internal))
    return found


def room(module: str) -> str:
    """`backfill.run.engine` → `run`; the package itself → `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def inside(module: str, place: str) -> bool:
    """Whether a dotted module is the place (a room, or a module or subpackage in one) or lies within it."""
    short = module.partition(".")[2] or "__init__"
    return short == place or short.startswith(place + ".")


# --- the rules ----------------------------------------------------------------------------------------------

EVERY = frozenset(room(m) for m in modules(PACKAGE))
BASE = frozenset({"errors", "vocab", "clock", "redact", "version"})
LIBRARY = frozenset({"run", "ledger", "images", "api", "manifest", "remote_manifest", "sandbox"})


@dataclass(frozen=True)
class Rule:
    bound: frozenset[str]  # the places the rule binds
    never: frozenset[str]  # the places they never import
    why: str


def rule(bound: set[str] | frozenset[str], never: set[str] | frozenset[str], why: str) -> Rule:
    return Rule(frozenset(bound), frozenset(never), why)


RULES = (
    rule(
        EVERY - {"cli", "__main__"},
        {"cli"},
        "the click layer is the top floor: only `python -m backfill` enters it",
    ),
    rule(
        EVERY - {"__init__"},
        {"__init__", "python_api"},
        "the package's face (its __init__ and the Python API it exports) is a top floor too, beside the CLI: "
        "nothing below reaches it, and the two faces never call each other",
    ),
    rule(
        LIBRARY,
        {"compose", "preflight", "outputs", "cli"},
        "the library is handed its collaborators and hands its rows to a sink: it never reaches up to the "
        "root, the checks, the outputs or the face",
    ),
    rule(
        {"outputs"},
        {"compose", "preflight"},
        "outputs implement the engine's Sink and Observer; the root builds them, never the other way",
    ),
    rule(
        {"compose"},
        {"preflight"},
        "`backfill check` asks the root how a run would be built; the root never runs the checks",
    ),
    rule(
        {"ledger", "images", "api", "sandbox"},
        {"run"},
        "the engine drives the ledger, the photos and the API; none of them knows it is driven",
    ),
    rule({"run"}, {"config"}, "the engine is handed what it needs by the root, not the whole Settings"),
    rule(
        {"preflight"},
        {"run.engine"},
        "`backfill check` asks the plan what a run would do; it never starts the pipeline",
    ),
    rule(
        {"outputs.report"},
        {"run"},
        "the report reads a ledger through the Store contract and a run's files, never the engine",
    ),
    rule(
        {"api"},
        {"ledger", "config"},
        "the API signs, sends and classifies; what is stored and how settings resolve are decided elsewhere",
    ),
    rule(
        {"ledger"},
        {"api", "config"},
        "the ledger keeps states and applies transitions; it neither talks to the API nor reads settings",
    ),
    rule(
        {"images"},
        {"manifest", "remote_manifest", "ledger"},
        "a photo is read by its name; what the manifest says and what the ledger remembers are decided above",
    ),
    rule(
        {"manifest", "remote_manifest"},
        {"api", "ledger"},
        "reading a manifest needs neither the API nor the ledger",
    ),
    rule(
        {"sandbox"},
        {"ledger", "config"},
        "the emulator shares only the signing with the client: it has no ledger and none of our settings",
    ),
    rule(
        {"config"},
        EVERY - BASE - {"config"},
        "settings are values resolved from text: they need nothing above the base",
    ),
    rule(
        BASE,
        EVERY - BASE,
        "the base (errors, vocab, clock, redact, version) is the ground floor: it imports nothing else of backfill",
    ),
)

# (importing file, forbidden place): why it is still there. Each is to be removed, and its entry with it.
KNOWN: dict[tuple[str, str], str] = {}

# A library's top-level import name: the places that may import it, and a note where it has more than one.
LIBRARIES: dict[str, tuple[frozenset[str], str]] = {
    "psycopg": (frozenset({"ledger.postgres"}), "the PostgreSQL ledger"),
    "psycopg_pool": (frozenset({"ledger.postgres"}), "the PostgreSQL ledger's connections"),
    "prometheus_client": (frozenset({"outputs.metrics"}), "a run's metrics"),
    "obstore": (frozenset({"images.remote"}), "photos and manifests in object storage"),
    "tenacity": (
        frozenset({"run.policy"}),
        "the retry policy's backoff, built once as data; sends, storage reads and ledger outages all ask "
        "the policy, never tenacity itself",
    ),
    "jinja2": (frozenset({"outputs.report"}), "report.html's templates"),
    "tqdm": (
        frozenset({"cli.progress", "cli.logs"}),
        "the progress bar (cli/progress.py); cli/logs.py writes log lines through tqdm.write so they "
        "don't tear it",
    ),
    "click": (frozenset({"cli"}), "the command line"),
    "pandas": (frozenset({"manifest"}), "the manifest's pre-scan"),
    "numpy": (frozenset({"manifest"}), "the duplicate scan's hashes, beside pandas"),
    "pyarrow": (frozenset({"manifest.parquet"}), "Parquet manifests"),
    "PIL": (frozenset({"images.normalize"}), "--normalize: decoding, rotating, scaling, encoding photos"),
    "pillow_heif": (frozenset({"images.normalize"}), "--normalize: HEIC/HEIF photos"),
    "aiohttp": (
        frozenset({"api.client", "sandbox", "preflight"}),
        "the HTTP exchange and the emulator's server; preflight.py opens its own session to probe "
        "the endpoint's TLS (the review's section 6 notes it)",
    ),
    "yaml": (frozenset({"config"}), "the settings file"),
    "pybase64": (frozenset({"api.client"}), "the photo's base64, the request body's bulk"),
}


# --- the checks ---------------------------------------------------------------------------------------------


def climbs(found: list[Import], rules: tuple[Rule, ...], known: dict[tuple[str, str], str]) -> list[str]:
    """Each import a rule forbids and KNOWN doesn't excuse, and each KNOWN entry that no longer happens."""
    broken, excused = [], set()
    for imp in found:
        if not imp.internal:
            continue
        for r in rules:
            if not any(inside(imp.source, place) for place in r.bound):
                continue
            for place in sorted(p for p in r.never if inside(imp.target, p)):
                key = (imp.where.partition(":")[0], place)
                if key in known:
                    excused.add(key)
                else:
                    broken.append(
                        f"{imp.where} imports {imp.target}, but {room(imp.source)} never imports "
                        f"{place}: {r.why}"
                    )
    stale = [
        f"KNOWN excuses {file} importing {place}, which no longer happens: delete the entry"
        for file, place in sorted(known.keys() - excused)
    ]
    return broken + stale


def strays(found: list[Import], libraries: dict[str, tuple[frozenset[str], str]]) -> list[str]:
    """Each import of a library outside its homes, and of a library with no home in the table."""
    broken = []
    for imp in found:
        if imp.internal or imp.target in sys.stdlib_module_names:
            continue
        if imp.target not in libraries:
            broken.append(
                f"{imp.where} imports {imp.target}, which has no home in LIBRARIES: add the one "
                f"module that owns its job"
            )
            continue
        homes, note = libraries[imp.target]
        if not any(inside(imp.source, home) for home in homes):
            broken.append(
                f"{imp.where} imports {imp.target}, which lives only in {', '.join(sorted(homes))} ({note})"
            )
    return broken


def loops(found: list[Import]) -> list[str]:
    """Each arrow between two rooms that the other room reaches back, with the way back."""
    arrows: dict[str, dict[str, str]] = {}
    for imp in found:
        a, b = room(imp.source), room(imp.target)
        if imp.internal and a != b:
            arrows.setdefault(a, {}).setdefault(b, imp.where)

    def way(start: str, goal: str) -> list[str] | None:
        came: dict[str, str] = {start: start}
        queue = deque([start])
        while queue:
            here = queue.popleft()
            if here == goal:
                path = [goal]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return path[::-1]
            for there in sorted(arrows.get(here, {})):
                if there not in came:
                    came[there] = here
                    queue.append(there)
        return None

    broken = []
    for a in sorted(arrows):
        for b, where in sorted(arrows[a].items()):
            back = way(b, a)
            if back:
                steps = ", ".join(f"{x} → {y} ({arrows[x][y]})" for x, y in pairwise(back))
                broken.append(f"{where}: {a} → {b}, and {b} reaches {a} again: {steps}")
    return broken


# --- the tests ----------------------------------------------------------------------------------------------

FOUND = imports(PACKAGE)


def test_no_import_climbs_back_up() -> None:
    broken = climbs(FOUND, RULES, KNOWN)
    assert not broken, "\n".join(broken)


def test_each_library_is_imported_only_by_the_module_that_owns_its_job() -> None:
    broken = strays(FOUND, LIBRARIES)
    assert not broken, "\n".join(broken)


def test_no_two_rooms_import_each_other_even_by_a_detour() -> None:
    broken = loops(FOUND)
    assert not broken, "\n".join(broken)


def test_every_place_the_tables_name_exists() -> None:
    # A misspelled room would match nothing and silently keep no rule.
    names = {m.partition(".")[2] or "__init__" for m in modules(PACKAGE)}
    places = {p for r in RULES for p in r.bound | r.never} | {p for _, p in KNOWN}
    places |= {p for homes, _ in LIBRARIES.values() for p in homes}
    assert places <= names, sorted(places - names)
    assert {file for file, _ in KNOWN} <= {i.where.partition(":")[0] for i in FOUND}


def test_the_reader_sees_imports_inside_functions_and_relative_ones_from_any_depth() -> None:
    seen = {(i.where.partition(":")[0], i.target) for i in FOUND}
    assert ("backfill/__main__.py", "backfill.cli") in seen  # `from .cli import main`
    assert (
        "backfill/cli/__init__.py",
        "backfill.preflight",
    ) in seen  # `from .. import preflight`, in `check`
    assert ("backfill/cli/__init__.py", "backfill.sandbox") in seen  # `from ..sandbox import …`, in `demo`
    assert ("backfill/outputs/report/render.py", "backfill.version") in seen  # `from ...version import …`
    assert ("backfill/compose.py", "backfill.config") in seen  # `from .config import …`


def test_the_checks_catch_a_climb_a_stray_library_a_homeless_one_and_a_loop(tmp_path: Path) -> None:
    package = tmp_path / "backfill"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "config.py": "from .errors import ConfigError\n",
        "api/__init__.py": "",
        "api/client.py": "import json\n\n\ndef key():\n    from ..config import Secret\n",
        "api/answers.py": "from backfill.run import plan\n",
        "run/__init__.py": "",
        "run/plan.py": "from ..api import client\n",
        "ledger/__init__.py": "",
        "ledger/postgres.py": "import psycopg\n",
        "ledger/sqlite.py": "from psycopg import sql\nimport requests\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    found = imports(package)
    rules = (rule({"api"}, {"config", "run"}, "why"),)

    assert climbs(found, rules, {}) == [
        "backfill/api/answers.py:1 imports backfill.run.plan, but api never imports run: why",
        "backfill/api/client.py:5 imports backfill.config, but api never imports config: why",
    ]
    excused = climbs(
        found, rules, {("backfill/api/client.py", "config"): "", ("backfill/run/plan.py", "api"): ""}
    )
    assert excused[1:] == [
        "KNOWN excuses backfill/run/plan.py importing api, which no longer happens: delete the entry"
    ]

    libraries = {"psycopg": (frozenset({"ledger.postgres"}), "the PostgreSQL ledger")}
    assert strays(found, libraries) == [
        "backfill/ledger/sqlite.py:1 imports psycopg, which lives only in ledger.postgres (the PostgreSQL ledger)",
        "backfill/ledger/sqlite.py:2 imports requests, which has no home in LIBRARIES: add the one module that "
        "owns its job",
    ]
    assert loops(found) == [
        "backfill/api/answers.py:1: api → run, and run reaches api again: run → api (backfill/run/plan.py:1)",
        "backfill/run/plan.py:1: run → api, and api reaches run again: api → run (backfill/api/answers.py:1)",
    ]
