"""debian-packages.txt works on a Debian 12 and on a Debian 13 build host, and every package an
image installs is in that image's release.

Each release's package index is read the way pipeline/archive.py reads an image's (apt with a
private state, fetched once a day into the cache): every name that ./inv installs must be a real
package there, and the host files the pipeline needs must be in the packages named for them.
"""

from pathlib import Path

import pytest

from pipeline import archive, tools
from pipeline import spec as specs
from pipeline.check.elements import required_packages
from pipeline.paths import DEFAULT_CACHE, ROOT, SPEC_FILE
from pipeline.run import run
from pipeline.spec import Mirrors

RELEASES = ("bookworm", "trixie")
# Essential in every release: on any Debian host, never listed.
ESSENTIAL = {"coreutils", "tar"}


def listed() -> list[str]:
    lines = (ROOT / "debian-packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def release_archive(release: str) -> archive.ReleaseArchive:
    mirrors = Mirrors()
    return archive.release_archive(release, mirrors.debian, mirrors.security)


@pytest.mark.parametrize("release", RELEASES)
def test_every_listed_package_exists_in_the_release(release):
    names = release_archive(release).package_names()
    assert len(names) > 50_000  # the whole of main, not a truncated index
    # A name only other packages Provide (a virtual package) is missing here: apt-get install
    # refuses it or picks a provider by itself.
    assert [name for name in listed() if name not in names] == []


def test_every_package_a_tool_is_looked_up_by_is_listed():
    # tools.py tells a user which package to install; ./inv must install that very package.
    named = {*tools.DEBIAN_PACKAGE.values(), *tools.DEBIAN_PACKAGE_OF_FILE.values()}
    assert sorted(named - set(listed()) - ESSENTIAL) == []


@pytest.mark.parametrize("release", RELEASES)
def test_host_files_are_in_their_packages(release):
    # Firmware, boot programs and GRUB modules move between releases more than commands do.
    source = release_archive(release)
    files: dict[str, list[str]] = {}
    for path, package in tools.DEBIAN_PACKAGE_OF_FILE.items():
        if package != "linux-image-amd64":  # a metapackage: /boot/vmlinuz is its dependency's
            files.setdefault(package, []).append(path)
    debs = Path(DEFAULT_CACHE) / "host-debs" / release
    debs.mkdir(parents=True, exist_ok=True)
    missing = []
    for package, paths in sorted(files.items()):
        version = source.candidate(package)
        found = [d for d in debs.glob(f"{package}_*.deb")
                 if run(["dpkg-deb", "-f", d, "Version"], capture=True).stdout.strip() == version]
        deb = found[0] if found else source.download(package, version, debs)
        # "-rw-r--r-- root/root 996864 2025-05-02 08:55 ./PATH", a symlink's with " -> TARGET".
        contents = {line.split(None, 5)[5].split(" -> ")[0].removeprefix(".")
                    for line in run(["dpkg-deb", "-c", deb], capture=True).stdout.splitlines()}
        missing += [f"{package} {version}: {path}" for path in paths if path not in contents]
    assert missing == []


@pytest.mark.parametrize("image", sorted(specs.load(SPEC_FILE).images))
def test_every_image_package_exists_in_its_release(image):
    # The elements' package-installs.yaml and the spec's packages, for the spec's own release
    # and mirrors: a name gone from trixie fails here, not minutes into DIB.
    spec = specs.load(SPEC_FILE).get(image)
    names = archive.for_spec(spec).package_names()
    assert [name for name in required_packages(spec) if name not in names] == []
