"""The offline check's verdicts and report, on inputs made here. No libguestfs, no image, no root."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from pipeline import check, spec
from pipeline.check import checks
from pipeline.check import report as reports
from pipeline.check.checks import (
    IFUPDOWN_HOTPLUG_RULE,
    NETWORKING_LINKS,
    SHOWN,
    bridge_problems,
    ifupdown_boot_problems,
    leftover_problems,
    world_writable,
)
from pipeline.check.parsers import (
    GPT_ESP,
    GPT_ROOT_X86_64,
    FileEntry,
    GptPartition,
    parse_blkid_export,
    parse_find_listing,
    parse_ifupdown,
    parse_label_listing,
)
from pipeline.check.report import CheckResult, Report
from pipeline.check.session import (
    COMMAND_MOUNTS,
    LIST_FILES_SCRIPT,
    SURVEY_BLKID,
    SURVEY_LABELS,
    SURVEY_SCRIPT,
    CheckFailed,
    Guest,
    import_guestfs,
)
from pipeline.errors import PipelineError, ToolMissing
from pipeline.run import run

# --- OVS bridges (ifupdown)

OVS_BRIDGES = """\
allow-ovs br-int
iface br-int inet manual
    ovs_type OVSBridge

allow-ovs br-ex
iface br-ex inet manual
    ovs_type OVSBridge
    ovs_ports enp0s8   # the uplink

allow-br-ex enp0s8
iface enp0s8 inet manual
    ovs_bridge br-ex
    ovs_type OVSPort
