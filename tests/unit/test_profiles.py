"""tuned profiles are checked against the real tuned .deb; each bad one is refused by file and line.

The reference data comes from `apt-get download tuned` the first time (then from
the cache): without it these tests fail, on purpose, rather than skip.
"""

import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import profiles
from pipeline.errors import CommandFailed, PipelineError
from pipeline.paths import DEFAULT_CACHE, PROFILES

VERSION = "2.20.0-1"  # Debian 12's tuned, as in the image


@pytest.fixture(scope="module")
def ref() -> profiles.TunedReference:
    return profiles.reference(DEFAULT_CACHE)


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


def test_reference_comes_from_the_tuned_deb(ref):
    assert ref.version == VERSION
    root = DEFAULT_CACHE / f"tuned-{VERSION}"
    assert ref.profiles["virtual-guest"] == root / "usr/lib/tuned/virtual-guest/tuned.conf"
    assert len(ref.profiles) == 37 and "recommend.d" not in ref.profiles
    assert len(ref.plugins) == 21
    assert {"sysctl", "vm", "disk", "bootloader", "script", "scsi_host"} <= ref.plugins
    assert "variables" not in ref.plugins  # a loader section, not a plugin


def test_reference_is_extracted_once(ref, monkeypatch):
    calls = []
    real_run = profiles.run
    monkeypatch.setattr(profiles, "run", lambda argv, **kw: calls.append(argv) or real_run(argv, **kw))
    assert profiles.reference(DEFAULT_CACHE) == ref
    assert calls == [["apt-cache", "policy", "tuned"]]


def test_apt_failure_is_a_pipeline_error(tmp_path, monkeypatch):
    def fake_run(argv, **kw):
        raise CommandFailed(argv, 100, "E: Failed to fetch tuned_2.20.0-1_all.deb")
    monkeypatch.setattr(profiles, "run", fake_run)
    with pytest.raises(PipelineError) as caught:
        profiles.reference(tmp_path, version=VERSION)
    assert str(caught.value).startswith(f"cannot download tuned {VERSION} with apt-get download ")
    assert "apt-get download tuned=2.20.0-1: E: Failed to fetch" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no half-extracted cache left behind


def test_apt_without_candidate(tmp_path, monkeypatch):
    monkeypatch.setattr(profiles, "run", lambda argv, **kw: type("R", (), {"stdout": "tuned:\n  Candidate: (none)\n"}))
    with pytest.raises(PipelineError, match=r"^apt-cache policy tuned: apt knows no candidate version of tuned"):
        profiles.reference(tmp_path)


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
        f"and tuned {VERSION} has no built-in profile 'virtual-gust' (did you mean 'virtual-guest'?)")


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
    assert message.startswith(f"{conf}:6: section [sysctls] is no tuned {VERSION} plugin "
                              "(set type=PLUGIN for a named instance); known plugins: audio, bootloader, ")
    assert message.endswith(", usb, video, vm")


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
    assert message.startswith(f"{conf}:6: [data_disk] type=disks names no tuned {VERSION} plugin; "
                              "known plugins: audio, ")


def test_unknown_plugin_in_an_included_profile(tmp_path, ref):
    profile(tmp_path, "a", "[main]\ninclude=b\n")
    conf = profile(tmp_path, "b", "[main]\n[cpus]\ngovernor=performance\n")
    assert refused("a", [tmp_path], ref).startswith(f"{conf}:2: section [cpus] is no tuned {VERSION} plugin ")


def test_include_with_a_variable(tmp_path, ref):
    conf = profile(tmp_path, "p", "[variables]\nbase=virtual-guest\n[main]\ninclude=${base}\n")
    assert refused("p", [tmp_path], ref) == (
        f"{conf}:4: include=${{base}}: tuned cannot expand ${{base}} when it reads include= "
        "([variables] are not defined yet, ${f:...} runs on the target); name the profiles")


def test_missing_profile(tmp_path, ref):
    assert refused("nope", [tmp_path, PROFILES], ref) == (
        f"tuned profile 'nope' not found: no nope/tuned.conf in {tmp_path}, {PROFILES}, "
        f"and tuned {VERSION} has no built-in profile 'nope'")


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
    monkeypatch.syspath_prepend(str(ref.profiles["balanced"].parents[2] / "python3/dist-packages"))
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
