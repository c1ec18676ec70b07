"""The one QEMU command builder (pipeline.qemu) as its three users call it: a boot test's VM
(pipeline.testvm), a PXE boot test node (pipeline.deploy.pxenode) and a deploy test node
(pipeline.deploy.nodes). The argv are whole and literal: they are the ones that boot today, device
order included (PCI slots, hence NIC names, follow it). No QEMU runs."""

import re
from pathlib import Path

import pytest

from pipeline import qemu, testvm
from pipeline.deploy import nodes, pxe, pxenode
from pipeline.deploy.inventory import Loader
from pipeline.errors import PipelineError
from pipeline.qemu import Firmware


@pytest.fixture(autouse=True)
def default_vm_cpus(monkeypatch):
    """The argv below are the ones a user's run builds: ./inv test sets its own vCPU count."""
    monkeypatch.delenv(qemu.VM_CPUS_VARIABLE, raising=False)


@pytest.fixture
def head():
    """The start of every VM's argv: the name, then this machine's accelerator and CPU model."""
    accel, cpu = qemu.accelerator()
    return lambda name: ["qemu-system-x86_64", "-name", name, "-machine", f"q35,accel={accel}", "-cpu", cpu]


def pflash(workdir: Path) -> list[str]:
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={workdir}/OVMF_VARS.fd"]


@pytest.mark.parametrize("firmware", list(Firmware))
def test_a_boot_test_vm(tmp_path, head, firmware):
    vm = testvm.VM(image=tmp_path / "image.qcow2", disk_size=2**30, firmware=firmware, workdir=tmp_path / "vm",
                   memory_mib=3072, uplink_nics=2)
    vm.port = 2222
    work = tmp_path / "vm"
    assert vm.qemu_argv(tmp_path / "overlay.qcow2", tmp_path / "seed.img") == [
        *head(f"boot-test-{firmware}"), "-smp", "2", "-m", "3072",
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", f"file:{work}/console.log",
        "-pidfile", f"{work}/qemu.pid",
        "-drive", f"file={tmp_path}/overlay.qcow2,if=virtio,format=qcow2,discard=unmap",
        "-drive", f"file={tmp_path}/seed.img,if=virtio,format=raw,readonly=on",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22", "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-serial-pci", "-chardev", f"socket,id=qga0,path={work}/qga.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0", "-device", "virtio-rng-pci",
        "-netdev", "user,id=uplink0,restrict=on", "-device", "virtio-net-pci,netdev=uplink0,addr=0x8",
        "-netdev", "user,id=uplink1,restrict=on", "-device", "virtio-net-pci,netdev=uplink1,addr=0x9",
        *(pflash(work) if firmware is Firmware.UEFI else [])]
    # UEFI boots with a fresh copy of OVMF's variable store, which the firmware may write.
    assert (work / "OVMF_VARS.fd").is_file() == (firmware is Firmware.UEFI)
    if firmware is Firmware.UEFI:
        assert (work / "OVMF_VARS.fd").read_bytes() == Path(qemu.OVMF_VARS).read_bytes()


@pytest.mark.parametrize("firmware", list(Firmware))
def test_a_pxe_boot_test_node(tmp_path, head, firmware):
    work = tmp_path / "work"
    work.mkdir()
    site = pxenode.Site(pxe.Tree(tmp_path / "tree", ()), "http://10.0.2.2:41234", work, Loader.IPXE)
    assert pxenode.qemu_argv(firmware, "52:54:00:7e:00:01", site, tmp_path / "console.log") == [
        *head(f"pxe-boot-{firmware}"), "-m", "1024", "-nodefaults", "-display", "none", "-monitor", "none",
        "-no-reboot", "-serial", f"file:{tmp_path}/console.log",
        "-netdev", f"user,id=n0,tftp={tmp_path}/tree/root,bootfile=http://10.0.2.2:41234/boot.ipxe",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:7e:00:01,bootindex=1",
        *(pflash(work) if firmware is Firmware.UEFI else [])]


def test_a_deploy_test_node(tmp_path, head):
    site = nodes.Site(pxe.Tree(tmp_path / "tree", ()), "http://10.0.2.2:8080", tmp_path, tmp_path / "key")
    node = nodes.Node(nodes.UEFI_NODE, site)
    node.port = 3333
    work = tmp_path / "deploy-uefi"
    assert node.qemu_argv() == [
        *head("deploy-uefi"), "-smp", "2", "-m", "3072", "-nodefaults", "-display", "none", "-monitor", "none",
        "-serial", f"file:{work}/console.log", "-pidfile", f"{work}/qemu.pid", "-device", "virtio-rng-pci",
        "-netdev", "user,id=n0,bootfile=http://10.0.2.2:8080/boot.ipxe,hostfwd=tcp:127.0.0.1:3333-10.0.2.21:22",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:de:00:01,bootindex=2",
        "-netdev", "user,id=uplink0,restrict=on", "-device", "virtio-net-pci,netdev=uplink0,addr=0x8",
        "-drive", f"file={work}/vda.qcow2,if=none,id=d0,format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=d0,bootindex=1",
        "-drive", f"file={work}/vdb.qcow2,if=none,id=d1,format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=d1",
        "-drive", f"file={work}/nvme0n1.qcow2,if=none,id=d2,format=qcow2,discard=unmap",
        "-device", "nvme,drive=d2,serial=deploy2",
        "-drive", f"file={work}/seed-disk.img,if=none,id=seed,format=raw,snapshot=on",
        "-device", "ide-hd,bus=ide.2,drive=seed", *pflash(work)]


def test_the_vm_cpus_variable_sets_every_vms_vcpus(tmp_path, monkeypatch):
    monkeypatch.setenv(qemu.VM_CPUS_VARIABLE, "1")
    vm = testvm.VM(image=tmp_path / "image.qcow2", disk_size=2**30, firmware=Firmware.BIOS, workdir=tmp_path / "vm")
    site = nodes.Site(pxe.Tree(tmp_path / "tree", ()), "http://10.0.2.2:8080", tmp_path, tmp_path / "key")
    for argv in (vm.qemu_argv(tmp_path / "overlay.qcow2", tmp_path / "seed.img"),
                 nodes.Node(nodes.BIOS_NODE, site).qemu_argv()):
        assert argv[argv.index("-smp") + 1] == "1"


@pytest.mark.parametrize("value", ["0", "two", "1 ", "-1", "1000", ""])
def test_a_bad_vm_cpus_variable_is_one_line_naming_it(monkeypatch, value):
    monkeypatch.setenv(qemu.VM_CPUS_VARIABLE, value)
    with pytest.raises(PipelineError, match=rf"^PIPELINE_VM_CPUS='{re.escape(value)}': expected a number of vCPUs"):
        qemu.vm_cpus()


@pytest.mark.parametrize("cores, each", [(1, 1), (2, 1), (3, 1), (4, 2), (64, 2)])
def test_vms_sharing_the_machine_get_their_share_of_the_cores(monkeypatch, cores, each):
    monkeypatch.setattr(qemu.os, "cpu_count", lambda: cores)
    assert qemu.shared_vm_cpus(sharing=2) == each


def test_free_port_is_free_on_loopback():
    import socket

    port = qemu.free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))  # no OSError: nothing holds it
