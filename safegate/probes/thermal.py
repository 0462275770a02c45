"""CPU temperatures from psutil's sensors and from raw sysfs files named in the config."""

from __future__ import annotations

import os
from fnmatch import fnmatchcase

from safegate.config.model import ThermalConfig
from safegate.probes.snapshots import SensorReading, ThermalSnapshot

# Outside this range a sensor is broken or unconnected (e.g. -273 or 255 on some boards' spare inputs).
PLAUSIBLE_MIN = -40.0
PLAUSIBLE_MAX = 150.0
_MAX_FILE_BYTES = 64


def _plausible(value: float) -> bool:
    return PLAUSIBLE_MIN < value < PLAUSIBLE_MAX


def _selected(key: str, cfg: ThermalConfig) -> bool:
    return any(fnmatchcase(key, p) for p in cfg.sensors) and not any(fnmatchcase(key, p) for p in cfg.ignore)


def _psutil_readings(cfg: ThermalConfig, notes: list[str]) -> list[SensorReading]:
    import psutil  # only where sensors are configured: a check reading only files does not pay for it

    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:  # macOS and others: psutil has no temperature support there
        return []
    try:
        chips = reader()
    except Exception as exc:
        notes.append(f"psutil sensors unreadable: {exc}")
        return []
    readings = []
    for chip, entries in chips.items():
        for index, entry in enumerate(entries, start=1):
            label = entry.label or f"temp{index}"
            key = f"{chip}:{label}"
            if not _selected(key, cfg):
                continue
            value = float(entry.current)
            if not _plausible(value):
                notes.append(f"{key}: implausible reading {value:g} C ignored")
                continue
            readings.append(SensorReading(chip=chip, label=label, celsius=value, source="psutil"))
    return readings


def read_sensor_file(path: str) -> float:
    """A sysfs temperature file in millidegrees Celsius; raises ValueError or OSError."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        raw = os.read(fd, _MAX_FILE_BYTES)
    finally:
        os.close(fd)
    return int(raw.decode("ascii").strip()) / 1000.0


def _file_readings(cfg: ThermalConfig, notes: list[str]) -> list[SensorReading]:
    readings = []
    for path in cfg.files:
        try:
            value = read_sensor_file(path)
        except OSError as exc:
            notes.append(f"{path}: unreadable ({exc.strerror or exc})")
            continue
        except (ValueError, UnicodeDecodeError):
            notes.append(f"{path}: not a millidegree integer")
            continue
        if not _plausible(value):
            notes.append(f"{path}: implausible reading {value:g} C ignored")
            continue
        readings.append(SensorReading(chip="file", label=path, celsius=value, source=path))
    return readings


def read_thermal(cfg: ThermalConfig) -> ThermalSnapshot:
    notes: list[str] = []
    readings = _psutil_readings(cfg, notes) if cfg.sensors else []
    readings += _file_readings(cfg, notes)
    return ThermalSnapshot(readings=tuple(readings), notes=tuple(notes))
