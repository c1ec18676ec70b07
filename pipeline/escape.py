"""Jinja filters that write a value into one file format: kickstart, shell, GRUB, iPXE, pxelinux, dnsmasq.

Defence in depth: spec.py and inventory.py refuse bad values first, naming the file and field. A
value written through a filter stays one word of its format (one line of text in a comment);
what a format cannot hold safely is refused with EscapeError, never written.
"""

from __future__ import annotations

import re
import shlex

from .errors import PipelineError

# Every one of these formats is read line by line: a line break in a value starts a new command.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What GRUB's lexer reads as part of a bare word: no blank, quote, '\', '$', ';', '&', '|', '<', '>',
# '{', '}', '#' (a comment), and no '*', '?', '[', ']' (wildcards).
GRUB_BARE = re.compile(r"[A-Za-z0-9@%+=:,./_~-]+")
GRUB_DOUBLE_QUOTED = re.compile(r'([\\"$])')  # the characters that keep a meaning inside "..."
# iPXE has no quoting: a blank splits words, '${' expands a setting, '||' and '&&' chain
# commands, '#' starts a comment, ':' at a line's start is a label.
IPXE_BARE = re.compile(r"[A-Za-z0-9@%+=,./_~\[\]-][A-Za-z0-9@%+=:,./_~\[\]-]*")
# pxelinux.cfg has no quoting either: a blank ends a file name and splits kernel arguments.
PXELINUX_BARE = re.compile(r"[!-~]+")
# dnsmasq.conf: one option a line, ',' between fields, '#' after a blank starts a comment, '"'
# and '\' quote. Its quoting hides some characters but not all of them in every option: only
# bare words are written.
DNSMASQ_BARE = re.compile(r"[A-Za-z0-9@%+=:./_~\[\]-]+")


class EscapeError(PipelineError):
    """A value holds a character that the format it is written into cannot hold safely."""


def _one_line(value: object, form: str) -> str:
    text = str(value)
    if CONTROL.search(text):
        raise EscapeError(f"cannot write {text!r} into {form}: it holds a control character (a line break "
                          "would start a new line there)")
    return text


def _bare(value: object, form: str, bare: re.Pattern, allowed: str) -> str:
    text = _one_line(value, form)
    if not bare.fullmatch(text):
        raise EscapeError(f"cannot write {text!r} into {form}, which has no quoting: only {allowed} are safe there")
    return text


def kickstart(value: object) -> str:
    """One word of a kickstart line or of its %post shell script: POSIX shell quoting, as pykickstart
    splits lines with shlex; no line break, as both are read line by line (`%end` ends a script)."""
    return shlex.quote(_one_line(value, "a kickstart"))


def grub(value: object) -> str:
    """One word of a GRUB script: bare, or in double quotes with '\\', '"' and '$' escaped."""
    text = _one_line(value, "a GRUB script")
    if GRUB_BARE.fullmatch(text):
        return text
    return '"' + GRUB_DOUBLE_QUOTED.sub(r"\\\1", text) + '"'


def ipxe(value: object) -> str:
    """One word of an iPXE script."""
    return _bare(value, "an iPXE script", IPXE_BARE, "letters, digits and @ % + = , . / _ ~ [ ] - (and : "
                 "after the first character)")


def pxelinux(value: object) -> str:
    """One word of a pxelinux.cfg line: a KERNEL or INITRD path, or one APPEND argument."""
    return _bare(value, "a pxelinux configuration", PXELINUX_BARE, "printable characters other than a blank")


def dnsmasq(value: object) -> str:
    """One field of a dnsmasq.conf option."""
    return _bare(value, "dnsmasq.conf", DNSMASQ_BARE, "letters, digits and @ % + = : . / _ ~ [ ] -")


def comment(value: object) -> str:
    """Text in a `#` comment line of any of these formats: anything but a line break."""
    return _one_line(value, "a comment line")


FILTERS = {
    "ks": kickstart,
    "sh": kickstart,  # a %post script is shell, read line by line as the kickstart is
    "grub": grub,
    "ipxe": ipxe,
    "pxelinux": pxelinux,
    "dnsmasq": dnsmasq,
    "comment": comment,
}
