"""await_ssh's deadlines: a boot whose console keeps moving is waited for, a console that stops
moving is a hung boot, and every timeout quotes the console's last lines. The gateway (run) is
faked: no QEMU, no SSH."""

import shlex
import subprocess
import time

import pytest

from pipeline import testvm


@pytest.fixture
def ssh(monkeypatch):
    """A fake `ssh … true`: fails until .answer_at (time.monotonic) has passed; each attempt may
    append to .console, as a boot that makes progress would."""
    class FakeSsh:
        answer_at = float("inf")
        refusal = ""
        console = None
        attempts = 0

        hangs = 0  # the first attempts that time out, as a login that is too slow does

        def __call__(self, argv, **options):
            self.attempts += 1
            if self.attempts <= self.hangs:
                raise testvm.CommandTimedOut(argv, options["timeout"])
            if self.console is not None:
                with open(self.console, "a") as file:
                    file.write(f"line {self.attempts}\r\n")
            if time.monotonic() >= self.answer_at:
                return subprocess.CompletedProcess(argv, 0, "", "")
            return subprocess.CompletedProcess(argv, 255, "", self.refusal)

    fake = FakeSsh()
    monkeypatch.setattr(testvm, "run", fake)
    monkeypatch.setattr(testvm, "SSH_POLL", 0.01)
    return fake


def _wait(console, deadline=30.0, stall=0.2, ended=lambda: None):
    return testvm.await_ssh(["ssh", "guest", "--"], ended, time.monotonic(), deadline, "uefi boot of x.qcow2",
                            "qemu.log", console, stall)


def test_a_boot_whose_console_moves_is_waited_for_past_the_stall_window(ssh, tmp_path):
    ssh.console = tmp_path / "console.log"
    ssh.answer_at = time.monotonic() + 1  # five stall windows, the console moving all along
    assert _wait(ssh.console, stall=0.2) >= 1


def test_a_console_that_stops_moving_is_a_hung_boot_and_its_last_lines_are_quoted(ssh, tmp_path):
    console = tmp_path / "console.log"
    console.write_text("[\x1b[0;32m  OK  \x1b[0m] Started ssh.service\r\nboot-test login: \r\n")
    with pytest.raises(testvm.BootTimeout, match=r"^uefi boot of x\.qcow2 stalled: no SSH login, and nothing new "
                       r"on the console for 0\.2 s \(0 s after start\); last console lines: \[  OK  \] Started "
                       r"ssh\.service \| boot-test login:; see qemu\.log$"):
        _wait(console)


def test_the_deadline_holds_even_while_the_console_moves(ssh, tmp_path):
    ssh.console = tmp_path / "console.log"
    with pytest.raises(testvm.BootTimeout, match=r"did not reach SSH within 0\.3 s; last console lines: .*line \d+; "
                       r"see qemu\.log$"):
        _wait(ssh.console, deadline=0.3, stall=10)


def test_qemu_ending_is_reported_at_once_with_the_console(ssh, tmp_path):
    console = tmp_path / "console.log"
    console.write_text("Kernel panic - not syncing: VFS\n")
    with pytest.raises(testvm.BootTimeout, match=r"^QEMU ended \(exit status 1\) before SSH was up; last console "
                       r"lines: Kernel panic - not syncing: VFS; see qemu\.log$"):
        _wait(console, ended=lambda: "exit status 1")
    assert ssh.attempts == 0


def test_without_a_console_only_the_deadline_counts(ssh):
    with pytest.raises(testvm.BootTimeout, match=r"^uefi boot of x\.qcow2 did not reach SSH within 0\.2 s; see "
                       r"qemu\.log$"):
        _wait(None, deadline=0.2, stall=0.01)


def test_a_boot_that_is_up_but_refuses_the_key_says_so(ssh, tmp_path):
    console = tmp_path / "console.log"
    console.write_text("boot-test login: \n")
    ssh.refusal = ("Warning: Permanently added '[127.0.0.1]:2222' to the list of known hosts.\r\n"
                   "debian@127.0.0.1: Permission denied (publickey).\r\n")
    with pytest.raises(testvm.BootTimeout, match=r"for 0\.2 s \(0 s after start\); last ssh error: "
                       r"debian@127\.0\.0\.1: Permission denied \(publickey\)\.; last console lines: "
                       r"boot-test login:; see qemu\.log$"):
        _wait(console)


def test_an_attempt_that_times_out_is_retried_within_the_deadline(ssh):
    ssh.hangs, ssh.answer_at = 2, time.monotonic()
    assert _wait(None) >= 0
    assert ssh.attempts == 3


def test_attempts_that_keep_timing_out_end_at_the_deadline_and_say_so(ssh):
    ssh.hangs = 10**6
    with pytest.raises(testvm.BootTimeout, match=r"did not reach SSH within 0\.2 s; last ssh attempt: no answer "
                       r"within 30 s; see qemu\.log$"):
        _wait(None, deadline=0.2)


OLD_BOOT = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


