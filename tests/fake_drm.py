"""A fake DRM sysfs of real cards' layout (amdgpu, xe), and a private mount namespace that shows it at the real
paths (/sys/class/drm, /sys/class/hwmon, the PCI devices under /sys/devices/pci0000:00): this machine has no GPU.

The layout is a real Radeon's (a Navi 31 behind a PCIe switch, as on a desktop board):
  /sys/class/drm/card0 -> ../../devices/pci0000:00/0000:00:01.1/0000:01:00.0/0000:02:00.0/0000:03:00.0/drm/card0
  .../0000:03:00.0/{uevent, driver ->, mem_info_vram_total, mem_info_vram_used, unique_id, hwmon/hwmon3/...}
  .../drm/card0/{device -> ../../../0000:03:00.0, dev, uevent, card0-DP-1/}, .../drm/renderD128/
  /sys/class/hwmon/hwmon3 -> ../../devices/pci0000:00/.../0000:03:00.0/hwmon/hwmon3
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GiB = 1024**3
BRIDGES = ("0000:00:01.1", "0000:01:00.0", "0000:02:00.0")


@dataclass
class FakeCard:
    number: int = 0
    bus: str = "0000:03:00.0"
    driver: str = "amdgpu"
    total: int | None = 24 * GiB
    used: int | None = 20 * GiB
    # (label, celsius, crit): amdgpu's temp1 edge, temp2 junction, temp3 mem
    sensors: list[tuple[str, float, float | None]] = field(default_factory=lambda: [
        ("edge", 45.0, 100.0), ("junction", 60.0, 110.0), ("mem", 50.0, 105.0)])
    hwmon: int = 3
    pci_id: str = "1002:744C"
    unique_id: str = "a1b2c3d4e5f60718"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def device_dir(sysfs: Path, card: FakeCard) -> Path:
    return sysfs.joinpath("devices", "pci0000:00", *BRIDGES, card.bus)


def build_sysfs(sysfs: Path, cards: list[FakeCard]) -> Path:
    """*sysfs* (a stand-in for /sys) holding class/drm, class/hwmon and devices/pci0000:00 for *cards*."""
    (sysfs / "class" / "drm").mkdir(parents=True, exist_ok=True)
    (sysfs / "class" / "hwmon").mkdir(parents=True, exist_ok=True)
    _write(sysfs / "class" / "drm" / "version", "drm 1.1.0 20060810\n")
    for card in cards:
        dev = device_dir(sysfs, card)
        rel = "/".join(("pci0000:00", *BRIDGES, card.bus))
        _write(dev / "uevent", f"DRIVER={card.driver}\nPCI_CLASS=30000\nPCI_ID={card.pci_id}\n"
                               f"PCI_SUBSYS_ID=1DA2:E471\nPCI_SLOT_NAME={card.bus}\n"
                               f"MODALIAS=pci:v00001002d0000744Csv00001DA2sd0000E471bc03sc00i00\n")
        _link(dev / "driver", f"../../../../../../bus/pci/drivers/{card.driver}")
        _write(dev / "vendor", "0x1002\n" if card.driver == "amdgpu" else "0x8086\n")
        if card.total is not None:
            _write(dev / "mem_info_vram_total", f"{card.total}\n")
        if card.used is not None:
            _write(dev / "mem_info_vram_used", f"{card.used}\n")
        _write(dev / "unique_id", f"{card.unique_id}\n")
        minor = dev / "drm" / f"card{card.number}"
        _link(minor / "device", f"../../../{card.bus}")
        _write(minor / "dev", f"226:{card.number}\n")
        _write(minor / "uevent", f"MAJOR=226\nMINOR={card.number}\nDEVNAME=dri/card{card.number}\nDEVTYPE=drm_minor\n")
        _write(minor / f"card{card.number}-DP-1" / "status", "disconnected\n")
        render = dev / "drm" / f"renderD{128 + card.number}"
        _write(render / "dev", f"226:{128 + card.number}\n")
        drm = f"../../devices/{rel}/drm"
        _link(sysfs / "class" / "drm" / f"card{card.number}", f"{drm}/card{card.number}")
        _link(sysfs / "class" / "drm" / f"card{card.number}-DP-1", f"{drm}/card{card.number}/card{card.number}-DP-1")
        _link(sysfs / "class" / "drm" / f"renderD{128 + card.number}", f"{drm}/renderD{128 + card.number}")
        if card.sensors:
            hw = dev / "hwmon" / f"hwmon{card.hwmon}"
            _write(hw / "name", f"{card.driver}\n")
            _link(hw / "device", "../../../" + card.bus)
            for i, (label, celsius, crit) in enumerate(card.sensors, 1):
                _write(hw / f"temp{i}_input", f"{int(celsius * 1000)}\n")
                _write(hw / f"temp{i}_label", f"{label}\n")
                if crit is not None:
                    _write(hw / f"temp{i}_crit", f"{int(crit * 1000)}\n")
            _link(sysfs / "class" / "hwmon" / f"hwmon{card.hwmon}", f"../../devices/{rel}/hwmon/hwmon{card.hwmon}")
    return sysfs


# Mounts the fake tree at the real paths, runs the command (not exec'd: its parent is this shell, which ends
# after it, as a user's shell would), and leaves with the namespace: its mounts go with it.
_MOUNTS = ('mount -t tmpfs none /sys/class && mkdir /sys/class/drm /sys/class/hwmon && '
           'mount --bind "$1/class/drm" /sys/class/drm && mount --bind "$1/class/hwmon" /sys/class/hwmon && '
           'mount --bind "$1/devices/pci0000:00" /sys/devices/pci0000:00 && shift && "$@"; exit $?')


def namespace_argv(sysfs: Path, argv: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _MOUNTS, "sh", str(sysfs), *argv]


def require_namespace() -> None:
    """Skip unless this process may make a private mount namespace and mount in it (root, unshare(1))."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount the fake sysfs in a private mount namespace")
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    if not os.path.isdir("/sys/devices/pci0000:00"):
        pytest.skip("no /sys/devices/pci0000:00 to mount the fake PCI devices over")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs none /sys/class"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private mount namespace here: {probe.stderr.strip()}")


