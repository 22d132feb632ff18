"""No photo bytes at rest: a real run writes no photo, nor its base64, to any file; and it leaves no core dump.

The CLI runs in its own process against the sandbox, with every folder it may write to (TMPDIR, HOME, the XDG
folders, the outputs, the ledger, the log file) inside one watched folder, and the photos and manifest outside
it. Afterwards no file under the watched folder holds a photo's bytes or its base64 (standard or urlsafe, from any
of the three byte alignments a chunk's own encoding can start at), whole or in pieces: every run of 63 bytes or
more of any of those forms is caught, since it holds one of the forms' 32-byte aligned windows whole.

Where strace can trace the process (Debian: apt-get install strace; .ci/run installs it), the test also sees
what a folder listing can't: every file the process opened for writing, anywhere on the machine, and every byte
it wrote to one, even to a file deleted before the end (SQLite's -wal, a temporary file). Elsewhere, files new
or changed under the temp folder during the run are scanned instead. A run with --normalize is scanned for its
sources and for the normalised bytes the server received.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backfill.sandbox import Faults, RunningSandbox

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, png_bytes
from .s3_server import S3Server
from .test_images import jpeg

WINDOW = 32  # bytes (or base64 characters) of a needle: any copy twice as long holds one whole
GENEROUS = 120.0  # seconds for a process to start and send, on a machine whose cores are all busy


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server.start()
    yield server
    server.stop()


# --- what a photo looks like on disk, in any form ---


def photos(seed: int, count: int) -> dict[str, bytes]:
    """Photos of random content (so no needle can occur by chance): JPEGs with random scans, and one PNG."""
    rng = random.Random(seed)
    made = {f"p{seed}_{i}.jpg": jpeg([rng.randbytes(20_000).replace(b"\xff", b"\xfe")]) for i in range(count)}
    made[f"p{seed}_png.png"] = png_bytes(seed, 48)
    return made


def needles(data: Iterable[bytes]) -> dict[bytes, str]:
    """Every WINDOW-long aligned window of each photo, and of its base64 and urlsafe base64 from offsets 0, 1 and
    2 (a piece encoded on its own matches one of those), each naming the form it comes from."""
    found: dict[bytes, str] = {}
    for i, photo in enumerate(data):
        forms = {f"photo {i}": photo}
        for shift in range(3):
            forms[f"photo {i} base64+{shift}"] = base64.b64encode(photo[shift:])
            forms[f"photo {i} urlsafe base64+{shift}"] = base64.urlsafe_b64encode(photo[shift:])
        for name, form in forms.items():
            for at in range(0, len(form) - WINDOW + 1, WINDOW):
                found[form[at : at + WINDOW]] = name
    return found


def first_hit(data: bytes, wanted: dict[bytes, str]) -> str | None:
    for at in range(len(data) - WINDOW + 1):
        name = wanted.get(data[at : at + WINDOW])
        if name is not None:
            return f"{name} at byte {at}"
    return None


# --- what the process wrote, as strace saw it ---

_HEX = r"(?:\\x[0-9a-f]{2})*"
_CALL = re.compile(r"^(?:\d+ +)?(\w+)\((.*)$")
_FD = re.compile(rf"(\d+)<({_HEX})>")
_STRING = re.compile(rf'"({_HEX})"(\.\.\.)?')
_DIR = re.compile(rf"(?:AT_FDCWD|\d+)<({_HEX})>, ")
_OPEN_PATH = re.compile(rf'"({_HEX})", ([A-Z_|]+)')
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND", "O_TMPFILE")
DATA_CALLS = {"write", "writev", "pwrite64", "pwritev", "pwritev2"}
COPY_CALLS = {"sendfile", "sendfile64", "copy_file_range", "splice"}
TRACED = (
    "/^(open|openat|openat2|creat|write|writev|pwrite64|pwritev2?|sendfile(64)?|copy_file_range|splice|mmap)$"
)

# -f: every thread (the ledger's writer, object storage's); -y: the path behind each descriptor; -xx: every string
# in hex, so parsing is exact; -s: whole writes, never cut.
STRACE = ("strace", "-f", "-qq", "-y", "-xx", "-s", str(1 << 24), "-e", f"trace={TRACED}")


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


@dataclass
class Trace:
    """Every file the process (and its threads) opened for writing, and the bytes written to each, in order."""

    opened_for_writing: set[str] = field(default_factory=set)
    written: dict[str, bytearray] = field(default_factory=dict)
    copies: list[str] = field(default_factory=list)  # a file written by the kernel from another fd
    shared_maps: set[str] = field(default_factory=set)  # files mapped writable: written without a syscall

    @classmethod
    def read(cls, path: Path) -> Trace:
        trace = cls()
        for line in path.read_text().splitlines():
            call = _CALL.match(line)
            if call is None:
                continue  # a resumed call's end, an exit, a signal
            name, rest = call.groups()
            if name in {"open", "openat", "openat2", "creat"}:
                opened = _OPEN_PATH.search(rest)
                if name == "creat" or (opened and any(f in opened.group(2) for f in WRITE_FLAGS)):
                    assert opened is not None, line
                    where = _DIR.match(rest)  # a relative path is relative to the dirfd (or the cwd) shown
                    named = unhex(opened.group(1)).decode(errors="replace")
                    base = unhex(where.group(1)).decode(errors="replace") if where else ""
                    trace.opened_for_writing.add(os.path.join(base, named))
                continue
            fd = _FD.match(rest)
            target = unhex(fd.group(2)).decode(errors="replace") if fd else ""
            if name in DATA_CALLS:
                if target.startswith("socket:"):
                    continue  # the API request: the one place a photo's base64 is meant to go
                pieces = _STRING.findall(rest)
                assert all(not cut for _, cut in pieces), f"a write longer than strace kept: {line[:200]}"
                trace.written.setdefault(target, bytearray()).extend(b"".join(unhex(p) for p, _ in pieces))
            elif name in COPY_CALLS:
                trace.copies.append(line[:300])
            elif name == "mmap" and "MAP_SHARED" in rest and "PROT_WRITE" in rest:
                fds = _FD.findall(rest)
                trace.shared_maps.update(unhex(f[1]).decode(errors="replace") for f in fds)
        return trace


def strace_works() -> bool:
    """Whether strace is installed and allowed to trace a child here (a container may forbid ptrace)."""
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=openat", "-o", os.devnull, "true"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


SHARED_TEMP = (Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/dev/shm"))


def temp_entries() -> set[Path]:
    """What the machine's shared temp folders hold at their top level (walking /tmp whole takes minutes)."""
    return {entry for folder in SHARED_TEMP if folder.is_dir() for entry in folder.iterdir()}


