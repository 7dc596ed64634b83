"""The contact policy's arithmetic: frequency caps and quiet hours. Pure functions, no I/O.

`activities/policy.py` applies them to one customer's message log inside a transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CAP_PATTERN = re.compile(r"^\s*(email|whatsapp|sms|all)\s*:\s*(\d+)\s*/\s*(\d+)\s*([mhd])\s*$")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}
QUIET_HOURS_PATTERN = re.compile(r"^\d{2}:\d{2}\s*-\s*\d{2}:\d{2}$")


@dataclass(frozen=True)
class FrequencyCap:
    """At most `limit` marketing messages on `channel` (or on all channels) per `window`."""

    channel: str
    limit: int
    window: timedelta

    def __str__(self) -> str:
        hours = self.window.total_seconds() / 3600
        span = f"{hours / 24:g}d" if hours >= 24 and hours % 24 == 0 else f"{hours:g}h"
        return f"{self.channel}:{self.limit}/{span}"

    def applies_to(self, channel: str) -> bool:
        return self.channel in (channel, "all")


def parse_caps(text: str) -> list[FrequencyCap]:
    """Parse `email:1/16h, email:3/7d, all:5/7d`; an empty string means no caps."""
    caps = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        match = CAP_PATTERN.match(part)
        if match is None:
            raise ValueError(
                f"invalid frequency cap {part!r}: write CHANNEL:COUNT/WINDOW, e.g. email:1/16h or all:3/7d "
                "(channel email, whatsapp, sms or all; window in m, h or d)"
            )
        channel, limit, amount, unit = match.groups()
        if int(limit) < 1 or int(amount) < 1:
            raise ValueError(f"invalid frequency cap {part!r}: count and window must be at least 1")
        caps.append(FrequencyCap(channel, int(limit), timedelta(**{UNITS[unit]: int(amount)})))
    return caps


def earliest_within_caps(
    now: datetime, taken: Iterable[tuple[datetime, str]], caps: list[FrequencyCap], channel: str, scale: float = 1.0
) -> datetime:
    """Return the first moment at or after `now` when one more message on `channel` fits every cap.

    `taken` are the moments (and channels) of marketing messages already sent or holding a slot;
    cap windows are divided by `scale`, the journey time scale.
    """
    applicable = [cap for cap in caps if cap.applies_to(channel)]
    moments = sorted(moment for moment, used_channel in taken if any(cap.applies_to(used_channel) and cap.applies_to(channel) for cap in applicable))
    candidates = sorted({now, *(moment + cap.window / scale for moment in moments for cap in applicable)})
    for candidate in candidates:
        if candidate < now:
            continue
        if all(_fits(candidate, moments, cap, channel, scale) for cap in applicable):
            return candidate
    return candidates[-1]


def _fits(candidate: datetime, moments: list[datetime], cap: FrequencyCap, channel: str, scale: float) -> bool:
    window_start = candidate - cap.window / scale
    used = sum(1 for moment in moments if window_start < moment <= candidate)
    return used < cap.limit


@dataclass(frozen=True)
class QuietHours:
    """Local hours in which no marketing goes out; `start` after `end` wraps past midnight."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> QuietHours | None:
        """Parse `21:00-08:00`; `off` or an empty string means no quiet hours."""
        if text.strip().lower() in ("", "off", "none"):
            return None
        try:
            if not QUIET_HOURS_PATTERN.match(text.strip()):
                raise ValueError(text)
            start_text, end_text = (part.strip() for part in text.split("-"))
            start, end = time.fromisoformat(start_text), time.fromisoformat(end_text)
        except ValueError:
            raise ValueError(f"invalid quiet hours {text!r}: write HH:MM-HH:MM, e.g. 21:00-08:00, or off") from None
        if start == end:
            raise ValueError(f"invalid quiet hours {text!r}: start and end must differ")
        return cls(start, end)

    def contains(self, local: time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_allowed(self, moment: datetime, zone: ZoneInfo) -> datetime:
        """Return `moment` if it falls outside quiet hours in `zone`, else the instant they end.

        Works on instants, so a local time that occurs twice (autumn) or not at all (spring)
        cannot produce two sends or an error: the end of quiet hours is one instant.
        """
        local = moment.astimezone(zone)
        if not self.contains(local.time().replace(tzinfo=None)):
            return moment
        end_day = local.date()
        if local.time().replace(tzinfo=None) >= self.end and not (self.start < self.end):
            end_day += timedelta(days=1)
        return local_instant(end_day, self.end, zone)


def local_instant(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """Return the UTC instant of `clock` on `day` in `zone`.

    A time skipped by a spring clock change maps to the same wall time after the change (02:30
    on a day clocks jump from 02:00 to 03:00 gives 03:30); a time that occurs twice in autumn maps
    to its first occurrence.
    """
    # fold=0 reads a skipped time with the offset from before the change, which lands after the
    # gap, and an ambiguous time as its first occurrence (PEP 495).
    return datetime.combine(day, clock).replace(tzinfo=zone, fold=0).astimezone(UTC)


def zone_or_default(name: str | None, default: str) -> ZoneInfo:
    """Return the customer's time zone, or the account's when theirs is missing or unknown."""
    for candidate in (name, default):
        if not candidate:
            continue
        try:
            return ZoneInfo(candidate)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return ZoneInfo("UTC")