def write_fdinfo(proc: Path, pid: int, fd: int, record: str, target: str = "/dev/dri/renderD128") -> None:
    """One fd of *pid* in a fake /proc: fd/<fd> a link to *target*, fdinfo/<fd> the kernel's *record*."""
    (proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "fdinfo").mkdir(parents=True, exist_ok=True)
    os.symlink(target, proc / str(pid) / "fd" / str(fd))
    (proc / str(pid) / "fdinfo" / str(fd)).write_text(record)


def amdgpu_record(client: int, vram_kib: int, pdev: str = "0000:03:00.0", *, newer: bool = True) -> str:
    """An amdgpu fdinfo record in the kernel's format: the older drm-memory-* keys, and (newer) drm-total/resident-*."""
    text = (f"pos:\t0\nflags:\t02100002\nmnt_id:\t26\nino:\t1085\ndrm-driver:\tamdgpu\ndrm-client-id:\t{client}\n"
            f"drm-pdev:\t{pdev}\npasid:\t32771\ndrm-memory-vram:\t{vram_kib} KiB\ndrm-memory-gtt: \t2048 KiB\n"
            f"drm-memory-cpu: \t0 KiB\n")
    if newer:
        text += (f"drm-total-vram:\t{vram_kib} KiB\ndrm-shared-vram:\t0\ndrm-resident-vram:\t{vram_kib} KiB\n"
                 f"drm-total-gtt:\t2048 KiB\ndrm-resident-gtt:\t2048 KiB\n")
    return text + "drm-engine-gfx:\t1234567 ns\ndrm-engine-compute:\t0 ns\namd-evicted-vram:\t0 KiB\n"
