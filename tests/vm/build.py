#!/usr/bin/env python3
"""Build (or find cached) the test VM: a Debian bookworm kernel, a busybox initramfs and an ext4 root filesystem.

Everything is cached outside the repo, in $SAFEGATE_VM_CACHE (default /var/tmp/safegate-vm):

    kernel-<kver>/vmlinuz             the Debian kernel's bzImage, booted as it is with qemu -kernel
    initrd-<kver>-<recipe>.cpio.gz    busybox + the virtio/9p/ext4 modules of that kernel, /init mounts /dev/vda
    base-<packages>/                  debootstrap --variant=minbase + systemd, python3 (the slow step, ~1 min)
    rootfs-<recipe>.ext4              that tree configured (user, runner unit), made with mkfs.ext4 -d (no loop)

<recipe> is a hash of this file, so changing the recipe rebuilds; a new Debian kernel rebuilds the kernel and
initramfs only. Run as a script to build and print the artefacts' paths (`python3 tests/vm/build.py`).
Nothing outside the cache is written except host packages installed with apt-get when missing (as root).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("SAFEGATE_VM_CACHE", "/var/tmp/safegate-vm"))
MIRROR = os.environ.get("SAFEGATE_VM_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
RECIPE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
TESTER = "tester"
TESTER_UID = 1500
ROOTFS_SIZE = "2G"
GUEST_PACKAGES = ["systemd-sysv", "udev", "dbus", "dbus-user-session", "libpam-systemd", "python3", "python3-venv"]
# Loaded in this order by /init (dependencies are added before each); crc32c for ext4's metadata checksums.
WANTED_MODULES = ["crc32c_generic", "virtio_pci", "virtio_blk", "virtio_rng", "ext4", "9pnet_virtio", "9p"]
# Host tools: (command, Debian package).
HOST_TOOLS = [("qemu-system-x86_64", "qemu-system-x86"), ("debootstrap", "debootstrap"), ("busybox", "busybox-static")]


class Unavailable(Exception):
    """The VM cannot be had here (no QEMU, no network for the build, not root): tests skip with this reason."""


@dataclass(frozen=True)
class Artefacts:
    kernel: Path
    initrd: Path
    rootfs: Path
    kver: str


def log(msg: str) -> None:
    print(f"[vm-build {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as e:
        raise Unavailable(f"{cmd[0]} timed out after {timeout}s (no network?)") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise Unavailable(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {' | '.join(tail)}")
    return proc  # type: ignore[no-any-return]


def ensure_host_tools() -> None:
    """Install qemu-system-x86, debootstrap and busybox-static with apt-get when missing (root only)."""
    missing = [pkg for tool, pkg in HOST_TOOLS if shutil.which(tool) is None]
    if shutil.which("busybox") and not _is_static(Path(shutil.which("busybox") or "")):
        missing.append("busybox-static")
    for tool in ("dpkg-deb", "apt-get", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not found: the VM build needs a Debian host")
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"missing {', '.join(missing)} and not root to apt-get install them")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], timeout=300, env=env)
    except Unavailable:
        run(["apt-get", "update", "-q"], timeout=300, env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], timeout=300, env=env)
    still = [tool for tool, _ in HOST_TOOLS if shutil.which(tool) is None]
    if still:
        raise Unavailable(f"still missing after apt-get: {', '.join(still)}")


def _is_static(path: Path) -> bool:
    # A static ELF has no PT_INTERP program header; the interpreter's path would be in the first pages.
    head = path.read_bytes()[:8192]
    return b"/lib64/ld-linux" not in head and b"ld-linux-x86-64" not in head


@contextmanager
def cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def kernel_package() -> str:
    """The bookworm kernel package linux-image-amd64 depends on now (linux-image-6.1.0-N-amd64)."""
    try:
        out = run(["apt-cache", "depends", "linux-image-amd64"], timeout=60).stdout
        found = re.findall(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", out)
    except Unavailable:
        found = []
    if not found:
        out = run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"], timeout=60).stdout
        found = sorted(re.findall(r"^(linux-image-6\.1\.0-\d+-amd64) ", out, re.M), key=lambda n: int(n.split("-")[3]))
    if not found:
        cached = sorted(CACHE.glob("kernel-6.1.0-*-amd64/vmlinuz"))
        if cached:
            return "linux-image-" + cached[-1].parent.name.removeprefix("kernel-")
        raise Unavailable("no linux-image-6.1.0-*-amd64 known to apt (apt-get update?)")
    return found[-1]


def build_kernel(pkg: str) -> tuple[Path, str]:
    """Download the kernel package, keep its bzImage and its modules (the tree, for the initramfs)."""
    kver = pkg.removeprefix("linux-image-")
    dest = CACHE / f"kernel-{kver}"
    if (dest / "vmlinuz").exists():
        return dest, kver
    log(f"kernel: apt-get download {pkg}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user downloads into it
        try:
            run(["apt-get", "download", pkg], timeout=300, cwd=tmp)
        except Unavailable:
            run(["apt-get", "update", "-q"], timeout=300)
            run(["apt-get", "download", pkg], timeout=300, cwd=tmp)
        deb = next(Path(tmp).glob("*.deb"))
        x = Path(tmp) / "x"
        run(["dpkg-deb", "-x", str(deb), str(x)], timeout=300)
        vmlinuz = x / "boot" / f"vmlinuz-{kver}"
        if b"HdrS" not in vmlinuz.read_bytes()[:1024]:
            raise Unavailable(f"{vmlinuz.name} is not a bzImage")
        part = Path(tmp) / "kernel"
        part.mkdir()
        shutil.copy2(vmlinuz, part / "vmlinuz")
        shutil.copy2(x / "boot" / f"config-{kver}", part / "config")
        shutil.move(str(x / "lib" / "modules" / kver), str(part / "modules"))
        os.rename(part, dest)
    return dest, kver


def _modinfo(path: Path) -> dict[str, list[str]]:
    """The .modinfo strings of a module (depends=, softdep=), without modinfo(8)."""
    info: dict[str, list[str]] = {}
    for chunk in path.read_bytes().split(b"\0"):
        for key in (b"depends=", b"softdep="):
            if chunk.startswith(key):
                info.setdefault(key[:-1].decode(), []).append(chunk[len(key) :].decode(errors="replace"))
    return info


def resolve_modules(moddir: Path, wanted: list[str]) -> list[Path]:
    """The wanted modules and everything they depend on, in load order (dependencies first)."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in (moddir / "kernel").rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise Unavailable(f"module {name} not in the kernel package")
        info = _modinfo(index[name])
        deps = [d for d in ",".join(info.get("depends", [])).split(",") if d]
        for soft in info.get("softdep", []):  # "pre: crc32c" (a crypto alias: crc32c_generic is loaded first)
            deps += [d for d in soft.split("post:")[0].removeprefix("pre:").split() if d.replace("-", "_") in index]
        for dep in deps:
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


