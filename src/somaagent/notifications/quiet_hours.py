"""Quiet hours: a daily local-time window (it may cross midnight) in an IANA time zone, and when a
delivery that falls inside it may go out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from somaagent.core.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class QuietHours:
    """From `start` to `end` local time in `time_zone`, every day; `start > end` crosses midnight."""

    start: time
    end: time
    time_zone: str

    def release_at(self, now: datetime) -> datetime | None:
        """The end of the window `now` falls in (UTC), or None when `now` is outside it."""
        zone = ZoneInfo(self.time_zone)
        local = now.astimezone(zone)
        clock = local.time().replace(tzinfo=None)
        if self.start < self.end:
            inside = self.start <= clock < self.end
            end_day = local.date()
        else:  # crosses midnight: 22:00 → 07:00 is [22:00, 24:00) and [00:00, 07:00)
            inside = clock >= self.start or clock < self.end
            end_day = local.date() + timedelta(days=1) if clock >= self.start else local.date()
        if not inside:
            return None
        # A wall-clock time skipped by a DST jump resolves forward (fold=0), which is what a person means.
        release = datetime.combine(end_day, self.end, tzinfo=zone)
        return release.astimezone(now.tzinfo)


def clock_text(value: time) -> str:
    """`HH:MM`, or `HH:MM:SS` when there are seconds."""
    return value.isoformat(timespec="seconds" if value.second else "minutes")


def parse_clock(value: str, param: str) -> time:
    """`HH:MM` (or `HH:MM:SS`) as a time of day; 400 naming `param` otherwise."""
    try:
        if len(value) not in (5, 8):
            raise ValueError(value)
        parsed = time.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"`{param}` must be a time of day as HH:MM (24-hour clock, e.g. 22:00), not {value!r}",
            param=param,
        ) from exc
    return parsed


def parse_zone(value: str, param: str) -> str:
    """An IANA time zone name (`Europe/Paris`); 400 naming `param` otherwise."""
    try:
        if not value or value.startswith(("/", ".")) or ".." in value:
            raise ValueError(value)
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequest(
            f"`{param}` must be an IANA time zone such as Europe/Paris or America/New_York, not {value!r}",
            param=param,
        ) from exc
    return value


def quiet_hours(start: str, end: str, time_zone: str, param: str = "quiet_hours") -> QuietHours:
    """Validated quiet hours from their wire form."""
    begin = parse_clock(start, f"{param}.start")
    finish = parse_clock(end, f"{param}.end")
    if begin == finish:
        raise InvalidRequest(
            f"`{param}.start` and `{param}.end` are both {start}: an empty window; remove quiet hours "
            "(send null) instead",
            param=f"{param}.end",
        )
    return QuietHours(begin, finish, parse_zone(time_zone, f"{param}.time_zone"))
