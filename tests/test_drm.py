"""AMD and Intel cards through the kernel (safegate.probes.drm): the sysfs reader on trees of real cards'
layout, the fdinfo reader on records in the kernel's documented format (a fake /proc root), hostile files,
property tests for every parser, and what the policy and exec's watchers make of the cards."""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path

import pytest
from fake_drm import FakeCard, GiB, amdgpu_record, build_sysfs, device_dir, write_fdinfo
from hypothesis import given, settings
from hypothesis import strategies as st

from safegate.config.model import ThermalConfig
from safegate.exitcodes import ExitCode
from safegate.gate.policy import (
    GPU_CRIT_MARGIN,
    Status,
    check_gpu,
    check_thermal,
    select_gpus,
)
from safegate.probes import drm
from safegate.probes.drm import DrmUsage, parse_fdinfo, read_cards, read_usage
from safegate.probes.gpu import read_gpus
from safegate.probes.snapshots import GpuInfo, GpuSensor, GpuSnapshot, ThermalSnapshot
from safegate.run.jobrun import gpu_env
from safegate.run.limits import GpuLimits, WatchLimits
from safegate.run.supervisor import Supervisor
from safegate.run.watchers import GpuWatch, ThermalWatch
from safegate.units import Size

MiB = 1024**2
MARGIN = Size(percent=10.0)
NO_CPU = ThermalSnapshot(())


def tree(tmp_path: Path, *cards: FakeCard) -> str:
    return str(build_sysfs(tmp_path / "sys", list(cards)) / "class" / "drm")


# --- the sysfs reader -------------------------------------------------------------------------------------------


def test_an_amd_card_is_read_from_its_sysfs(tmp_path: Path) -> None:
    gpus, notes = read_cards(tree(tmp_path, FakeCard()))
    assert notes == ()
    (g,) = gpus  # card0-DP-1, renderD128 and the version file are not cards
    assert (g.index, g.vendor, g.vendor_index, g.bus_id) == (0, "amd", 0, "0000:03:00.0")
    assert (g.total, g.used, g.free) == (24 * GiB, 20 * GiB, 4 * GiB)
    assert g.temp == 45.0 and g.uuid == "GPU-a1b2c3d4e5f60718" and g.name == "amdgpu 1002:744C"
    assert g.hotspots == (GpuSensor("junction", 60.0, 110.0), GpuSensor("mem", 50.0, 105.0))


def test_cards_are_numbered_after_nvidias_in_card_order_and_counted_per_vendor(tmp_path: Path) -> None:
    cards = [FakeCard(number=2, bus="0000:0c:00.0", hwmon=5), FakeCard(number=0, bus="0000:03:00.0"),
             FakeCard(number=1, bus="0000:07:00.0", driver="xe", total=None, used=None, hwmon=4,
                      sensors=[("pkg", 55.0, None), ("vram", 60.0, None)])]
    gpus, _ = read_cards(tree(tmp_path, *cards), first_index=2)
    assert [(g.index, g.vendor, g.vendor_index, g.bus_id) for g in gpus] == [
        (2, "amd", 0, "0000:03:00.0"), (3, "intel", 0, "0000:07:00.0"), (4, "amd", 1, "0000:0c:00.0")]
    intel = gpus[1]
    assert intel.temp == 55.0 and intel.total is None and intel.hotspots == (GpuSensor("vram", 60.0, None),)


def test_other_drivers_and_integrated_intel_are_left_out(tmp_path: Path) -> None:
    cards = [FakeCard(number=0, driver="nvidia"), FakeCard(number=1, bus="0000:00:02.0", driver="i915", sensors=[],
                                                            total=None, used=None)]
    assert read_cards(tree(tmp_path, *cards)) == ((), ())


def test_a_driver_link_is_enough_without_uevent(tmp_path: Path) -> None:
    root = tree(tmp_path, FakeCard())
    os.remove(device_dir(tmp_path / "sys", FakeCard()) / "uevent")
    (g,), _ = read_cards(root)
    assert g.vendor == "amd" and g.bus_id == "0000:03:00.0"  # the device directory's own name


def test_no_drm_class_is_no_cards(tmp_path: Path) -> None:
    assert read_cards(str(tmp_path / "absent")) == ((), ())


