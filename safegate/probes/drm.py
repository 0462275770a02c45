"""AMD and Intel GPUs through the kernel alone (no ROCm, no oneAPI): the DRM class in sysfs, and DRM fdinfo.

Cards: /sys/class/drm/card<N> (connectors such as card0-DP-1 and render nodes are skipped), kept where the
PCI device's driver (`device/uevent` DRIVER=, else the `device/driver` link) is amdgpu (AMD) or i915/xe
(Intel); nvidia-drm cards are NVML's. Per card:
- memory: amdgpu's `device/mem_info_vram_total` and `mem_info_vram_used` (bytes). i915 and xe have no such
  files: an Intel card's memory is unknown (and an Intel card without a hwmon directory, an integrated one,
  is not listed at all).
- temperatures: the card's hwmon (`device/hwmon/hwmon*/temp<i>_input`, millidegrees, with `temp<i>_label` and
  `temp<i>_crit`). The card's temperature is the sensor labelled edge (amdgpu) or pkg (xe), else the first;
  every other sensor (junction, mem, vram) is a hot spot, judged against its own crit (gate.policy).
Per process: `/proc/<pid>/fdinfo/<fd>` of the fds that are /dev/dri nodes, in the kernel's DRM client usage
stats format (Documentation/gpu/drm-usage-stats.rst): drm-driver, drm-client-id, drm-pdev and the VRAM region's
drm-resident-<region> (else the older drm-memory-<region>, else drm-total-<region>), region vram* (amdgpu,
xe) or local* (i915). One client counts once, however many fds (or processes, after fork) share it.

Every read is small and bounded (MAX_CARDS cards, MAX_SENSORS sensors, READ_LIMIT bytes a file, MAX_FDS fds a
process); a missing, unreadable or nonsensical file makes its value unknown and a note, never an exception:
the kernel writes these files, but a fake tree or an odd driver must not crash a check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from itertools import islice

import msgspec

from safegate.probes.snapshots import GpuInfo, GpuSensor
from safegate.units import printable

SYSFS_ROOT = "/sys/class/drm"
PROC_ROOT = "/proc"
DRIVERS = {"amdgpu": "amd", "i915": "intel", "xe": "intel"}
MAX_CARDS = 16
MAX_ENTRIES = 512  # entries of one directory looked at: a bound whatever a (fake) tree holds
MAX_SENSORS = 16
READ_LIMIT = 4096  # a sysfs attribute is at most a page
FDINFO_LIMIT = 16384
MAX_FDS = 4096
MAX_PIDS = 4096
MAX_BYTES = 1 << 50  # more VRAM than any card has: a value above it is nonsense
PLAUSIBLE = (-40.0, 200.0)  # degrees C; outside, a sensor is broken or unconnected
CARD_TEMP_LABELS = ("edge", "pkg")

_CARD = re.compile(r"card(\d{1,4})")
_TEMP_INPUT = re.compile(r"temp(\d{1,3})_input")
_UINT = re.compile(r"\d{1,20}")
_SIZE = re.compile(r"(\d{1,20})(?:\s*(B|KiB|MiB|GiB))?")
_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_VRAM_KEY = re.compile(r"drm-(resident|memory|total)-((?:vram|local)\d{0,3})")
_PREFERENCE = ("resident", "memory", "total")


def read_small(path: str, limit: int = READ_LIMIT) -> str | None:
    """Up to *limit* bytes of a file, as text; None when missing or unreadable. Non-blocking: a FIFO in a fake
    tree does not hang the check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_uint(text: str | None, limit: int = MAX_BYTES) -> int | None:
    """A sysfs unsigned integer (one line, digits only) no larger than *limit*; None otherwise."""
    if text is None:
        return None
    text = text.strip()
    if not _UINT.fullmatch(text):
        return None
    value = int(text)
    return value if value <= limit else None


def parse_millidegrees(text: str | None) -> float | None:
    """A hwmon temperature (signed millidegrees) in degrees, where plausible; None otherwise."""
    if text is None:
        return None
    text = text.strip()
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    if not _UINT.fullmatch(digits) or len(digits) > 7:
        return None
    celsius = (-int(digits) if negative else int(digits)) / 1000.0
    return celsius if PLAUSIBLE[0] < celsius < PLAUSIBLE[1] else None


def parse_uevent(text: str | None) -> dict[str, str]:
    """KEY=value lines of a uevent file (bounded by the read); malformed lines are skipped."""
    pairs: dict[str, str] = {}
    for line in (text or "").splitlines()[:64]:
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            pairs[key] = value.strip()
    return pairs


def _names(directory: str) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in islice(entries, MAX_ENTRIES)]
    except OSError:
        return []