INIT = """#!/bin/busybox sh
# safegate test VM initramfs: load the virtio/9p/ext4 modules, mount /dev/vda, switch_root to systemd.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  if [ "$i" -gt 300 ]; then echo "initramfs: no /dev/vda after 30 s"; poweroff -f; fi
  usleep 100000
done
mount -t ext4 -o rw,noatime /dev/vda /newroot || { echo "initramfs: mount /dev/vda failed"; poweroff -f; }
mount --move /dev /newroot/dev
mount --move /sys /newroot/sys
mount --move /proc /newroot/proc
exec switch_root /newroot /sbin/init
"""


class Cpio:
    """A newc cpio archive written in Python (no cpio(1) needed, device nodes without mknod)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nameb)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def close(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initrd(kdir: Path, kver: str) -> Path:
    dest = CACHE / f"initrd-{kver}-{RECIPE}.cpio.gz"
    if dest.exists():
        return dest
    log("initramfs: busybox + modules")
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    mods = resolve_modules(kdir / "modules", WANTED_MODULES)
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        c.dir(d)
    c.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("init", INIT.encode(), 0o755)
    for m in mods:
        c.file(f"modules/{m.name}", m.read_bytes())
    c.file("modules.order", "".join(f"{m.name}\n" for m in mods).encode())
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.close(), compresslevel=6))
    os.rename(tmp, dest)
    for old in CACHE.glob("initrd-*.cpio.gz"):  # other recipes' or kernels'
        if old != dest:
            old.unlink()
    return dest


# The guest's runner: mounts the output share and the shares it lists, runs each scenario, powers off.
RUNNER = r"""#!/bin/sh
# safegate test VM runner (started by sgvm-run.service). Protocol, all in the output share (tag sgvm-out):
#   shares           lines "TAG PATH ro|rw": 9p shares to mount at PATH (the host's own absolute path)
#   s/NNN/script     a scenario: run with sh as root, or as s/NNN/user when that file is not empty
#   s/NNN/timeout    seconds; -> s/NNN/stdout, s/NNN/stderr, s/NNN/rc (124 = timed out), s/NNN/times
#   ready, done      uptime when the first scenario could start / when all had run
OUT=/run/sgvm/out
mkdir -p "$OUT"
opts=trans=virtio,version=9p2000.L,msize=524288,cache=none
if ! mount -t 9p -o "$opts" sgvm-out "$OUT"; then
  echo "sgvm: no output share" > /dev/console
  systemctl poweroff -ff
fi
while read -r tag path mode; do
  mkdir -p "$path"
  mount -t 9p -o "$opts,$mode" "$tag" "$path" || echo "mount $tag at $path failed" >> "$OUT/errors"
