"""Reading one value of config.toml and checking it, or failing with a :class:`ConfigError` that names its
key (``peers[1].port``) and the value: the building blocks of :mod:`dicom_node.config`."""

from __future__ import annotations

import math
import re
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab's 0-6; 7 is Sunday again


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or holds a bad value."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config: {key}: {message}")


def get_strings(raw: dict[str, Any], key: str, default: list[str], nonempty: bool = False) -> list[str]:
    value = raw.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"must be a list of strings, got {value!r}")
    if nonempty and not value:
        raise ConfigError(key, "must not be empty")
    return value


def validate_ae_title(value: Any, key: str) -> str:
    """An AE title: 1-16 characters of the default repertoire, no backslash or control characters."""
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ConfigError(key, f"{value!r} must be 1 to 16 characters")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ConfigError(key, f"{value!r} may hold only printable ASCII characters and no backslash")
    return title


def get_table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a table ([{name}])")
    return value


def reject_unknown(raw: dict[str, Any], known: set[str], prefix: str) -> None:
    """A misspelt key must not be silently ignored: it would leave a default the admin meant to change."""
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")


def get_value(raw: dict[str, Any], key: str, kind: type, default: Any, minimum: float | None = None) -> Any:
    value = raw.get(key.rsplit(".", 1)[-1], default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(key, f"must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # TOML has nan and inf; no comparison below would catch nan
        raise ConfigError(key, f"{value} must be a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"{value} must be at least {minimum}")
    return value


def get_flag(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def get_positive(raw: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = get_value(raw, key, kind, default)
    if value <= 0:
        raise ConfigError(key, f"{value} must be greater than 0")
    return value


def get_port(value: Any, key: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise ConfigError(key, f"{value!r} must be a TCP port ({low} to 65535)")
    return value


def existing_file(value: Any, key: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a file path, got {value!r}")
    path = base_dir / value
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist")
    return path


def crontab_trigger(line: str, timezone: tzinfo | None = None) -> CronTrigger:
    """An APScheduler trigger for a crontab line, weekdays as crontab counts them (0 and 7 Sunday, 1 Monday):
    APScheduler 3's ``CronTrigger.from_crontab`` counts 0 as Monday, so "1-5" ran Tuesday to Saturday.
    Raises ValueError for a line that is not one."""
    from apscheduler.triggers.cron import CronTrigger

    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"a crontab line has 5 fields (minute hour day month weekday), not {len(fields)}")
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":  # crontab runs on either; APScheduler would run only on days that are both
        raise ValueError("restrict the day of the month or the weekday, not both (crontab and APScheduler disagree)")
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_weekdays(weekday),
                       timezone=timezone)


def _crontab_weekdays(field: str) -> str:
    """Crontab's weekday field (lists of days, ranges and steps) as APScheduler day names: "1-5" -> "mon,...,fri"."""
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.lower().split(","):
        match = re.fullmatch(r"(?:\*|(\w+)(?:-(\w+))?)(?:/(\d+))?", item)
        if match is None:
            raise ValueError(f"{item!r} is not a weekday, a range of them or a step")
        first_text, last_text, step_text = match.groups()
        first = _crontab_day(first_text) if first_text else 0
        last = _crontab_day(last_text) if last_text else 7 if step_text or not first_text else first
        if last == 0 < first:  # "sat-sun": Sunday ends a range as 7
            last = 7
        step = int(step_text or 1)
        if last < first or step < 1:
            raise ValueError(f"{item!r} must run from an earlier day to a later one, in steps of 1 or more")
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(CRONTAB_DAYS[d] for d in sorted(days))


def _crontab_day(text: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text in CRONTAB_DAYS:
        return CRONTAB_DAYS.index(text)
    raise ValueError(f"{text!r} is not a weekday (0-7, 0 and 7 are Sunday, or sun-sat)")
