"""tuned profiles are checked against the real tuned .deb of the image's release; each bad one
is refused by file and line.

The reference data comes from each release's own package index and `apt-get download tuned`
the first time (then from the cache, which ./inv fills at set-up): without it these tests
fail, on purpose, rather than skip. Every profile test runs against both releases' tuned.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import archive, profiles
from pipeline.errors import CommandFailed, PipelineError
from pipeline.paths import DEFAULT_CACHE, PROFILES
from pipeline.spec import Mirrors

# Each release's tuned, as in its image. trixie's (2.23+) moved the built-in profiles to
# usr/lib/tuned/profiles and added plugins.
TUNED = {"bookworm": "2.20.0-1", "trixie": "2.25.1-1"}
MIRRORS = Mirrors()


def release_archive(release: str, cache_dir: Path = DEFAULT_CACHE) -> archive.ReleaseArchive:
    return archive.release_archive(release, MIRRORS.debian, MIRRORS.security, cache_dir)


@pytest.fixture(scope="module", params=sorted(TUNED))
def ref(request) -> profiles.TunedReference:
    return profiles.reference(release_archive(request.param))


def profile(root: Path, name: str, text: str) -> Path:
    conf = root / name / "tuned.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(textwrap.dedent(text).lstrip("\n"))
    return conf


def refused(name: str, dirs: list[Path], ref) -> str:
    with pytest.raises(profiles.ProfileError) as caught:
        profiles.validate_profile(name, dirs, ref)
    message = str(caught.value)
    assert "\n" not in message
    assert isinstance(caught.value, PipelineError)
    return message


@pytest.mark.parametrize("release, builtin, count, plugins", [
    ("bookworm", "usr/lib/tuned", 37, 21),
    # trixie's own tuned, whatever the build host has: 2.23 moved the built-in profiles.
    ("trixie", "usr/lib/tuned/profiles", 39, 24),
])
def test_reference_comes_from_the_releases_tuned_deb(release, builtin, count, plugins):
    ref = profiles.reference(release_archive(release))
    assert ref.version == TUNED[release]
    root = DEFAULT_CACHE / f"tuned-{ref.version}"
    assert ref.profiles["virtual-guest"] == root / builtin / "virtual-guest/tuned.conf"
    assert len(ref.profiles) == count and not {"recommend.d", "functions"} & set(ref.profiles)
    assert len(ref.plugins) == plugins
    assert {"sysctl", "vm", "disk", "bootloader", "script", "scsi_host"} <= ref.plugins
    assert "variables" not in ref.plugins  # a loader section, not a plugin


def test_trixie_has_plugins_bookworm_lacks():
    new = profiles.reference(release_archive("trixie")).plugins
    assert new - profiles.reference(release_archive("bookworm")).plugins == {"acpi", "irq", "uncore"}


def test_a_plugin_is_known_only_to_the_release_that_has_it(tmp_path):
    # tuned 2.21 added the irq plugin: fine for a trixie image, an error for a bookworm one.
    conf = profile(tmp_path, "p", "[main]\ninclude=virtual-guest\n[irq]\ndefault_irq_smp_affinity=ignore\n")
    profiles.validate_profile("p", [tmp_path], profiles.reference(release_archive("trixie")))
    message = refused("p", [tmp_path], profiles.reference(release_archive("bookworm")))
    assert message.startswith(f"{conf}:3: section [irq] is no tuned {TUNED['bookworm']} plugin ")


def test_reference_is_extracted_once(ref, monkeypatch):
    calls = []
    real_run = profiles.run
    monkeypatch.setattr(archive, "run", lambda argv, **kw: calls.append(argv) or real_run(argv, **kw))
    monkeypatch.setattr(profiles, "run", lambda argv, **kw: calls.append(argv) or real_run(argv, **kw))
    release = next(r for r, v in TUNED.items() if v == ref.version)
    assert profiles.reference(release_archive(release)) == ref
    # The fresh index is read, not fetched again; the cached extraction is used as it is.
    assert [argv[0] for argv in calls] == ["apt-cache"] and calls[0][-2:] == ["policy", "tuned"]


def fake_apt(monkeypatch, calls: list, returncode: int = 0, stderr: str = "", stdout: str = ""):
    """apt as pipeline/run.py would run it, answering every command the same way."""
    def fake_run(argv, **kw):
        calls.append([str(a) for a in argv])
        if returncode and kw.get("check", True):
            raise CommandFailed(argv, returncode, stderr.strip().splitlines()[-1])
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)
    monkeypatch.setattr(archive, "run", fake_run)
    monkeypatch.setattr(profiles, "run", fake_run)


def test_index_is_private_to_the_release_and_its_mirrors(tmp_path, monkeypatch):
    calls: list = []
    fake_apt(monkeypatch, calls, stdout="tuned:\n  Installed: (none)\n  Candidate: 2.25.1-1\n")
    mine = archive.release_archive("trixie", "https://mirror.example/debian", "https://mirror.example/sec", tmp_path)
    assert mine.candidate("tuned") == "2.25.1-1"
    assert mine.root.parent == tmp_path / "apt-index" and mine.root.name.startswith("trixie-")
    assert mine.root != release_archive("trixie", tmp_path).root  # other mirrors, another index
    assert (mine.root / "sources.list").read_text() == (
        "deb https://mirror.example/debian trixie main\n"
        "deb https://mirror.example/debian trixie-updates main\n"
        "deb https://mirror.example/sec trixie-security main\n")
    update, policy = calls
    assert update[0] == "apt-get" and update[-3:] == ["-q", "--error-on=any", "update"]
    assert policy[0] == "apt-cache" and policy[-2:] == ["policy", "tuned"]
    for argv in calls:  # none of the host's sources, pins or installed packages
        options = dict(o.split("=", 1) for o in argv[2:-2:2] if "=" in o)
        assert options["Dir::Etc::SourceList"] == str(mine.root / "sources.list")
        assert options["Dir::Etc::SourceParts"] == options["Dir::Etc::PreferencesParts"] == "/dev/null"
        assert options["Dir::State::Lists"] == str(mine.root / "lists")
        assert options["Dir::State::status"] == str(mine.root / "status")
    assert (mine.root / "status").read_text() == ""


def test_a_stale_index_is_fetched_again(tmp_path, monkeypatch):
    calls: list = []
    fake_apt(monkeypatch, calls)
    mine = release_archive("trixie", tmp_path)
    mine.update()
    mine.update()
    assert len(calls) == 1
    old = time.time() - archive.MAX_AGE - 1
    os.utime(mine.root / "updated", (old, old))
    mine.update()
    assert len(calls) == 2


def test_unreachable_mirror_is_one_line_naming_the_url(tmp_path, monkeypatch):
    # Real apt against a port where nothing listens: refused at once, no network needed.
    monkeypatch.setattr(archive, "RETRIES", 0)  # apt's retries back off for seconds
    dead = archive.release_archive("trixie", "http://127.0.0.1:9/debian", "http://127.0.0.1:9/security", tmp_path)
    with pytest.raises(PipelineError) as caught:
        profiles.reference(dead, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot read Debian trixie's package index: mirror unreachable: http://127.0.0.1:9/")
    assert "/dists/trixie" in message
    assert not (dead.root / "updated").exists()  # the next build tries again
    assert [p.name for p in tmp_path.iterdir()] == ["apt-index"]  # no tuned extraction begun


def test_download_failure_is_a_pipeline_error(tmp_path, monkeypatch):
    version = TUNED["bookworm"]
    mine = release_archive("bookworm", tmp_path)
    mine.root.mkdir(parents=True)
    (mine.root / "updated").touch()  # a fresh index: only the download runs
    calls: list = []
    fake_apt(monkeypatch, calls, returncode=100, stderr=f"E: Failed to fetch tuned_{version}_all.deb\n")
    with pytest.raises(PipelineError) as caught:
        profiles.reference(mine, tmp_path, version=version)
    assert str(caught.value).startswith(f"cannot download tuned {version} of Debian bookworm from {MIRRORS.debian}: ")
    assert f"download tuned={version}: E: Failed to fetch" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apt-index"]  # no half-extracted cache left behind


def test_release_without_tuned(tmp_path, monkeypatch):
    fake_apt(monkeypatch, [], stdout="tuned:\n  Installed: (none)\n  Candidate: (none)\n")
    with pytest.raises(PipelineError, match=r"^Debian trixie has no package tuned in http://deb.debian.org/debian "):
        profiles.reference(release_archive("trixie", tmp_path), tmp_path)


def test_our_kvm_guest_profile_validates(ref):
    profiles.validate_profile("kvm-guest", [PROFILES], ref)
    assert profiles.resolve("kvm-guest", [PROFILES], ref) == [
        PROFILES / "kvm-guest/tuned.conf", ref.profiles["virtual-guest"], ref.profiles["throughput-performance"]]


def test_every_builtin_profile_validates(ref):
    for name in ref.profiles:  # openshift's include=${f:virt_check:...} included
        profiles.validate_profile(name, [], ref)


def test_broken_ini_line(tmp_path, ref):
    conf = profile(tmp_path, "p", """
        [main]
        summary=broken   # an inline comment is fine
        [sysctl]
        vm.swappiness 10
        """)
    assert refused("p", [tmp_path], ref) == (
        f"{conf}:4: tuned cannot parse 'vm.swappiness 10': expected '[section]', 'key=value' or a '#' comment")


def test_key_before_any_section(tmp_path, ref):
    conf = profile(tmp_path, "p", "# tuned.conf\ninclude=virtual-guest\n[main]\n")
    assert refused("p", [tmp_path], ref) == (
        f"{conf}:2: 'include=virtual-guest' comes before any [section] header "
        "(tuned.conf starts with [main] or a plugin's section)")


def test_unknown_include(tmp_path, ref):
    conf = profile(tmp_path, "p", """
        [main]
        summary=typo
        include=virtual-gust
        """)
    assert refused("p", [tmp_path], ref) == (
        f"{conf}:3: include=virtual-gust: unknown profile: no virtual-gust/tuned.conf in {tmp_path}, "
        f"and tuned {ref.version} has no built-in profile 'virtual-gust' (did you mean 'virtual-guest'?)")


def test_include_names_are_split_on_comma_not_space(tmp_path, ref):
    profile(tmp_path, "ok", "[main]\ninclude=virtual-guest, -not-there ;network-latency\n")
    profiles.validate_profile("ok", [tmp_path], ref)  # "-name" is optional, as in tuned
    conf = profile(tmp_path, "p", "[main]\ninclude=virtual-guest network-latency\n")
    message = refused("p", [tmp_path], ref)
    assert message.startswith(f"{conf}:2: include=virtual-guest network-latency: unknown profile: ")
    assert message.endswith("(tuned separates include= names with ',' or ';', not spaces)")


def test_two_profile_loop(tmp_path, ref):
    profile(tmp_path, "a", "[main]\ninclude=b\n")
    b = profile(tmp_path, "b", "[main]\nsummary=b\n\ninclude=a\n")
    assert refused("a", [tmp_path], ref) == f"{b}:4: include loop: a -> b -> a"


def test_three_profile_loop_through_builtin(tmp_path, ref):
    a = profile(tmp_path, "a", "[main]\ninclude=b\n")
    profile(tmp_path, "b", "[main]\ninclude=virtual-guest,c\n")
    c = profile(tmp_path, "c", "[sysctl]\nvm.swappiness=1\n[main]\ninclude=b\n")
    assert refused("a", [tmp_path], ref) == f"{c}:4: include loop: b -> c -> b"
    profile(tmp_path, "b", "[main]\ninclude=c\n")
    profile(tmp_path, "c", "[main]\ninclude=a\n")
    assert refused("b", [tmp_path], ref) == f"{a}:2: include loop: b -> c -> a -> b"


def test_overriding_a_builtin_may_include_it(tmp_path, ref):
    # As /etc/tuned/NAME may include /usr/lib/tuned/NAME: no loop.
    ours = profile(tmp_path, "virtual-guest", "[main]\ninclude=virtual-guest\n[vm]\ntransparent_hugepages=never\n")
    assert profiles.resolve("virtual-guest", [tmp_path], ref) == [
        ours, ref.profiles["virtual-guest"], ref.profiles["throughput-performance"]]


def test_diamond_is_not_a_loop(tmp_path, ref):
    profile(tmp_path, "a", "[main]\ninclude=b,c\n")
    profile(tmp_path, "b", "[main]\ninclude=c\n")
    profile(tmp_path, "c", "[main]\ninclude=virtual-guest\n")
    assert [p.parent.name for p in profiles.resolve("a", [tmp_path], ref)] == [
        "a", "b", "c", "virtual-guest", "throughput-performance"]


def test_include_from_another_of_our_directories(tmp_path, ref):
    first, second = tmp_path / "first", tmp_path / "second"
    profile(first, "a", "[main]\ninclude=b\n")
    profile(second, "b", "[main]\ninclude=virtual-guest\n")
    profiles.validate_profile("a", [first, second], ref)
    # The first directory wins, as /etc/tuned wins over /usr/lib/tuned.
    conf = profile(first, "b", "[sysctls]\n")
    assert refused("a", [first, second], ref).startswith(f"{conf}:1: section [sysctls] ")


def test_unknown_plugin_section(tmp_path, ref):
    conf = profile(tmp_path, "p", """
        [main]
        include=virtual-guest
        [variables]
        swappiness=10

        [sysctls]
        vm.swappiness=${swappiness}
        """)
    message = refused("p", [tmp_path], ref)
    assert message.startswith(f"{conf}:6: section [sysctls] is no tuned {ref.version} plugin "
                              "(set type=PLUGIN for a named instance); known plugins: ")
    assert message.endswith(f"known plugins: {', '.join(sorted(ref.plugins))}")


def test_type_names_unknown_plugin(tmp_path, ref):
    profile(tmp_path, "ok", "[main]\n[data_disk]\ntype=disk\ndevices=vdb\n")
    profiles.validate_profile("ok", [tmp_path], ref)
    conf = profile(tmp_path, "p", """
        [main]
        [data_disk]
        type=disk
        devices=vdb,
          vdc
        type = disks   # the last value wins (strict=False), so this line is the one
        """)
    message = refused("p", [tmp_path], ref)
    assert message.startswith(f"{conf}:6: [data_disk] type=disks names no tuned {ref.version} plugin; "
                              "known plugins: ")


def test_unknown_plugin_in_an_included_profile(tmp_path, ref):
    profile(tmp_path, "a", "[main]\ninclude=b\n")
    conf = profile(tmp_path, "b", "[main]\n[cpus]\ngovernor=performance\n")
    assert refused("a", [tmp_path], ref).startswith(f"{conf}:2: section [cpus] is no tuned {ref.version} plugin ")


def test_include_with_a_variable(tmp_path, ref):
    conf = profile(tmp_path, "p", "[variables]\nbase=virtual-guest\n[main]\ninclude=${base}\n")
    assert refused("p", [tmp_path], ref) == (
        f"{conf}:4: include=${{base}}: tuned cannot expand ${{base}} when it reads include= "
        "([variables] are not defined yet, ${f:...} runs on the target); name the profiles")


def test_missing_profile(tmp_path, ref):
    assert refused("nope", [tmp_path, PROFILES], ref) == (
        f"tuned profile 'nope' not found: no nope/tuned.conf in {tmp_path}, {PROFILES}, "
        f"and tuned {ref.version} has no built-in profile 'nope'")


@pytest.mark.parametrize("name", ["a b", "virtual-host\n", "../x"])
def test_invalid_profile_name(tmp_path, ref, name):
    assert refused(name, [tmp_path], ref).startswith(f"invalid tuned profile name {name!r}: ")


EDGE_CASES = [
    "[main]\ninclude = a # comment\n  b=c\n[x]\ntype=vm\n[x]\ntype=cpu\nk=1\n k2=2\n",
    "[DEFAULT]\ntype=vm\n[a]\n[b]\ntype=cpu\n",
    "\t[main]\n\tinclude=x\n\t\tmore=1\n\tkey=2\n[s] junk]\nk=v;c\n",
    "[main]\r\ninclude=${i:PROFILE_DIR}/x\r\nsummary=100%\r\n",
]


@pytest.fixture
def tuned_modules(ref, monkeypatch):
    """tuned's own Python package, from the .deb: importing it runs nothing."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # keep the cache as dpkg-deb left it
    lib = next(p for p in ref.profiles["balanced"].parents if p.name == "lib")  # usr/lib in the .deb
    monkeypatch.syspath_prepend(str(lib / "python3/dist-packages"))
    yield
    for name in [m for m in sys.modules if m == "tuned" or m.startswith("tuned.")]:
        del sys.modules[name]


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # in tuned's source
def test_parser_agrees_with_tuneds_own_loader(tmp_path, ref, tuned_modules):
    # Our reading, and the lines we report, match what tuned's loader.py reads.
    from tuned.profiles.exceptions import InvalidProfileException
    from tuned.profiles.loader import Loader

    loader = Loader.__new__(Loader)
    cases = [profile(tmp_path, f"edge{i}", text) for i, text in enumerate(EDGE_CASES)]
    for conf in [*ref.profiles.values(), PROFILES / "kvm-guest/tuned.conf", *cases]:
        theirs, ours = loader._load_config_data(str(conf)), profiles._parse(conf)
        # script= is rewritten to a list of paths after reading (loader.py:113-115).
        assert {s: {k: v for k, v in o.items() if k != "script"} for s, o in theirs.items()} == \
               {s: {k: v for k, v in o.items() if k != "script"} for s, o in ours.sections.items()}
        text = conf.read_text().splitlines()
        for section, options in theirs.items():
            assert text[ours.line(section) - 1].strip().startswith(f"[{section}]")
            for key in options:
                assert text[ours.line(section, key) - 1].strip().startswith(key)
    for text in ("[main]\nvm.swappiness 10\n", "include=a\n[main]\n"):
        conf = profile(tmp_path, "bad", text)
        with pytest.raises(InvalidProfileException):
            loader._load_config_data(str(conf))
        with pytest.raises(profiles.ProfileError):
            profiles._parse(conf)