def card_numbers(root: str = SYSFS_ROOT) -> list[int]:
    """The DRM cards' numbers, in order (connectors and render nodes left out), at most MAX_CARDS."""
    numbers = {int(m.group(1)) for m in map(_CARD.fullmatch, _names(root)) if m}
    return sorted(numbers)[:MAX_CARDS]


class Card(msgspec.Struct, frozen=True):
    """One DRM card as sysfs shows it, before it is numbered among all GPUs."""

    number: int
    vendor: str  # amd or intel
    driver: str
    name: str
    bus_id: str | None
    uuid: str
    total: int | None
    used: int | None
    temp: float | None
    hotspots: tuple[GpuSensor, ...]


def read_card(root: str, number: int, notes: list[str]) -> Card | None:
    """Card *number* if an amdgpu/i915/xe device drives it; None for any other driver or none."""
    device = os.path.join(root, f"card{number}", "device")
    uevent = parse_uevent(read_small(os.path.join(device, "uevent")))
    driver = uevent.get("DRIVER", "")
    if not driver:
        try:
            driver = os.path.basename(os.readlink(os.path.join(device, "driver")))
        except OSError:
            return None
    vendor = DRIVERS.get(driver)
    if vendor is None:
        return None
    bus_id = uevent.get("PCI_SLOT_NAME") or None
    if bus_id is None:
        try:
            bus_id = os.path.basename(os.path.realpath(device)) or None
        except OSError:
            bus_id = None
    bus_id = printable(bus_id)[:32] if bus_id else None
    hwmon = _hwmon_dir(device)
    if vendor == "intel" and hwmon is None:
        return None  # an integrated GPU: it shares system RAM and the CPU's sensors, which are read already
    product = (read_small(os.path.join(device, "product_name")) or "").strip()
    pci_id = printable(uevent.get("PCI_ID", ""))[:16]
    name = printable(product)[:64] if product else f"{driver} {pci_id}".strip()
    unique = (read_small(os.path.join(device, "unique_id")) or "").strip()
    uuid = f"GPU-{unique}" if re.fullmatch(r"[0-9a-fA-F]{1,32}", unique) else ""
    total = used = None
    if vendor == "amd":
        total, used = _vram(device, number, notes)
    temp, hotspots = _temperatures(hwmon, number, notes) if hwmon is not None else (None, ())
    return Card(number, vendor, driver, name, bus_id, uuid, total, used, temp, hotspots)


def _vram(device: str, number: int, notes: list[str]) -> tuple[int | None, int | None]:
    raw_total = read_small(os.path.join(device, "mem_info_vram_total"))
    raw_used = read_small(os.path.join(device, "mem_info_vram_used"))
    total, used = parse_uint(raw_total), parse_uint(raw_used)
    if total is None or used is None or used > total or total == 0:
        notes.append(f"card{number}: VRAM unreadable (mem_info_vram_total {_shown(raw_total)}, "
                     f"mem_info_vram_used {_shown(raw_used)})")
        return None, None
    return total, used


def _shown(raw: str | None) -> str:
    return "missing" if raw is None else repr(printable(raw.strip())[:24])


def _hwmon_dir(device: str) -> str | None:
    names = sorted(n for n in _names(os.path.join(device, "hwmon")) if n.startswith("hwmon"))
    return os.path.join(device, "hwmon", names[0]) if names else None


def _temperatures(hwmon: str, number: int, notes: list[str]) -> tuple[float | None, tuple[GpuSensor, ...]]:
    """The card's temperature (edge, pkg, else the first sensor) and its other sensors as hot spots."""
    indexes = sorted(int(m.group(1)) for m in map(_TEMP_INPUT.fullmatch, _names(hwmon)) if m)[:MAX_SENSORS]
    sensors: list[GpuSensor] = []
    for i in indexes:
        path = os.path.join(hwmon, f"temp{i}_input")
        raw = read_small(path, 64)
        celsius = parse_millidegrees(raw)
        label = printable((read_small(os.path.join(hwmon, f"temp{i}_label"), 64) or "").strip())[:32]
        label = label or f"temp{i}"
        if celsius is None:
            # amdgpu reads junction/mem as an error while the card sleeps (runtime PM): unknown, not hot
            notes.append(f"card{number} {label}: no plausible reading ({_shown(raw)})")
            continue
        crit = parse_millidegrees(read_small(os.path.join(hwmon, f"temp{i}_crit"), 64))
        sensors.append(GpuSensor(label, celsius, crit))
    card = next((s for s in sensors if s.label in CARD_TEMP_LABELS), sensors[0] if sensors else None)
    return (card.celsius if card else None), tuple(s for s in sensors if s is not card)