def files_under(entries: Iterable[Path]) -> Iterator[Path]:
    """The files in new temp entries (another process's too: its bytes are never our photos)."""
    for entry in entries:
        if entry.is_file():
            yield entry
        for dirpath, _, names in os.walk(entry, onerror=lambda _: None):
            yield from (Path(dirpath, name) for name in names)


# --- the watched folder and the process ---


@dataclass
class Watched:
    """One folder for everything the process may write, with the environment that points it there."""

    root: Path
    trace_dir: Path  # outside root: strace's own logs
    temp_before: set[Path] = field(default_factory=temp_entries)  # without strace: what is new is scanned
    traces: list[Trace] = field(default_factory=list)
    said: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, tmp: Path) -> Watched:
        root = tmp / "watched"
        for sub in ("tmp", "home", "data", "cache", "config", "state", "runtime", "out"):
            (root / sub).mkdir(parents=True)
        (tmp / "traces").mkdir()
        return cls(root=root, trace_dir=tmp / "traces")

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        r = self.root
        return {
            **os.environ,
            **extra,
            "TMPDIR": str(r / "tmp"),
            "HOME": str(r / "home"),
            "XDG_DATA_HOME": str(r / "data"),
            "XDG_CACHE_HOME": str(r / "cache"),
            "XDG_CONFIG_HOME": str(r / "config"),
            "XDG_STATE_HOME": str(r / "state"),
            "XDG_RUNTIME_DIR": str(r / "runtime"),
            "SMILE_PARTNER_ID": PARTNER_ID,
            "SMILE_API_KEY": API_KEY,
            "BACKFILL_BACKOFF_INITIAL": "0.01",
            "BACKFILL_BACKOFF_MAX": "0.05",
        }

    def backfill(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "backfill", *args]
        if TRACING:
            log = self.trace_dir / f"{len(self.traces)}.strace"
            command = [*STRACE, "-o", str(log), *command]
        done = subprocess.run(
            command,
            cwd=self.root / "home",
            env=self.env(extra or {}),
            capture_output=True,
            text=True,
            timeout=GENEROUS * 2,
        )
        if TRACING:
            self.traces.append(Trace.read(log))
        self.said.append(done.stdout + done.stderr)
        return done

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())


TRACING = strace_works()


def harmless(path: str) -> bool:
    """A file outside the watched folder that any Python process may write: the interpreter's bytecode cache, a
    POSIX semaphore (tqdm's lock), the null device. Their bytes are scanned with the rest."""
    return "/__pycache__/" in path or path.startswith("/dev/shm/sem.") or path in {"/dev/null", "/dev/tty"}