def test_a_reboot_waits_for_ssh_on_the_new_boot_not_the_old_one(monkeypatch, tmp_path):
    """The old boot's sshd may still answer just after `systemctl reboot`: only a login that
    sees another boot id ends the wait."""
    remote = []

    def fake_ssh(argv, **options):
        command = shlex.split(" ".join(argv[argv.index("--") + 1:]))  # as the guest's shell splits it
        remote.append(command)
        if command == ["cat", testvm.BOOT_ID]:
            return subprocess.CompletedProcess(argv, 0, f"{OLD_BOOT}\n", "")
        if command[0] == "grep":  # the old boot still answers the first attempt
            assert command == ["grep", "-qvx", OLD_BOOT, testvm.BOOT_ID]
            return subprocess.CompletedProcess(argv, 1 if len(remote) == 3 else 0, "", "")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(testvm, "run", fake_ssh)
    monkeypatch.setattr(testvm, "SSH_POLL", 0.01)
    vm = testvm.VM(image=tmp_path / "x.qcow2", disk_size=1, firmware=testvm.Firmware.UEFI, workdir=tmp_path)
    monkeypatch.setattr(vm, "ended", lambda: None)
    vm._write_ssh_config()
    assert vm.reboot(deadline=30) >= 0
    assert [command[0] for command in remote] == ["cat", "sudo", "grep", "grep"]
    assert remote[1] == ["sudo", "systemctl", "reboot"]


def test_a_boot_id_that_is_not_one_stops_the_reboot_before_it(monkeypatch, tmp_path):
    """What the guest answers goes into a command line: validated whole first."""
    commands = []

    def fake_ssh(argv, **options):
        commands.append(argv[-1])
        return subprocess.CompletedProcess(argv, 0, "x; reboot -f\n", "")

    monkeypatch.setattr(testvm, "run", fake_ssh)
    vm = testvm.VM(image=tmp_path / "x.qcow2", disk_size=1, firmware=testvm.Firmware.UEFI, workdir=tmp_path)
    vm._write_ssh_config()
    with pytest.raises(testvm.PipelineError, match="is not a boot id: 'x; reboot -f'"):
        vm.reboot(deadline=30)
    assert len(commands) == 1


INT3_PANIC = ("[    2.187440] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
              "[    2.188022] RIP: 0010:sched_clock_cpu+0x9/0x1d0\r\n"
              "[    2.190525] Kernel panic - not syncing: Fatal exception in interrupt\r\n")


@pytest.mark.parametrize(("text", "accelerator", "race"), [
    (INT3_PANIC, "tcg", True),
    (INT3_PANIC, "kvm", False),  # under KVM no emulator races the kernel: the panic is the image's
    ("[    1.5] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n", "tcg", False),
])
def test_a_kernel_panic_ends_the_wait_at_once_and_says_whether_the_emulator_caused_it(ssh, tmp_path, monkeypatch,
                                                                                     text, accelerator, race):
    monkeypatch.setattr(testvm.qemu, "accelerator", lambda: (accelerator, "x"))
    console = tmp_path / "console.log"
    console.write_text(text)
    started = time.monotonic()
    with pytest.raises(testvm.KernelPanicked, match=r"^uefi boot of x\.qcow2: the kernel panicked; last console "
                       r"lines: .*Kernel panic - not syncing: .*; see qemu\.log$") as caught:
        _wait(console, stall=10)
    assert caught.value.emulator_race is race
    assert time.monotonic() - started < 5  # not the stall window
    assert ssh.attempts == 0


class FakeBoots:
    """testvm.VM's start and wait_for_ssh faked: each boot's console gets the next of .consoles,
    and a console with a kernel panic raises as await_ssh would."""

    def __init__(self, consoles):
        self.consoles, self.started, self.stopped = list(consoles), 0, 0

    def start(self, vm):
        self.started += 1
        vm.console.write_text(self.consoles.pop(0))

    def wait_for_ssh(self, vm, deadline):
        testvm._raise_on_panic(vm.console, "uefi boot of x.qcow2", "qemu.log")
        return 1.0

    def stop(self, vm):
        self.stopped += 1


@pytest.fixture
def boots(monkeypatch):
    def install(*consoles):
        fake = FakeBoots(consoles)
        monkeypatch.setattr(testvm.VM, "start", lambda vm: fake.start(vm))
        monkeypatch.setattr(testvm.VM, "wait_for_ssh", lambda vm, deadline: fake.wait_for_ssh(vm, deadline))
        monkeypatch.setattr(testvm.VM, "stop", lambda vm: fake.stop(vm))
        monkeypatch.setattr(testvm.qemu, "accelerator", lambda: ("tcg", "qemu64"))
        return fake
    return install


def _boot(tmp_path):
    return testvm.boot(tmp_path / "x.qcow2", 2**30, testvm.Firmware.UEFI, tmp_path)


def test_a_boot_the_emulator_race_panicked_is_booted_once_more_and_its_console_kept(boots, tmp_path):
    fake = boots(INT3_PANIC, "boot-test login: \r\n")
    vm = _boot(tmp_path)
    assert (fake.started, fake.stopped) == (2, 1)
    assert vm.console.read_bytes() == b"boot-test login: \r\n"
    assert (tmp_path / "console-panicked.log").read_bytes() == INT3_PANIC.encode()


def test_the_emulator_race_twice_in_a_row_fails_the_boot(boots, tmp_path):
    fake = boots(INT3_PANIC, INT3_PANIC, "never booted\r\n")
    with pytest.raises(testvm.KernelPanicked, match="the kernel panicked"):
        _boot(tmp_path)
    assert (fake.started, fake.stopped) == (2, 2)


def test_any_other_kernel_panic_fails_the_boot_without_another_try(boots, tmp_path):
    fake = boots("Kernel panic - not syncing: VFS: Unable to mount root fs\r\n", "never booted\r\n")
    with pytest.raises(testvm.KernelPanicked, match="Unable to mount root fs"):
        _boot(tmp_path)
    assert (fake.started, fake.stopped) == (1, 1)