def read_cards(root: str = SYSFS_ROOT, first_index: int = 0) -> tuple[tuple[GpuInfo, ...], tuple[str, ...]]:
    """Every AMD and Intel card, numbered from *first_index* in card-number order, and what could not be read.
    vendor_index is the card's place among its vendor's cards (what ROCR_VISIBLE_DEVICES names)."""
    notes: list[str] = []
    cards = [c for c in (read_card(root, n, notes) for n in card_numbers(root)) if c is not None]
    counts: dict[str, int] = {}
    gpus = []
    for index, c in enumerate(cards, first_index):
        place = counts[c.vendor] = counts.get(c.vendor, -1) + 1
        free = c.total - c.used if c.total is not None and c.used is not None else None
        gpus.append(GpuInfo(index, c.name, c.uuid, total=c.total, used=c.used, free=free, temp=c.temp,
                            vendor=c.vendor, vendor_index=place, bus_id=c.bus_id, hotspots=c.hotspots))
    return tuple(gpus), tuple(notes)


class DrmClient(msgspec.Struct, frozen=True):
    """One DRM client (an open device file description) as its fdinfo record describes it."""

    driver: str
    client_id: int
    pdev: str  # the PCI device, e.g. 0000:03:00.0 ("" where the kernel does not say)
    vram: int | None  # bytes of the client's buffers in VRAM; None where the record has no VRAM key


def parse_size_value(text: str) -> int | None:
    """A drm-usage-stats memory value: an unsigned integer with an optional unit (B, KiB, MiB, GiB)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    value = int(match.group(1)) * _UNITS[match.group(2)]
    return value if value <= MAX_BYTES else None


def parse_fdinfo(text: str) -> DrmClient | None:
    """A DRM fdinfo record; None when it is not one (no drm-driver or no valid drm-client-id)."""
    keys: dict[str, str] = {}
    for line in islice(text.splitlines(), 512):
        key, sep, value = line.partition(":")
        if sep and key.startswith("drm-") and len(key) <= 64 and key not in keys:
            keys[key] = value.strip()
    driver = keys.get("drm-driver", "")
    client = parse_uint(keys.get("drm-client-id"), 2**64 - 1)
    if not driver or client is None:
        return None
    found: dict[str, int] = {}  # kind -> bytes summed over its VRAM regions
    for key, value in keys.items():
        match = _VRAM_KEY.fullmatch(key)
        size = parse_size_value(value) if match else None
        if match and size is not None:
            found[match.group(1)] = found.get(match.group(1), 0) + size
    vram = next((found[kind] for kind in _PREFERENCE if kind in found), None)
    pdev = printable(keys.get("drm-pdev", ""))[:32]
    return DrmClient(printable(driver)[:32], client, pdev, vram)


class DrmUsage(msgspec.Struct, frozen=True):
    """The VRAM a set of processes holds through DRM, by PCI device."""

    vram: dict[str, int]  # pdev ("" where unnamed) -> bytes
    clients: int  # DRM clients found
    unmeasured: int  # ... whose record has no VRAM key (an older kernel): their use is unknown
    readable: bool  # at least one process's fds could be listed


def _is_drm_node(link: str) -> bool:
    return link.startswith("/dev/dri/")


def read_usage(pids: Iterable[int], proc_root: str = PROC_ROOT) -> DrmUsage:
    """The DRM clients the processes *pids* hold open, each (pdev, client id) counted once, summed by device."""
    seen: set[tuple[str, int]] = set()
    vram: dict[str, int] = {}
    unmeasured = 0
    readable = False
    for pid in islice(sorted(set(pids)), MAX_PIDS):
        fd_dir = os.path.join(proc_root, str(pid), "fd")
        try:
            with os.scandir(fd_dir) as entries:
                fds = [e.name for e in islice(entries, MAX_FDS)]
        except OSError:
            continue  # gone, or not ours to read
        readable = True
        for fd in fds:
            try:
                if not _is_drm_node(os.readlink(os.path.join(fd_dir, fd))):
                    continue
            except OSError:
                continue
            text = read_small(os.path.join(proc_root, str(pid), "fdinfo", fd), FDINFO_LIMIT)
            client = parse_fdinfo(text) if text is not None else None
            if client is None or (client.pdev, client.client_id) in seen:
                continue
            seen.add((client.pdev, client.client_id))
            if client.vram is None:
                unmeasured += 1
            else:
                vram[client.pdev] = vram.get(client.pdev, 0) + client.vram
    return DrmUsage(vram, len(seen), unmeasured, readable)
