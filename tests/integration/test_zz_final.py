"""Last on purpose (pytest runs modules by name): zero SELinux denials since boot,
covering boot and every command that every test module ran in the guest."""

from __future__ import annotations

import re
from collections import defaultdict

EVENT_ID = re.compile(r"msg=audit\(([\d.]+:\d+)\)")
# --input-logs: without it ausearch reads stdin whenever stdin is not a terminal,
# as over SSH, and finds nothing there.
AUSEARCH = "ausearch --input-logs --start boot --raw --message"


def is_expected(record: str, expected_denial: tuple[str, str]) -> bool:
    source, target = expected_denial
    return bool(re.search(rf"scontext=\w+:\w+:{source}:", record) and re.search(rf"tcontext=\w+:\w+:{target}:", record))


def unexpected_events(raw: str, expected_denial: tuple[str, str]) -> list[str]:
    """ausearch --raw records grouped into events, minus the one denial test_host.py causes
    on purpose (its confined agent reading /etc/shadow)."""
    events: dict[str, list[str]] = defaultdict(list)
    for line in raw.splitlines():
        match = EVENT_ID.search(line)
        if match:
            events[match[1]].append(line)
    return ["\n".join(lines) for lines in events.values()
            if not any(line.startswith("type=AVC") and is_expected(line, expected_denial) for line in lines)]


def test_audit_log_is_readable_since_boot(host, settled):
    """The denial check below would pass on an unreadable log: prove the search sees this boot."""
    started = host.run(f"{AUSEARCH} SERVICE_START")
    assert started.rc == 0 and "unit=ssh " in started.stdout, started.stdout[-2000:] + started.stderr


def test_no_avc_denials_since_boot(host, settled, expected_denial):
    audit = host.run(f"{AUSEARCH} AVC,USER_AVC,SELINUX_ERR")
    assert audit.rc in (0, 1), audit.stderr  # 1: nothing matched (--raw then prints nothing at all)
    unexpected = unexpected_events(audit.stdout, expected_denial)
    assert unexpected == [], "\n----\n".join(unexpected)[-6000:]
    kernel = host.run("journalctl --boot --dmesg --grep 'avc:  denied' --no-pager --quiet")
    lines = [line for line in kernel.stdout.splitlines() if line.strip() and not is_expected(line, expected_denial)]
    assert lines == [], "\n".join(lines)[-4000:]