@pytest.mark.parametrize("name", sorted(p.name for p in PROFILES.iterdir() if (p / "tuned.conf").is_file()))
def test_every_profile_we_ship_validates(name, ref):
    profiles.validate_profile(name, [PROFILES], ref)


def test_a_sysctl_that_tuneds_vm_plugin_sets_differently_is_refused(tmp_path, ref):
    """trixie's throughput-performance (under virtual-guest) sets dirty_background_ratio=10 in
    [vm]; the same sysctl at 5 in [sysctl] fails `tuned-adm verify` on the guest (seen on
    trixie). bookworm's tuned has no such [vm] option, so there it is fine."""
    conf = profile(tmp_path, "p", """
        [main]
        include=virtual-guest
        [sysctl]
        vm.dirty_background_ratio=5
        """)
    if not ref.vm_sysctl_options:
        profiles.validate_profile("p", [tmp_path], ref)
        return
    parent = ref.profiles["throughput-performance"]
    message = refused("p", [tmp_path], ref)
    assert message.startswith(f"{conf}:4: [sysctl] vm.dirty_background_ratio=5, but [vm] dirty_background_ratio=10 "
                              f"({parent}:")
    assert message.endswith(f"tuned {ref.version} sets it from both, and `tuned-adm verify` fails; "
                            "set dirty_background_ratio=5 in [vm] too")
    # The same value in [vm], or [vm] replaced, settles it.
    profile(tmp_path, "p", "[main]\ninclude=virtual-guest\n[sysctl]\nvm.dirty_background_ratio=5\n"
                           "[vm]\ndirty_background_ratio=5\n")
    profiles.validate_profile("p", [tmp_path], ref)
    profile(tmp_path, "p", "[main]\ninclude=virtual-guest\n[sysctl]\nvm.dirty_background_ratio=5\n[vm]\nreplace=1\n")
    profiles.validate_profile("p", [tmp_path], ref)


def test_trixies_vm_plugin_sets_the_dirty_sysctls(ref):
    expected = {"bookworm": set(), "trixie": {"dirty_bytes", "dirty_ratio", "dirty_background_bytes",
                                              "dirty_background_ratio"}}
    release = next(r for r, version in TUNED.items() if version == ref.version)
    assert ref.vm_sysctl_options == expected[release]
