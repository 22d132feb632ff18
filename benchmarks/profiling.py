"""Turns a pyinstrument session into hot spots: sampled time charged to the innermost backfill/ function."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def hotspots(session: Any, package_dir: str, top: int = 10) -> dict[str, Any]:
    """Each sample goes to the innermost frame inside `package_dir` on its stack (with the library call it
    was in, if any), so time in json, hashlib or aiohttp lands on the backfill line that asked for it.
    Samples with no backfill frame (the event loop, aiohttp's protocol callbacks) are counted apart."""
    root = session.root_frame()
    if root is None:
        return {"total_s": 0.0, "outside_backfill_s": 0.0, "top": []}
    charged: dict[str, float] = defaultdict(float)
    via: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    outside: dict[str, float] = defaultdict(float)

    def name(frame: Any) -> str:
        path = frame.file_path or ""
        short = path[len(package_dir) - len("backfill") :] if path.startswith(package_dir) else path
        return f"{frame.function} ({short.rsplit('site-packages/', 1)[-1]}:{frame.line_no})"

    # Iterative walk: deep aiohttp stacks would exhaust recursion on some profiles.
    stack: list[tuple[Any, str | None, str | None]] = [(root, None, None)]
    while stack:
        frame, owner, callee = stack.pop()
        inside = (frame.file_path or "").startswith(package_dir)
        if inside:
            owner, callee = name(frame), None
        elif owner is not None and callee is None and not frame.is_synthetic:
            callee = name(frame)
        if not frame.children:
            if owner is None:
                outside[callee or name(frame)] += frame.time
            else:
                charged[owner] += frame.time
                via[owner][callee or "[own code]"] += frame.time
            continue
        stack.extend((child, owner, callee) for child in frame.children)
    total = root.time
    ranked = sorted(charged.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "total_s": round(total, 4),
        "outside_backfill_s": round(sum(outside.values()), 4),
        "top": [
            {
                "function": fn,
                "seconds": round(seconds, 4),
                "share": round(seconds / total, 4) if total else 0.0,
                "via": [
                    {"call": call, "seconds": round(s, 4)}
                    for call, s in sorted(via[fn].items(), key=lambda item: item[1], reverse=True)[:4]
                ],
            }
            for fn, seconds in ranked
        ],
        "top_outside": [
            {"call": call, "seconds": round(s, 4)}
            for call, s in sorted(outside.items(), key=lambda item: item[1], reverse=True)[:5]
        ],
    }


def pyspy_hotspots(raw: str, package_dir: str, top: int = 10) -> dict[str, Any]:
    """Hot spots from py-spy's collapsed stacks (`--format raw`): all threads, CPU samples only, and the line
    being run in each frame, so a sample lands on the exact backfill/ line that was executing or calling."""
    charged: dict[str, float] = defaultdict(float)
    via: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    outside: dict[str, float] = defaultdict(float)
    total = 0.0
    marker = "backfill/"
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = float(count_text)
        frames = stack.split(";")
        if any("importlib._bootstrap" in f for f in frames):
            continue  # start-up imports: not what a run costs per row
        total += count
        owner_at = max((i for i, f in enumerate(frames) if package_dir in f), default=-1)
        if owner_at < 0:
            outside[_short(frames[-1], marker)] += count
            continue
        owner = _short(frames[owner_at], marker)
        charged[owner] += count
        callee = _short(frames[owner_at + 1], marker) if owner_at + 1 < len(frames) else "[own code]"
        via[owner][callee] += count
    ranked = sorted(charged.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "samples": int(total),
        "outside_backfill_share": round(sum(outside.values()) / total, 4) if total else 0.0,
        "top": [
            {
                "line": fn,
                "share": round(samples / total, 4) if total else 0.0,
                "via": [
                    {"call": call, "share": round(s / total, 4)}
                    for call, s in sorted(via[fn].items(), key=lambda item: item[1], reverse=True)[:4]
                ],
            }
            for fn, samples in ranked
        ],
        "top_outside": [
            {"call": call, "share": round(s / total, 4)}
            for call, s in sorted(outside.items(), key=lambda item: item[1], reverse=True)[:8]
        ],
    }


def _short(frame: str, marker: str) -> str:
    """`fn (/long/path/site-packages/pkg/mod.py:12)` -> `fn (pkg/mod.py:12)`; backfill paths from backfill/."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if marker in where:
        where = where[where.rindex(marker) :]
    else:
        where = where.rsplit("site-packages/", 1)[-1].rsplit("/lib/python3", 1)[-1]
    return f"{name} ({where})"