"""


def test_ifupdown_parses_stanzas_classes_and_sources():
    parsed = parse_ifupdown(OVS_BRIDGES + "source /etc/network/interfaces.d/*\n")
    assert parsed.interfaces["br-ex"] == {"ovs_type": "OVSBridge", "ovs_ports": "enp0s8"}
    assert parsed.classes["allow-ovs"] == ["br-int", "br-ex"]
    assert parsed.classes["allow-br-ex"] == ["enp0s8"]
    assert parsed.sources == ["/etc/network/interfaces.d/*"]


def test_bridges_as_the_host_spec_declares_them():
    host = spec.load().images["host-image"]
    assert bridge_problems(host, parse_ifupdown(OVS_BRIDGES)) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("allow-ovs br-int\n", ""), "br-int: not in 'allow-ovs'"),
    (lambda t: "auto br-ex\n" + t, "br-ex: in 'auto', so logins wait for Open vSwitch"),
    (lambda t: t.replace("    ovs_ports enp0s8   # the uplink\n", ""), "lacks uplink enp0s8"),
    (lambda t: t.replace("    ovs_bridge br-ex\n", ""), "enp0s8: not declared an OVSPort of br-ex"),
    (lambda t: t.replace("iface br-int inet manual\n    ovs_type OVSBridge\n", ""), "br-int: no 'iface br-int'"),
    (lambda t: t + "iface br-tun inet manual\n    ovs_type OVSBridge\n", "bridges not in the spec: br-tun"),
])
def test_bridge_problems_are_named(edit, problem):
    host = spec.load().images["host-image"]
    problems = bridge_problems(host, parse_ifupdown(edit(OVS_BRIDGES)))
    assert any(problem in p for p in problems), problems


class SymlinkGuestFS:
    """The libguestfs calls ifupdown_boot_problems makes, over a dict of symlinks: the image's
    find lists them, and libguestfs answers for any other path."""

    def __init__(self, links: dict[str, str]):
        self.links = links

    def command(self, argv) -> str:
        return "".join(f"l 777 {len(target)} {path}\n" for path, target in self.links.items())

    def lstatnslist(self, directory, names):  # /dev, /proc and /sys: not in this image
        return [{"st_mode": 0, "st_size": -1} for _ in names]

    def is_symlink(self, path: str) -> bool:
        return path in self.links

    def readlink(self, path: str) -> str:
        return self.links[path]


QUIET_IFUPDOWN = {IFUPDOWN_HOTPLUG_RULE: "/dev/null"}


def test_ifupdown_quiet_at_boot_passes():
    assert ifupdown_boot_problems(_guest(SymlinkGuestFS(QUIET_IFUPDOWN))) == []


@pytest.mark.parametrize("links, problem", [
    ({}, f"{IFUPDOWN_HOTPLUG_RULE} does not mask"),
    ({IFUPDOWN_HOTPLUG_RULE: "/usr/lib/udev/rules.d/80-ifupdown.rules"}, f"{IFUPDOWN_HOTPLUG_RULE} does not mask"),
    (QUIET_IFUPDOWN | {NETWORKING_LINKS[0]: "/usr/lib/systemd/system/networking.service"},
     "networking.service is enabled (/etc/systemd/system/multi-user.target.wants/"),
    (QUIET_IFUPDOWN | {NETWORKING_LINKS[1]: "/usr/lib/systemd/system/networking.service"},
     "networking.service is enabled (/etc/systemd/system/network-online.target.wants/"),
])
def test_ifupdown_run_at_boot_is_named(links, problem):
    problems = ifupdown_boot_problems(_guest(SymlinkGuestFS(links)))
    assert len(problems) == 1 and problem in problems[0], problems


# --- report


def test_report_passes_only_with_results_all_passing(tmp_path):
    report = Report("img", tmp_path / "img.qcow2", tmp_path / "check.json")
    assert not report.passed
    report.results = [CheckResult("os", True, "debian 12"), CheckResult("fstab", True, "ok")]
    assert report.passed
    report.results.append(CheckResult("tuned", False, "inactive"))
    assert not report.passed and [r.name for r in report.failed] == ["tuned"]


def test_json_written_atomically(tmp_path):
    report = Report("img", tmp_path / "img.qcow2", tmp_path / "check.json",
                    [CheckResult("os", True, "debian 12"), CheckResult("tuned", False, "inactive")],
                    {"check: launch appliance": 18.2})
    report.json_path.write_text("old")
    reports.write_json(report)
    saved = json.loads(report.json_path.read_text())
    assert saved["passed"] is False
    assert saved["checks"][1] == {"name": "tuned", "passed": False, "detail": "inactive", "seconds": 0.0}
    assert saved["timings"] == {"check: launch appliance": 18.2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json"]


def test_table_has_a_row_per_check_with_its_time():
    table = reports.format_table([CheckResult("os", True, "debian 12", 0.04),
                                  CheckResult("selinux labels", False, "x", 12.345)])
    lines = table.splitlines()
    assert lines[0].split() == ["check", "s", "detail"]
    assert lines[1].split() == ["os", "PASS", "0.0", "debian", "12"]
    assert lines[2].split()[2:] == ["FAIL", "12.3", "x"]


def _libguestfs_fails(guest):
    raise RuntimeError("pread: No such file\nmore")


@pytest.mark.parametrize("run, passed, detail", [
    (lambda guest: ([], "fine"), True, "fine"),
    (lambda guest: (["broken"], ""), False, "broken"),
    (_libguestfs_fails, False, "error: pread: No such file"),
])
def test_each_check_is_timed_whatever_its_verdict(monkeypatch, run, passed, detail):
    clock = iter([100.0, 101.25])
    monkeypatch.setattr(checks.time, "monotonic", lambda: next(clock))
    assert checks._run(checks.Check("x", run), None) == CheckResult("x", passed, detail, 1.25)


def test_missing_bindings_name_the_debian_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "guestfs", None)
    with pytest.raises(ToolMissing, match="python3-guestfs libguestfs-tools"):
        import_guestfs()


def test_unbuilt_image_says_how_to_build_it(tmp_path):
    guest = spec.load().get("guest-image")
    with pytest.raises(PipelineError, match=r"has not been built: run \./inv build guest-image"):
        check.check_image(guest, Path(tmp_path))


# --- the file list: one find from the image, or libguestfs calls a directory


class ListingGuestFS:
    """The libguestfs calls Guest.files makes, answering from TREE {path: (st_mode, size)}."""

    def __init__(self, tree: dict[str, tuple[int, int]], find_fails: str | None = None, listing: str | None = None):
        self.tree, self.find_fails, self.listing, self.calls = tree, find_fails, listing, []

    def command(self, argv):
        self.calls.append("command")
        if self.find_fails:
            raise RuntimeError(self.find_fails)
        if self.listing is not None:
            return self.listing
        kinds = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c"}
        return "".join(f"{kinds[stat.S_IFMT(mode)]} {stat.S_IMODE(mode):o} {size} {path}\n"
                       for path, (mode, size) in self.tree.items() if not self._hidden(path))

    @staticmethod
    def _hidden(path):  # under the appliance's own mounts while a command runs
        return any(path == top or path.startswith(top + "/") for top in COMMAND_MOUNTS)

    def ls(self, directory):
        self.calls.append("ls")
        return [path.rpartition("/")[2] for path in self.tree if path.rpartition("/")[0] == directory]

    def find(self, top):
        self.calls.append("find")
        return [path.removeprefix(top.rstrip("/")) for path in self.tree if path.startswith(top.rstrip("/") + "/")]

    def lstatnslist(self, directory, names):
        self.calls.append("lstatnslist")
        # libguestfs's answer for a name that is not there: every field 0 or -1
        found = [self.tree.get(f"{directory.rstrip('/')}/{name}", (0, -1)) for name in names]
        return [dict(zip(("st_mode", "st_size"), fields, strict=True)) for fields in found]


TREE = {"/etc": (stat.S_IFDIR | 0o755, 4096), "/etc/passwd": (stat.S_IFREG | 0o644, 1234),
        "/usr": (stat.S_IFDIR | 0o755, 4096), "/usr/bin": (stat.S_IFDIR | 0o755, 4096),
        "/usr/bin/su": (stat.S_IFREG | 0o4755, 62672), "/bin": (stat.S_IFLNK | 0o777, 7),
        "/dev": (stat.S_IFDIR | 0o755, 4096), "/dev/null": (stat.S_IFCHR | 0o666, 0),
        "/proc": (stat.S_IFDIR | 0o555, 4096)}


def _guest(g) -> Guest:
    return Guest(g, spec.load().get("guest-image"), {}, [], None, Path("/nowhere"), b"", None)


def test_the_file_list_is_one_find_run_from_the_image_and_what_its_mounts_hide():
    """/dev, /proc and /sys are the appliance's while a command runs: the image's own
    (device nodes a build left, say) are read by libguestfs calls."""
    g = ListingGuestFS(TREE)
    assert {e.path: (e.mode, e.size) for e in _guest(g).files} == TREE
    assert g.calls[0] == "command" and g.calls.count("command") == 1
    assert "find" not in g.calls  # libguestfs's find runs a process in the appliance: ls does not


def test_without_find_in_the_image_the_file_list_comes_from_libguestfs_calls(capsys):
    g = ListingGuestFS(TREE, find_fails="command: guestfsd: failed to encode reply body\n(maybe ...)")
    assert {e.path: (e.mode, e.size) for e in _guest(g).files} == TREE
    assert g.calls[:2] == ["command", "find"] and "lstatnslist" in g.calls
    assert "failed to encode reply body); listing by libguestfs calls" in capsys.readouterr().err


def test_a_find_listing_broken_by_a_name_is_a_check_finding():
    with pytest.raises(CheckFailed, match="not type, mode, size and path: 'line'"):
        _guest(ListingGuestFS(TREE, listing="f 644 1 /etc/new\nline\n")).files  # noqa: B018


def _tree_on_disk(root: Path) -> None:
    for directory in ("etc", "usr/lib/x86_64-linux-gnu", "usr/bin", "var/lib/apt", "dev/pts", "proc/1", "sys/fs"):
        (root / directory).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "usr/lib/x86_64-linux-gnu/libc.so.6").write_bytes(b"\0" * 1000)
    (root / "usr/lib/os-release").write_text("ID=debian\n")
    (root / "usr/bin/su").write_bytes(b"su")
    (root / "usr/bin/su").chmod(0o4755)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    os.mkfifo(root / "var/lib/apt/lists")
    (root / "etc/a name with spaces").write_text("")


def test_the_file_list_script_lists_every_path_once_but_what_the_appliance_mounts_over(tmp_path):
    """The script's two finds, run by the real sh and find here on a tree made here: together
    they list what a walk of the tree does, each path once, but for /dev, /proc and /sys."""
    _tree_on_disk(tmp_path)
    listed = parse_find_listing(run(["sh", "-c", LIST_FILES_SCRIPT, "sh", tmp_path], capture=True).stdout)
    walked = {}
    for directory, names, files in os.walk(tmp_path):
        for name in names + files:
            path = Path(directory, name)
            relative = "/" + path.relative_to(tmp_path).as_posix()
            if not any(relative == top or relative.startswith(f"{top}/") for top in COMMAND_MOUNTS):
                walked[relative] = (path.lstat().st_mode, path.lstat().st_size)
    assert len(listed) == len({entry.path for entry in listed}), "a path listed twice"
    assert {entry.path: (entry.mode, entry.size) for entry in listed} == walked
    assert {"/usr/lib", "/usr/lib/os-release", "/etc/a name with spaces", "/lib"} <= walked.keys()


@pytest.mark.parametrize("failing", ["usr/lib", "."])
def test_the_file_list_script_fails_when_either_find_does(tmp_path, failing):
    """Half a listing must never pass for a whole one (the check then lists by libguestfs
    calls): a find on PATH that fails for one starting point, after printing a line."""
    _tree_on_disk(tmp_path / "root")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "find").write_text(f'#!/bin/sh\nif [ "$1" = "{failing}" ]; then echo "f 644 0 /half"; exit 1; fi\n'
                               f'exec /usr/bin/find "$@"\n')
    (fake / "find").chmod(0o755)
    listed = run(["sh", "-c", LIST_FILES_SCRIPT, "sh", tmp_path / "root"], capture=True, check=False,
                 env={"PATH": f"{fake}:/usr/bin:/bin"})
    assert listed.returncode == 1
    assert "/half" not in listed.stdout


def test_the_file_list_script_fails_on_a_missing_root(tmp_path):
    listed = run(["sh", "-c", LIST_FILES_SCRIPT, "sh", tmp_path / "nowhere"], capture=True, check=False)
    assert listed.returncode != 0 and listed.stdout == ""


def test_the_survey_lists_the_files_then_reads_the_samples_labels_and_blkid(tmp_path):
    """SURVEY_SCRIPT by the real sh, find and blkid: the listing as LIST_FILES_SCRIPT's, then each
    sampled path's label (empty for none: it does not fail the command), then blkid's answer
    for each filesystem named (a file holding one here; none for one without)."""
    _tree_on_disk(tmp_path / "root")
    try:
        os.setxattr(tmp_path / "root/etc/passwd", "security.selinux", b"system_u:object_r:passwd_file_t:s0\0")
    except OSError as error:
        pytest.skip(f"this filesystem keeps no security.selinux xattr: {error}")
    esp = tmp_path / "esp.img"
    with open(esp, "wb") as f:
        f.truncate(40 * 2**20)
    run(["mkfs.vfat", "-F", "32", "-i", "97AAFF08", esp])
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * 2**20)
    output = run(["sh", "-c", SURVEY_SCRIPT, "sh", tmp_path / "root", esp, blank], capture=True).stdout
    listing, _, answers = output.partition(f"{SURVEY_LABELS}\n")
    labels, _, blkid = answers.partition(f"{SURVEY_BLKID}\n")
    alone = run(["sh", "-c", LIST_FILES_SCRIPT, "sh", tmp_path / "root"], capture=True).stdout
    assert parse_find_listing(listing) == parse_find_listing(alone)
    assert parse_label_listing(labels) == {
        "/etc": "", "/etc/passwd": "system_u:object_r:passwd_file_t:s0", "/etc/a name with spaces": "",
        "/usr/bin": "", "/usr/bin/su": "", "/var/lib": "", "/var/lib/apt": ""}  # /usr/sbin: not in this tree
    found = parse_blkid_export(blkid)
    assert list(found) == [str(esp)]
    assert (found[str(esp)]["UUID"], found[str(esp)]["TYPE"]) == ("97AA-FF08", "vfat")


class SurveyGuestFS(ListingGuestFS):
    """A command answering as SURVEY_SCRIPT does; blkid and lxattrlist must not be asked."""

    def __init__(self, tree, labels: str, blkid: str):
        super().__init__(tree)
        self.labels, self.blkid_text = labels, blkid

    def command(self, argv):
        return f"{super().command(argv)}{SURVEY_LABELS}\n{self.labels}{SURVEY_BLKID}\n{self.blkid_text}"

    def blkid(self, device):
        raise AssertionError(f"blkid {device} asked of libguestfs")

    def lxattrlist(self, directory, names):
        raise AssertionError(f"lxattrlist {directory} asked of libguestfs")


ROOT_PARTITION = GptPartition(3, GPT_ROOT_X86_64, 4096, 8191, "root")
ESP_PARTITION = GptPartition(2, GPT_ESP, 2048, 4095, "esp")


def test_labels_and_uuids_read_with_the_file_list_are_not_asked_again():
    labels = "".join(f"{label}\t{path}\n" for path, label in (
        ("/etc", "system_u:object_r:etc_t:s0"), ("/etc/passwd", ""), ("/usr/bin", "system_u:object_r:bin_t:s0"),
        ("/usr/bin/su", "system_u:object_r:su_exec_t:s0"), ("/usr/sbin", "system_u:object_r:bin_t:s0"),
        ("/var/lib", "system_u:object_r:var_lib_t:s0")))
    blkid = "DEVNAME=/dev/sda2\nUUID=97AA-FF08\nTYPE=vfat\n\nDEVNAME=/dev/sda3\nUUID=e833b020\nTYPE=ext4\n"
    guest = Guest(SurveyGuestFS(TREE, labels, blkid), spec.load().get("guest-image"), {},
                  [ESP_PARTITION, ROOT_PARTITION], ROOT_PARTITION, Path("/nowhere"), b"", None)
    guest.files  # noqa: B018 (a cached property)
    assert guest.uuid(ROOT_PARTITION) == "e833b020" and guest.blkid(ESP_PARTITION)["TYPE"] == "vfat"
    problems, _ = checks.check_unlabeled(guest)
    assert problems == ["1 unlabeled: /etc/passwd"]


def test_a_blkid_answer_that_does_not_parse_is_asked_of_libguestfs():
    g = SurveyGuestFS(TREE, "", "DEVNAME=/dev/sda3\nnot a tag\n")
    g.blkid = lambda device: {"UUID": "from-libguestfs", "TYPE": "ext4"}
    guest = Guest(g, spec.load().get("guest-image"), {}, [ROOT_PARTITION], ROOT_PARTITION, Path("/nowhere"), b"", None)
    assert guest.files and guest.uuid(ROOT_PARTITION) == "from-libguestfs"


def test_a_sampled_path_the_survey_did_not_label_counts_as_unlabeled():
    guest = Guest(SurveyGuestFS(TREE, "system_u:object_r:etc_t:s0\t/etc\n", ""), spec.load().get("guest-image"),
                  {}, [], None, Path("/nowhere"), b"", None)
    problems, _ = checks.check_unlabeled(guest)
    assert problems == ["5 unlabeled: /usr/bin, /usr/sbin, /var/lib, /etc/passwd, /usr/bin/su"]


def test_files_listed_answer_is_file_and_others_are_asked():
    g = ListingGuestFS(TREE)
    asked = []
    g.is_file = lambda path: asked.append(path) or path == "/lib/os-release"
    g.is_dir = g.is_symlink = lambda path: asked.append(path) or False
    guest = _guest(g)
    assert guest.is_file("/etc/passwd") and not guest.is_file("/etc") and not guest.is_file("/bin")
    assert guest.is_symlink("/bin") and guest.is_dir("/usr/bin")
    assert asked == []
    assert guest.is_file("/lib/os-release") and asked == ["/lib/os-release"]  # below a symlink


# --- what a build must not leave in an image

def regular(path: str, mode: int = 0o644, size: int = 0) -> FileEntry:
    return FileEntry(path, stat.S_IFREG | mode, size)


# A clean host image's paths near each leftover kind (from a real build's listing).
CLEAN = [
    FileEntry("/etc/resolv.conf", stat.S_IFLNK | 0o777, 39),  # -> ../run/systemd/resolve/stub-resolv.conf
    regular("/etc/cloud/templates/resolv.conf.tmpl", size=921),
    regular("/usr/lib/systemd/resolv.conf", size=710),
    regular("/var/lib/apt/lists/lock"), FileEntry("/var/lib/apt/lists/partial", stat.S_IFDIR | 0o700, 4096),
    regular("/var/cache/apt/archives/lock"), FileEntry("/var/cache/apt/archives/partial", stat.S_IFDIR | 0o700, 4096),
    regular("/var/log/dpkg.log"), regular("/var/log/apt/history.log"), regular("/var/log/wtmp", 0o664),
    regular("/var/log/libvirt/qemu/.placeholder"), regular("/usr/lib/x86_64-linux-gnu/libhistory.so.8", size=1),
    FileEntry("/var/lib/cloud", stat.S_IFDIR | 0o755, 4096), regular("/root/.bashrc", size=571),
    FileEntry("/tmp", stat.S_IFDIR | 0o1777, 4096), FileEntry("/usr/bin/sudo", stat.S_IFREG | 0o4755, 1),
    FileEntry("/dev", stat.S_IFDIR | 0o755, 4096), FileEntry("/dev/null", stat.S_IFCHR | 0o666, 0),
    FileEntry("/dev/console", stat.S_IFCHR | 0o600, 0), FileEntry("/dev/fd", stat.S_IFLNK | 0o777, 13),
    FileEntry("/dev/pts", stat.S_IFDIR | 0o755, 4096),
]


def test_a_clean_image_has_no_leftovers_and_nothing_world_writable():
    assert leftover_problems(CLEAN) == [] and world_writable(CLEAN) == []


@pytest.mark.parametrize("entry, kind", [
    (regular("/etc/.resolv.conf.systemd-resolved.bak", 0o777, 25), "copies of the build host's resolv.conf"),
    (regular("/etc/resolv.conf.ORIG", size=20), "copies of the build host's resolv.conf"),
    (regular("/etc/resolv.conf", size=20), "the build host's nameservers"),
    (regular("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease", size=1), "apt lists"),
    (regular("/var/lib/apt/lists/partial/x_Packages", size=1), "apt lists"),
    (regular("/var/cache/apt/archives/vim_9.0_amd64.deb", size=1), ".deb caches"),
    (regular("/root/.bash_history", 0o600, 10), "shell history"),
    (regular("/home/debian/.python_history", 0o600, 0), "shell history"),
    (regular("/var/log/dpkg.log", size=1), "non-empty logs"),
    (regular("/var/log/journal/0123/system.journal", 0o640, 8388608), "non-empty logs"),
    (FileEntry("/var/lib/cloud/instance", stat.S_IFLNK | 0o777, 30), "cloud-init instance state"),
    (regular("/var/lib/cloud/instances/i-0123/user-data.txt", 0o600, 5), "cloud-init instance state"),
    (regular("/var/lib/cloud/data/instance-id", size=5), "cloud-init instance state"),
    (FileEntry("/dev/kvm", stat.S_IFCHR | 0o660, 0), "device nodes of the build host"),
    (FileEntry("/dev/cpu/0/cpuid", stat.S_IFCHR | 0o600, 0), "device nodes of the build host"),
    (FileEntry("/dev/pts/0", stat.S_IFCHR | 0o620, 0), "device nodes of the build host"),
], ids=lambda value: value.path if isinstance(value, FileEntry) else "")
def test_each_leftover_is_named_with_its_path(entry, kind):
    assert leftover_problems([*CLEAN, entry]) == [f"{kind}: {entry.path}"]


def test_many_leftovers_of_a_kind_are_counted():
    lists = [regular(f"/var/lib/apt/lists/list{index}", size=1) for index in range(SHOWN + 3)]
    [problem] = leftover_problems(lists)
    assert problem.startswith("apt lists: /var/lib/apt/lists/list0, ") and problem.endswith(" and 3 more")


def test_world_writable_regular_files_only():
    entries = [regular("/etc/.resolv.conf.systemd-resolved.bak", 0o777), regular("/var/lib/x", 0o666),
               FileEntry("/tmp", stat.S_IFDIR | 0o1777, 4096), FileEntry("/bin", stat.S_IFLNK | 0o777, 7),
               FileEntry("/dev/null", stat.S_IFCHR | 0o666, 0), regular("/etc/passwd")]
    assert world_writable(entries) == ["/etc/.resolv.conf.systemd-resolved.bak (-rwxrwxrwx)",
                                       "/var/lib/x (-rw-rw-rw-)"]