def assert_no_photo_at_rest(watched: Watched, sent: Iterable[bytes]) -> None:
    wanted = needles(sent)
    # The test's own photos and manifest are the only files expected to hold photos; everything else is scanned.
    scanned = {str(p): p.read_bytes() for p in watched.files()}
    assert any(name.endswith("ledger.sqlite") for name in scanned), sorted(scanned)
    assert any(name.endswith("results.csv") for name in scanned), sorted(scanned)
    if not TRACING:
        for path in files_under(temp_entries() - watched.temp_before):
            with contextlib.suppress(OSError):  # gone meanwhile, or not a regular file
                if path.is_file() and path.stat().st_size < 64 << 20:
                    scanned.setdefault(str(path), path.read_bytes())
    for name, data in scanned.items():
        hit = first_hit(data, wanted)
        assert hit is None, f"{name} holds {hit}"
    for i, said in enumerate(watched.said):
        hit = first_hit(said.encode(), wanted)
        assert hit is None, f"command {i}'s stdout/stderr holds {hit}"
    root = str(watched.root)
    for trace in watched.traces:
        outside = {p for p in trace.opened_for_writing if not p.startswith(root + "/") and not harmless(p)}
        assert not outside, f"files opened for writing outside the watched folder: {sorted(outside)}"
        assert any(p.startswith(root + "/") for p in trace.opened_for_writing)  # the trace does see the files
        for target, data in trace.written.items():
            hit = first_hit(bytes(data), wanted)
            assert hit is None, f"written to {target}: {hit}"
        assert not trace.copies, f"a file written from another descriptor, unseen: {trace.copies}"
        # SQLite's WAL index (page numbers and checksums, never a page) is the one file written by mapping.
        unread = {p for p in trace.shared_maps if not p.endswith("-shm") and not harmless(p)}
        assert not unread, f"files written through a shared mapping: {sorted(unread)}"


# --- local photos ---