done < "$OUT/shares"
if grep -qs . "$OUT"/s/*/user; then
  # Lingering starts user@UID.service at boot; scenarios as the user need its manager and bus.
  uid=$(id -u @TESTER@)
  i=0
  until systemctl is-active -q "user@$uid.service" && [ -S "/run/user/$uid/bus" ]; do
    i=$((i + 1))
    if [ "$i" -gt 1200 ]; then echo "user@$uid.service not up after 120 s" >> "$OUT/errors"; break; fi
    sleep 0.1
  done
fi
cut -d' ' -f1 /proc/uptime > "$OUT/ready"
for d in "$OUT"/s/*/; do
  user=$(cat "$d/user")
  t=$(cat "$d/timeout")
  start=$(cut -d' ' -f1 /proc/uptime)
  if [ -z "$user" ]; then
    timeout -k 5 "$t" sh "$d/script" < /dev/null > "$d/stdout" 2> "$d/stderr"
  else
    uid=$(id -u "$user")
    timeout -k 5 "$t" runuser -u "$user" -- env -i HOME="$(getent passwd "$user" | cut -d: -f6)" USER="$user" \
      LOGNAME="$user" SHELL=/bin/sh PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
      XDG_RUNTIME_DIR="/run/user/$uid" DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$uid/bus" \
      sh "$d/script" < /dev/null > "$d/stdout" 2> "$d/stderr"
  fi
  echo $? > "$d/rc"
  echo "$start $(cut -d' ' -f1 /proc/uptime)" > "$d/times"
done
cut -d' ' -f1 /proc/uptime > "$OUT/done"
sync
systemctl poweroff -ff
"""

UNIT = """[Unit]
Description=safegate test VM: run the scenarios in the output share, then power off
After=multi-user.target dbus.service systemd-logind.service systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sgvm-run
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

# Units that cost boot time and do nothing useful in a throwaway VM.
MASK = [
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "systemd-firstboot.service",
    "systemd-timesyncd.service",
]


def base_key() -> str:
    return hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(GUEST_PACKAGES)} minbase".encode()).hexdigest()[:12]


def build_base() -> Path:
    """debootstrap's tree, kept as a directory (the slow part: it is redone only when the package list changes)."""
    dest = CACHE / f"base-{base_key()}"
    if (dest / "etc" / "os-release").exists():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="base-build-"))
    try:
        log(f"rootfs: debootstrap --variant=minbase {SUITE} (about a minute)")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}", SUITE, str(tmp), MIRROR],
            timeout=900)  # fmt: skip
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (tmp / d).glob("*"):
                if p.is_file():
                    p.unlink()
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_rootfs() -> Path:
    dest = CACHE / f"rootfs-{RECIPE}.ext4"
    if dest.exists():
        return dest
    if os.geteuid() != 0:
        raise Unavailable("building the root filesystem needs root (debootstrap, chroot); no cached image")
    base = build_base()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-build-") as tmp:
        root = Path(tmp) / "root"
        run(["cp", "-a", "--reflink=auto", str(base), str(root)], timeout=300)
        configure_rootfs(root)
        log(f"rootfs: mkfs.ext4 -d ({ROOTFS_SIZE} sparse)")
        img = Path(tmp) / "rootfs.ext4"
        run(["mkfs.ext4", "-q", "-F", "-L", "sgvm-root", "-d", str(root), str(img), ROOTFS_SIZE], timeout=600)
        os.rename(img, dest)
    for old in CACHE.glob("rootfs-*.ext4"):  # images of older recipes
        if old != dest:
            old.unlink()
    return dest


def configure_rootfs(root: Path) -> None:
    """Everything written below *root* only; useradd runs chrooted (it writes the guest's /etc, not the host's)."""
    run(["chroot", str(root), "useradd", "-m", "-u", str(TESTER_UID), "-s", "/bin/sh", TESTER], timeout=60)
    (root / "var/lib/systemd/linger").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/systemd/linger" / TESTER).touch()
    (root / "etc/hostname").write_text("sgvm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 sgvm\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 0\n")
    (root / "etc/machine-id").write_text(hashlib.md5(RECIPE.encode()).hexdigest() + "\n")
    runner = root / "usr/local/sbin/sgvm-run"
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_text(RUNNER.replace("@TESTER@", TESTER))
    runner.chmod(0o755)
    units = root / "etc/systemd/system"
    (units / "sgvm-run.service").write_text(UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "sgvm-run.service").symlink_to("/etc/systemd/system/sgvm-run.service")
    for unit in MASK:
        link = units / unit
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/dev/null")
    # Journal in memory only; nothing to keep in a -snapshot VM.
    jconf = root / "etc/systemd/journald.conf.d"
    jconf.mkdir(parents=True, exist_ok=True)
    (jconf / "sgvm.conf").write_text("[Journal]\nStorage=volatile\n")


def build() -> Artefacts:
    """Build what is missing (cached by recipe and kernel version) and return the artefacts' paths."""
    ensure_host_tools()
    with cache_lock():
        kdir, kver = build_kernel(kernel_package())
        initrd = build_initrd(kdir, kver)
        rootfs = build_rootfs()
    return Artefacts(kernel=kdir / "vmlinuz", initrd=initrd, rootfs=rootfs, kver=kver)


def main() -> int:
    t0 = time.monotonic()
    try:
        a = build()
    except Unavailable as e:
        print(f"vm build unavailable: {e}", file=sys.stderr)
        return 2
    print(f"kernel  {a.kernel}\ninitrd  {a.initrd}\nrootfs  {a.rootfs}\nkver    {a.kver}")
    print(f"built in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