@pytest.mark.parametrize("content", ["", "garbage\n", "-5\n", "1e9\n", "99999999999999999999999\n", "\x00\xff"])
def test_bad_vram_files_are_a_note_and_unknown_memory(tmp_path: Path, content: str) -> None:
    root = tree(tmp_path, FakeCard())
    (device_dir(tmp_path / "sys", FakeCard()) / "mem_info_vram_used").write_text(content)
    (g,), notes = read_cards(root)
    assert (g.total, g.used, g.free) == (None, None, None) and "VRAM unreadable" in notes[0]


def test_used_above_total_is_not_believed(tmp_path: Path) -> None:
    (g,), notes = read_cards(tree(tmp_path, FakeCard(total=4 * GiB, used=8 * GiB)))
    assert g.free is None and notes


def test_hostile_files_do_not_hang_or_crash(tmp_path: Path) -> None:
    root = tree(tmp_path, FakeCard())
    dev = device_dir(tmp_path / "sys", FakeCard())
    os.remove(dev / "mem_info_vram_total")
    os.mkfifo(dev / "mem_info_vram_total")  # a FIFO would block a plain open
    os.remove(dev / "mem_info_vram_used")
    (dev / "mem_info_vram_used").mkdir()
    hw = dev / "hwmon" / "hwmon3"
    (hw / "temp2_input").write_text("9" * 100_000)  # far beyond a page
    (hw / "temp3_input").write_text("-273150\n")  # implausible
    (hw / "temp1_label").write_text("\x1b[31medge\n")
    for i in range(4, 40):  # more sensors than are read
        (hw / f"temp{i}_input").write_text("50000\n")
    (g,), notes = read_cards(root)
    assert g.total is None and len(g.hotspots) <= drm.MAX_SENSORS
    assert "\x1b" not in "".join(notes) + "".join(h.label for h in g.hotspots)
    assert any("temp2" in n or "junction" in n for n in notes)


def test_at_most_max_cards(tmp_path: Path) -> None:
    cards = [FakeCard(number=n, bus=f"0000:{n + 16:02x}:00.0", hwmon=n) for n in range(drm.MAX_CARDS + 4)]
    gpus, _ = read_cards(tree(tmp_path, *cards))
    assert len(gpus) == drm.MAX_CARDS and gpus[-1].bus_id == f"0000:{drm.MAX_CARDS - 1 + 16:02x}:00.0"


def test_read_gpus_backends_and_drm(tmp_path: Path) -> None:
    root = tree(tmp_path, FakeCard())
    assert [g.vendor for g in read_gpus("drm", root).gpus] == ["amd"]
    assert read_gpus("drm", root).status == "ok"
    assert read_gpus("none", root).gpus == ()
    assert read_gpus("drm", str(tmp_path / "none")).status == "none"


# --- parsers, property-based ------------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


@given(text)
def test_sysfs_parsers_never_raise(raw: str) -> None:
    assert drm.parse_uint(raw) is None or drm.parse_uint(raw) >= 0  # type: ignore[operator]
    c = drm.parse_millidegrees(raw)
    assert c is None or drm.PLAUSIBLE[0] < c < drm.PLAUSIBLE[1]
    assert all(isinstance(v, str) for v in drm.parse_uevent(raw).values())
    s = drm.parse_size_value(raw)
    assert s is None or 0 <= s <= drm.MAX_BYTES


@given(st.integers(-39_999, 199_999))
def test_millidegrees_round_trip(milli: int) -> None:
    assert drm.parse_millidegrees(f"{milli}\n") == milli / 1000


@given(st.integers(0, 2**40), st.sampled_from(["", " B", " KiB", " MiB", " GiB"]))
def test_sizes_with_units(n: int, unit: str) -> None:
    factor = {"": 1, " B": 1, " KiB": 1024, " MiB": 1024**2, " GiB": 1024**3}[unit]
    expected = n * factor if n * factor <= drm.MAX_BYTES else None
    assert drm.parse_size_value(f"{n}{unit}") == expected


@given(text)
def test_fdinfo_parser_never_raises(raw: str) -> None:
    client = parse_fdinfo(raw)
    assert client is None or (client.client_id >= 0 and (client.vram is None or client.vram >= 0))


keys = st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=20)


@given(st.integers(0, 2**32), st.integers(0, 2**30), st.booleans(),
       st.lists(st.tuples(keys, st.text(alphabet=string.printable.strip(), max_size=20)), max_size=10))
def test_fdinfo_records_in_the_documented_format(client: int, kib: int, newer: bool,
                                                 noise: list[tuple[str, str]]) -> None:
    extra = "".join(f"{k}:\t{v}\n" for k, v in noise if not k.startswith("drm-"))
    got = parse_fdinfo(amdgpu_record(client, kib, newer=newer) + extra)
    assert got is not None and (got.driver, got.client_id, got.pdev) == ("amdgpu", client, "0000:03:00.0")
    assert got.vram == kib * 1024


