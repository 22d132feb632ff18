"""What a sandbox is asked to be: its credentials and limits (SandboxOptions) and what goes wrong (Faults)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypedDict

from ..errors import ConfigError

SCRIPT_FAULTS: Final = frozenset({"reset_before", "reset_after", "slow"})

_SCRIPT_FIX: Final = "use an HTTP status 400-599, an error code string, or " + ", ".join(
    sorted(SCRIPT_FAULTS)
)


@dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often. Rates are fractions of requests, drawn from the sandbox's seeded rng.

    Foreign IDs are user_ids another partner user already holds: `foreign_ids` names some exactly, and
    `foreign_rate` makes that fraction of all user_ids foreign, picked by hashing the sandbox's seed with the
    user_id (not by the rng), so every process and restart with the same seed picks the same IDs.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float | None = None
    reset_before_rate: float = 0.0
    reset_after_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 30_000.0
    systemic_code: str | None = None
    # Per user_id, answers for its first requests: an HTTP status (429, 500, 502, 503...), an API error code
    # string ("2207"), or one of SCRIPT_FAULTS.
    script: Mapping[str, Sequence[int | str]] = field(default_factory=dict)
    retry_after_s: float = 1.0
    foreign_ids: frozenset[str] = frozenset()
    foreign_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "slow_ms", "retry_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise _fault_error(name, f"{value!r} is not a finite number >= 0", "use 0 or more")
        for name in ("error_rate", "reset_before_rate", "reset_after_rate", "slow_rate", "foreign_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise _fault_error(name, f"{value!r} is not a fraction", "use a number from 0 to 1")
        if self.rate_limit is not None and not (math.isfinite(self.rate_limit) and self.rate_limit > 0):
            raise _fault_error(
                "rate_limit", f"{self.rate_limit!r} is not > 0", "use requests/second, or None"
            )
        if self.systemic_code is not None and not self.systemic_code:
            raise _fault_error("systemic_code", "it is empty", 'use a code such as "2205", or None')
        for user_id, steps in self.script.items():
            for step in steps:
                if not _valid_step(step):
                    problem = f"step {step!r} for user_id {user_id!r} is unknown"
                    raise _fault_error("script", problem, _SCRIPT_FIX)
        # A frozen copy: a caller mutating its dict later must not change a running sandbox.
        frozen = MappingProxyType({user_id: tuple(steps) for user_id, steps in self.script.items()})
        object.__setattr__(self, "script", frozen)
        # A lone string would otherwise pass as a set of one-character IDs.
        if isinstance(self.foreign_ids, str):
            raise _fault_error("foreign_ids", "it is a single string", "use a set of user_ids")
        foreign = frozenset(self.foreign_ids)  # also freezes a set or list a caller passed
        for user_id in foreign:
            if not isinstance(user_id, str) or not user_id:
                raise _fault_error("foreign_ids", f"{user_id!r} is not a user_id", "use non-empty strings")
        object.__setattr__(self, "foreign_ids", foreign)


NO_FAULTS: Final = Faults()


@dataclass(frozen=True, kw_only=True)
class SandboxOptions:
    """Everything one sandbox is built from, apart from where it listens."""

    partner_id: str
    api_key: str
    faults: Faults = NO_FAULTS
    # Seeds the rng (job IDs, random faults) and the foreign-ID hash.
    seed: int = 0
    # Enrollments are kept here, so a restarted sandbox still answers 2209 for them.
    state_file: Path | None = None
    max_photo_bytes: int = 5 * 1024 * 1024
    timestamp_window_s: float = 300.0
    # One JSON line per request on arrival and per answer.
    request_log: Path | None = None

    def __post_init__(self) -> None:
        if not self.partner_id or not self.api_key:
            name = "partner_id" if not self.partner_id else "api_key"
            raise _option_error(name, "it is empty", "pass the credentials the client will sign with")
        if self.max_photo_bytes <= 0:
            raise _option_error("max_photo_bytes", f"{self.max_photo_bytes} is not > 0", "use a byte count")
        if not self.timestamp_window_s >= 0:
            raise _option_error("timestamp_window_s", f"{self.timestamp_window_s} is < 0", "use seconds >= 0")
        # Callers from before the Path annotation pass plain strings.
        for name in ("state_file", "request_log"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def is_foreign(self, user_id: str) -> bool:
        """Whether another partner user holds this user_id, so it can only ever answer 2209."""
        faults = self.faults
        if user_id in faults.foreign_ids:
            return True
        return faults.foreign_rate > 0 and foreign_draw(self.seed, user_id) < faults.foreign_rate


class OptionKeywords(TypedDict, total=False):
    """SandboxOptions' fields after the credentials, for the keyword form of make_app/start_sandbox/serve."""

    faults: Faults
    seed: int
    state_file: Path | None
    max_photo_bytes: int
    timestamp_window_s: float
    request_log: Path | None


def resolve_options(
    caller: str,
    partner_id: str | None,
    api_key: str | None,
    options: SandboxOptions | None,
    keywords: OptionKeywords,
) -> SandboxOptions:
    """The options a caller passed, either as `options=` or as credentials and keywords, never both."""
    if options is None:
        if partner_id is None or api_key is None:
            raise TypeError(f"{caller}() needs partner_id and api_key, or options=")
        return SandboxOptions(partner_id=partner_id, api_key=api_key, **keywords)
    if partner_id is not None or api_key is not None or keywords:
        raise TypeError(f"{caller}() takes options= or partner_id, api_key and keywords, not both")
    return options


def foreign_draw(seed: int, user_id: str) -> float:
    """A number in [0, 1) fixed by the seed and the user_id: the same in every process, unlike hash()."""
    # surrogatepass: JSON can carry a lone surrogate, which plain UTF-8 refuses to encode.
    digest = hashlib.sha256(f"{seed}:{user_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_foreign_ids(path: Path) -> frozenset[str]:
    """The user_ids in a file, one per line; blank lines are skipped and spaces around an ID dropped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        fix = "point --foreign-ids at a readable UTF-8 file with one user_id per line"
        raise ConfigError("foreign_ids", str(path), f"can't be read ({error})", fix) from error
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def _fault_error(name: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"faults.{name}", "Faults", problem, fix)


def _option_error(name: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(name, "SandboxOptions", problem, fix)


def _valid_step(step: object) -> bool:
    if isinstance(step, bool):
        return False
    if isinstance(step, int):
        return 400 <= step <= 599
    return isinstance(step, str) and (step in SCRIPT_FAULTS or (step.isdigit() and step.isascii()))
