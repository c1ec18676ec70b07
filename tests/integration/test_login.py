"""A cloud user gets in the way a cloud lets them: by key, as the default user or as a
user of their user-data, with the keys the seed (NoCloud or a config drive) gave; never by
password and never as root. Shares the session's boots; test_zz_final.py repeats these
logins with SELinux's dontaudit rules off.
"""

from __future__ import annotations

import re

import pytest
from conftest import DATASOURCE, KEY_USER, PASSWORD_HASH, PASSWORD_USER

from pipeline import testvm
from pipeline.check import selinux_type
from pipeline.seed import Datasource

# What the policy's file contexts say a home and its SSH files are; sshd_t may read the last two.
HOME_LABELS = {"": "user_home_dir_t", "/.ssh": "ssh_home_t", "/.ssh/authorized_keys": "ssh_home_t"}
RESTORED = re.compile(r"Restoring selinux mode for (\S+) \(recursive=True\)")
CLOUD_INIT_WRITES = re.compile(r"/var/lib/cloud(/.*)?|/etc/ssh|/root/\.ssh|/home/[^/]+/\.ssh")


def test_cloud_init_used_the_boots_datasource(host, firmware, settled):
    expected = {Datasource.NOCLOUD: "DataSourceNoCloud", Datasource.CONFIG_DRIVE: "DataSourceConfigDrive"}
    status = host.check_output("cloud-init status --long")
    assert expected[DATASOURCE[firmware]] in status, status


@pytest.mark.parametrize("user", [testvm.CLOUD_USER, KEY_USER])
def test_user_logs_in_by_key(logins, user):
    login = logins[user]
    assert login.returncode == 0 and login.stdout.strip() == user, login.stdout + login.stderr


# Enabled for all users by gnupg and openssh-client, they held up every user's first login
# with a helper each (kvm-base's 65-no-user-agent-sockets disables them).
AGENT_SOCKETS = ("gpg-agent.socket", "gpg-agent-ssh.socket", "gpg-agent-extra.socket", "gpg-agent-browser.socket",
                 "dirmngr.socket", "keyboxd.socket", "ssh-agent.socket")


def test_login_starts_no_agent_sockets_and_gpg_starts_its_agent_itself(host):
    listening = host.check_output("systemctl --user list-sockets --no-legend --plain")
    assert not [s for s in AGENT_SOCKETS if s in listening.split()], listening
    try:
        first_use = host.run("gpg --batch --list-keys")  # makes ~/.gnupg, as a first use does
        assert first_use.rc == 0, first_use.stdout + first_use.stderr
        agent = host.run("gpg-connect-agent 'GETINFO version' /bye")
        assert agent.rc == 0 and agent.stdout.startswith("D "), agent.stdout + agent.stderr
    finally:
        host.run("gpgconf --kill gpg-agent; rm -rf ~/.gnupg")


def test_default_user_has_sudo(host):
    assert host.check_output("sudo -n id -un") == "root"


@pytest.mark.parametrize("user", [testvm.CLOUD_USER, KEY_USER])
def test_ssh_files_carry_the_policys_labels(root, settled, user):
    home = root.user(user).home
    for suffix, expected in HOME_LABELS.items():
        label = root.check_output(f"stat -c %C {home}{suffix}")
        assert selinux_type(label) == expected, (f"{home}{suffix}", label)
    # Nothing under the home differs from the policy: restorecon would change nothing.
    assert root.check_output(f"restorecon -R -n -v {home}") == ""


def test_cloud_init_labels_only_what_it_wrote(root, settled):
    """The labels come from cloud-init restoring those of what it wrote (its SELinux bindings are
    in the image): its own state, the host keys and each user's ~/.ssh; nothing is relabeled
    beyond that at boot."""
    assert not root.file("/.autorelabel").exists
    log = root.file("/var/log/cloud-init.log").content_string
    restored = set(RESTORED.findall(log))
    homes = {root.user(user).home for user in (testvm.CLOUD_USER, KEY_USER)}
    assert {f"{home}/.ssh" for home in homes} <= restored, sorted(restored)
    assert all(CLOUD_INIT_WRITES.fullmatch(path) for path in restored), sorted(restored)


def test_root_cannot_log_in(logins):
    """cloud-init gives root the seed's key only to say whom to log in as (disable_root)."""
    login = logins["root"]
    assert login.returncode != 0 and login.stdout.strip() != "root", login.stdout + login.stderr
    assert f'Please login as the user "{testvm.CLOUD_USER}"' in login.stdout, login.stdout + login.stderr


def test_password_user_cannot_log_in_with_its_password(root, logins):
    # The password is set and unlocked, exactly as user-data asked...
    assert root.check_output(f"getent shadow {PASSWORD_USER}").split(":")[1] == PASSWORD_HASH
    # ...and sshd offers no way to use it.
    login = logins[PASSWORD_USER]
    assert login.returncode != 0 and PASSWORD_USER not in login.stdout, login.stdout + login.stderr
    assert "Permission denied (publickey)" in login.stderr, login.stderr