def test_fdinfo_region_choice() -> None:
    xe = ("drm-driver:\txe\ndrm-client-id:\t3\ndrm-pdev:\t0000:03:00.0\ndrm-total-vram0:\t23992 KiB\n"
          "drm-shared-vram0:\t16 MiB\ndrm-resident-vram0:\t23000 KiB\ndrm-total-gtt:\t192 KiB\n")
    assert parse_fdinfo(xe) == drm.DrmClient("xe", 3, "0000:03:00.0", 23000 * 1024)
    i915 = "drm-driver: i915\ndrm-client-id: 7\ndrm-total-local0: 2 MiB\ndrm-total-system0: 9 MiB\n"
    assert parse_fdinfo(i915) == drm.DrmClient("i915", 7, "", 2 * MiB)
    no_vram = "drm-driver: amdgpu\ndrm-client-id: 1\ndrm-engine-gfx: 5 ns\n"
    assert parse_fdinfo(no_vram) == drm.DrmClient("amdgpu", 1, "", None)
    assert parse_fdinfo("pos: 0\nflags: 02\n") is None  # not a DRM fd
    assert parse_fdinfo("drm-driver: amdgpu\ndrm-client-id: x\n") is None


# --- the fdinfo reader on a fake /proc ---------------------------------------------------------------------------