def test_a_run_from_local_photos_writes_no_photo_bytes_anywhere(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    made = photos(1, 4)
    folder = tmp_path / "photos"
    (folder / "images").mkdir(parents=True)
    for name, data in made.items():
        (folder / "images" / name).write_bytes(data)
    cut = made["p1_0.jpg"][:-40]
    (folder / "images" / "cut.jpg").write_bytes(cut)  # read whole, then rejected: its bytes count too
    rows = [f"u{i},2021-08-12,images/{name}" for i, name in enumerate(made)] + [
        "cut,2021-08-12,images/cut.jpg"
    ]
    manifest = folder / "manifest.csv"
    manifest.write_text("user_id,user_created_at,image_path\n" + "\n".join(rows) + "\n")
    watched = Watched.make(tmp_path)
    w = watched.root
    where = ["--env", "local", "--base-url", threaded_sandbox.base_url, "--ledger", str(w / "ledger.sqlite")]
    run = [
        "run",
        str(manifest),
        *where,
        "--out",
        str(w / "out"),
        "--no-progress",
        "--log-format",
        "json",
        "--log-file",
        str(w / "logs" / "rows.log"),
        "--log-level",
        "debug",
    ]

    first = watched.backfill(*run)
    assert first.returncode == 1, first.stdout + first.stderr  # 1: the cut photo's reject
    assert len(threaded_sandbox.state.enrolled) == len(made)
    again = watched.backfill(*run)  # a resume: every row skipped
    assert again.returncode == 1, again.stdout + again.stderr
    assert (
        watched.backfill(
            "export", "--ledger", str(w / "ledger.sqlite"), "--out", str(w / "export.csv")
        ).returncode
        == 0
    )
    assert (
        watched.backfill("report", "--ledger", str(w / "ledger.sqlite"), "--out", str(w / "out")).returncode
        == 0
    )
    assert watched.backfill("validate", str(manifest), "--out", str(w / "validated")).returncode == 1

    assert_no_photo_at_rest(watched, [*made.values(), cut])


def test_a_normalised_run_writes_neither_the_photos_nor_what_they_became_anywhere(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    """--normalize: a HEIC is converted, a JPEG stored on its side is rotated, a PNG loses its text; each in
    memory. Neither the sources nor the bytes sent (as the server received them) are in any file written."""
    from PIL import Image, PngImagePlugin

    from .test_normalize import encoded, exif

    def grain(size: tuple[int, int]) -> Image.Image:
        return Image.frombytes("RGB", size, random.Random(size[0]).randbytes(size[0] * size[1] * 3))

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "taken at 12 Acacia Avenue")
    made = {
        "a.heic": encoded(grain((160, 120)), "HEIF", quality=90),
        "b.jpg": encoded(grain((120, 160)), "JPEG", quality=90, exif=exif(6)),
        "c.png": encoded(grain((150, 100)), "PNG", pnginfo=info),
    }
    folder = tmp_path / "photos"
    (folder / "images").mkdir(parents=True)
    for name, data in made.items():
        (folder / "images" / name).write_bytes(data)
    rows = [f"n{i},2021-08-12,images/{name}" for i, name in enumerate(made)]
    manifest = folder / "manifest.csv"
    manifest.write_text("user_id,user_created_at,image_path\n" + "\n".join(rows) + "\n")
    threaded_sandbox.state.keep_photos = True
    watched = Watched.make(tmp_path)
    w = watched.root
    where = ["--env", "local", "--base-url", threaded_sandbox.base_url, "--ledger", str(w / "ledger.sqlite")]
    run = ["run", str(manifest), *where, "--out", str(w / "out"), "--no-progress", "--normalize"]
    run += ["--log-file", str(w / "logs" / "rows.log"), "--log-level", "debug"]

    first = watched.backfill(*run)
    assert first.returncode == 0, first.stdout + first.stderr
    sent = [threaded_sandbox.state.photos[f"n{i}"] for i in range(len(made))]
    assert all(data not in made.values() for data in sent)  # each was normalised, so each is a new form
    again = watched.backfill(*run)  # a resume: every row skipped, no photo read
    assert again.returncode == 0, again.stdout + again.stderr

    assert_no_photo_at_rest(watched, [*made.values(), *sent])


# --- photos in object storage ---


def test_a_run_from_photos_in_s3_writes_no_photo_bytes_anywhere(
    tmp_path: Path, s3: S3Server, threaded_sandbox: RunningSandbox
) -> None:
    made = photos(2, 3)
    client = s3.client()
    client.create_bucket(Bucket="at-rest")
    for name, data in made.items():
        client.put_object(Bucket="at-rest", Key=f"images/{name}", Body=data)
    rows = [f"u{i},2021-08-12,images/{name}" for i, name in enumerate(made)]
    body = "user_id,user_created_at,image_path\n" + "\n".join(rows) + "\n"
    client.put_object(Bucket="at-rest", Key="manifest.csv", Body=body.encode())  # fetched into TMPDIR
    watched = Watched.make(tmp_path)
    w = watched.root
    run = [
        "run",
        "s3://at-rest/manifest.csv",
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--ledger",
        str(w / "ledger.sqlite"),
        "--out",
        str(w / "out"),
        "--no-progress",
        "--log-format",
        "json",
        "--log-file",
        str(w / "logs" / "rows.log"),
        "--log-level",
        "debug",
    ]

    done = watched.backfill(*run, extra=s3.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(threaded_sandbox.state.enrolled) == len(made)
    assert (
        watched.backfill("report", "--ledger", str(w / "ledger.sqlite"), "--out", str(w / "out")).returncode
        == 0
    )

    assert_no_photo_at_rest(watched, made.values())


# --- no core dump ---


def core_limits(pid: int) -> tuple[str, str]:
    """The soft and hard RLIMIT_CORE of a live process, as the kernel holds them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError(f"no core file size in /proc/{pid}/limits")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_holding_photos_in_memory_can_leave_no_core_dump(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    # The sandbox holds its answer, so the process is caught mid-run with a photo read and in flight.
    server = threaded_sandboxes.start(faults=Faults(latency_ms=600_000))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(1))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("user_id,user_created_at,image_path\nu1,2021-08-12,images/a.png\n")
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backfill",
            "run",
            str(manifest),
            "--env",
            "local",
            "--base-url",
            server.base_url,
            "--ledger",
            str(tmp_path / "ledger.sqlite"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--timeout",
            "900",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        give_up = time.monotonic() + GENEROUS
        while server.state.total_requests < 1:  # an event count: the request is on the wire, its photo read
            assert run.poll() is None, f"the run ended early: exit {run.returncode}"
            assert time.monotonic() < give_up, "the run's request never reached the sandbox"
            time.sleep(0.02)
        assert core_limits(run.pid) == ("0", "0")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(GENEROUS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_the_process_is_not_dumpable_even_by_a_core_handler_that_ignores_the_limit(tmp_path: Path) -> None:
    # Any command, through the real entry; then PR_GET_DUMPABLE (3), which only the process itself can ask.
    ask = (
        "import contextlib, ctypes, sys; from backfill.cli import main\n"
        "with contextlib.suppress(SystemExit): main(['config', 'show'])\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), file=sys.stderr)"
    )
    env = {**os.environ, "HOME": str(tmp_path), "SMILE_PARTNER_ID": PARTNER_ID}
    done = subprocess.run(
        [sys.executable, "-c", ask], capture_output=True, text=True, env=env, timeout=GENEROUS
    )
    assert done.stderr.splitlines()[-1:] == ["0"], done.stdout + done.stderr