def test_fdinfo_usage_counts_each_client_once(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_fdinfo(proc, 100, 5, amdgpu_record(11, 1024 * 1024))  # 1 GiB
    write_fdinfo(proc, 100, 6, amdgpu_record(11, 1024 * 1024))  # a dup of the same client
    write_fdinfo(proc, 101, 5, amdgpu_record(11, 1024 * 1024))  # inherited by a child after fork
    write_fdinfo(proc, 101, 7, amdgpu_record(12, 512 * 1024, newer=False))  # the child's own, an older kernel
    write_fdinfo(proc, 101, 8, amdgpu_record(13, 256, pdev="0000:0c:00.0"), target="/dev/dri/card1")
    write_fdinfo(proc, 101, 9, "pos: 0\nflags: 02\n", target="/home/u/model.bin")  # not a DRM node: not read
    write_fdinfo(proc, 102, 3, amdgpu_record(99, 4 * 1024 * 1024))  # another process, not asked about
    usage = read_usage([100, 101, 4242], str(proc))
    assert usage == DrmUsage({"0000:03:00.0": GiB + GiB // 2, "0000:0c:00.0": 256 * 1024}, 3, 0, True)
    assert read_usage([4242], str(proc)) == DrmUsage({}, 0, 0, False)


def test_fdinfo_of_a_real_process_without_gpu_is_zero(procs: object) -> None:
    usage = read_usage([os.getpid()])
    assert usage.readable and usage.vram == {} and usage.clients == 0


# --- policy ------------------------------------------------------------------------------------------------------


def amd(index: int = 0, free: int = 4 * GiB, temp: float = 45.0, junction: tuple[float, float | None] = (60, 110),
        **kw: object) -> GpuInfo:
    total = 24 * GiB
    return GpuInfo(index, "amdgpu 1002:744C", "", total=total, used=total - free, free=free, temp=temp,
                   vendor="amd", vendor_index=kw.pop("vendor_index", 0), bus_id="0000:03:00.0",  # type: ignore[arg-type]
                   hotspots=(GpuSensor("junction", junction[0], junction[1]),), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("junction", "crit", "blocks"), [(99, 100, True), (95, 110, False), (95, 100, True),
                                                          (94.9, 100, False), (120, None, False)])
def test_junction_against_its_own_crit(junction: float, crit: float | None, blocks: bool) -> None:
    result = check_thermal(NO_CPU, 80.0, require=False, gpus=[amd(junction=(junction, crit))])
    assert (result.status is Status.FAIL) is blocks
    if blocks:
        assert result.code == ExitCode.THERMAL and "junction" in result.reason and "critical" in result.reason
    assert GPU_CRIT_MARGIN == 5.0


def test_the_edge_sensor_against_max_temp() -> None:
    result = check_thermal(NO_CPU, 80.0, require=False, gpus=[amd(temp=85.0)])
    assert result.status is Status.FAIL and result.code == ExitCode.THERMAL and "85 C >= 80 C" in result.reason
    assert check_thermal(NO_CPU, 80.0, require=False, gpus=[amd(temp=79.0)]).status is Status.PASS


def test_resuming_needs_twice_the_margin_below_crit() -> None:
    gpu = amd(junction=(92, 100))
    assert check_thermal(NO_CPU, 80.0, require=False, gpus=[gpu]).status is Status.PASS
    assert check_thermal(NO_CPU, 70.0, require=False, resuming=True, gpus=[gpu]).status is Status.FAIL


def test_amd_vram_in_the_gpu_check() -> None:
    snap = GpuSnapshot("auto", "ok", (amd(free=4 * GiB),))
    result = check_gpu(snap, select_gpus(snap, None, None), 8 * GiB, MARGIN)
    assert result.status is Status.FAIL and result.code == ExitCode.GPU_MEMORY
    snap = GpuSnapshot("auto", "ok", (amd(free=12 * GiB),))
    assert check_gpu(snap, select_gpus(snap, None, None), 8 * GiB, MARGIN).status is Status.PASS


def test_presets_narrow_each_vendor_alone() -> None:
    nv = GpuInfo(0, "nv", "GPU-0", total=GiB, used=0, free=GiB)
    cards = (nv, amd(1, vendor_index=0), amd(2, vendor_index=1), amd(3, vendor_index=2))
    snap = GpuSnapshot("auto", "ok", cards)
    assert [g.index for g in select_gpus(snap, None, "").gpus] == [1, 2, 3]  # CUDA's preset hides NVIDIA only
    assert [g.index for g in select_gpus(snap, None, None, ("2,1", None)).gpus] == [0, 3, 2]  # in ROCR's order
    assert [g.index for g in select_gpus(snap, None, None, (None, "0")).gpus] == [0, 1]
    # HIP counts what ROCR left: ROCR 1,2 leaves cards 2 and 3; HIP 1 is the second of them
    assert [g.index for g in select_gpus(snap, None, None, ("1,2", "1")).gpus] == [0, 3]
    assert [g.index for g in select_gpus(snap, (3,), None, ("1", None)).gpus] == []


def test_gpu_env_for_each_vendor(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = GpuInfo(0, "nv", "GPU-0")
    cards = (nv, amd(1, vendor_index=0), amd(2, vendor_index=1))
    assert gpu_env((2,), cards) == {"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0"}
    assert gpu_env((0, 1, 2), cards) == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                         "ROCR_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "0,1"}
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "0")
    assert gpu_env((2,), cards) == {}  # the caller's choice stands


# --- exec's watchers ---------------------------------------------------------------------------------------------


def test_the_thermal_watch_judges_hot_spots_against_crit() -> None:
    limits = WatchLimits(max_mem=None, min_available=None, max_temp=80.0, resume_temp=70.0, on_hot="kill", grace=1.0,
                         interval=0.01, warn_signal=None, thermal=ThermalConfig())
    watch = ThermalWatch(limits)
    readings = watch.readings((), [amd(junction=(99, 100))])
    assert [(r.key, r.hot_at, r.cool_at) for r in readings] == [("GPU 0", 80.0, 70.0), ("GPU 0 junction", 95.0, 90.0)]
    action = watch.check(readings, paused=False)
    assert action.code == ExitCode.KILLED_HOT and "junction" in action.message


def test_gpu_watch_takes_drm_cards_vram_from_fdinfo() -> None:
    watch = GpuWatch(GpuLimits("drm", (0,), 2 * GiB, None, None))
    card = amd(free=4 * GiB)
    usage = DrmUsage({"0000:03:00.0": GiB, "0000:99:00.0": 7 * GiB}, 2, 0, True)
    assert watch.job_vram([card], {100}, {}, usage) == GiB  # another card's use is not this card's
    assert watch.job_vram([card], {100}, {}, DrmUsage({}, 0, 0, True)) == 0  # no DRM client: none used
    grown = amd(free=3 * GiB)  # 1 GiB more used since the first sample
    assert watch.job_vram([grown], {100}, {}, DrmUsage({}, 1, 1, True)) == GiB  # no VRAM key: the card's growth
    assert watch.job_vram([grown], {100}, {}, None) == GiB


def test_exec_watch_sums_the_jobs_fdinfo_vram_and_stops_it_at_max_gpu_mem(tmp_path: Path) -> None:
    """The supervisor's sampler reads the job's processes' fdinfo (records in the kernel's format under a fake
    /proc, for the job's pids) on an AMD card: 1.5 GiB warns at 90% of --max-gpu-mem 1.6 GiB, 2 GiB stops it."""
    from msgspec.structs import replace
    from test_supervisor import Clock, FakeJob, Machine, limits

    proc = tmp_path / "proc"
    write_fdinfo(proc, 100, 5, amdgpu_record(11, 1024 * 1024))
    write_fdinfo(proc, 101, 5, amdgpu_record(11, 1024 * 1024))  # the child shares its parent's client
    write_fdinfo(proc, 101, 6, amdgpu_record(12, 512 * 1024))
    seen: list[set[int]] = []

    def usage(pids: Iterable[int]) -> DrmUsage:
        seen.append(set(pids))
        return read_usage(pids, str(proc))

    clock, machine, events = Clock(), Machine(gpus=(amd(free=20 * GiB),)), []
    lim = limits(max_mem=None, gpu=GpuLimits("drm", (0,), int(1.6 * GiB), None, None))
    sup = Supervisor(["job"], lim, events.append, clock=clock, probes=replace(machine.probes(), drm_usage=usage))
    sup.attach(FakeJob())
    clock.now = 1000.0
    sup.step()
    assert seen == [{100, 101}]
    assert [e.kind for e in events] == ["warning"] and "1.5 GiB is 94% of --max-gpu-mem" in events[0].message
    (proc / "101" / "fdinfo" / "6").write_text(amdgpu_record(12, 1024 * 1024))
    clock.now = 1000.2
    sup.step()
    assert events[-1].kind == "breach" and events[-1].data["reason"] == "gpu"
    assert events[-1].data["job_gpu_memory"] == 2 * GiB and "--max-gpu-mem" in events[-1].message


@settings(max_examples=30)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 10), st.integers(0, 2**20)), max_size=12))
def test_usage_is_the_sum_of_distinct_clients(tmp_path_factory: pytest.TempPathFactory,
                                              fds: list[tuple[int, int, int]]) -> None:
    proc = tmp_path_factory.mktemp("proc")
    expected: dict[int, int] = {}
    for n, (pid, client, kib) in enumerate(fds):
        size = expected.setdefault(client, kib * 1024)  # one client has one size, wherever it shows
        write_fdinfo(proc, pid, 10 + n, amdgpu_record(client, size // 1024))
    usage = read_usage(range(1, 6), str(proc))
    assert usage.vram.get("0000:03:00.0", 0) == sum(expected.values()) and usage.clients == len(expected)




def test_an_intel_card_without_memory_figures_counts_its_need_against_ram() -> None:
    intel = GpuInfo(0, "xe 8086:56A0", "", temp=50.0, vendor="intel", vendor_index=0, bus_id="0000:07:00.0")
    snap = GpuSnapshot("drm", "ok", (intel,))
    result = check_gpu(snap, select_gpus(snap, None, None), 8 * GiB, MARGIN)
    assert result.status is Status.PASS and "reports no memory use (Intel)" in result.reason


def test_completion_offers_the_drm_cards_after_nvidias(tmp_path: Path) -> None:
    from safegate.probes.gpu import gpu_indexes

    (tmp_path / "proc" / "driver" / "nvidia" / "gpus" / "0000:01:00.0").mkdir(parents=True)
    root = tree(tmp_path, FakeCard(number=0, driver="nvidia", bus="0000:01:00.0", hwmon=1),  # NVML's card
                FakeCard(number=1, bus="0000:03:00.0"))
    assert gpu_indexes(str(tmp_path / "proc"), root) == (0, 1)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["uevent", "mem_info_vram_total", "mem_info_vram_used", "unique_id",
                                        "product_name", "hwmon/hwmon3/temp1_input", "hwmon/hwmon3/temp1_label",
                                        "hwmon/hwmon3/temp2_input", "hwmon/hwmon3/temp2_crit"]),
                       st.binary(max_size=200), max_size=9))
def test_any_file_contents_are_read_without_error(tmp_path_factory: pytest.TempPathFactory,
                                                  files: dict[str, bytes]) -> None:
    base = tmp_path_factory.mktemp("sys")
    root = str(build_sysfs(base, [FakeCard()]) / "class" / "drm")
    for name, content in files.items():
        (device_dir(base, FakeCard()) / name).write_bytes(content)
    gpus, notes = read_cards(root)
    for g in gpus:
        assert g.free is None or 0 <= g.free <= (g.total or 0)
        assert all(s.label.isprintable() for s in g.hotspots) and all(n.isprintable() for n in notes)
