"""Package layers: verified before use, aged from creation, one build at a time, restored inside the tree."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import layer
from pipeline.paths import ROOT

ELEMENT = ROOT / "elements" / "kvm-package-layer"


DAY = 24 * 3600


def _save(tmp_path) -> layer.PackageLayer:
    """A layer as a build that saved it leaves it: layer.tar, the empty tarball in DIB's debootstrap
    cache's place and xattrs.json, finished."""
    directory = tmp_path / "cache" / "layers" / "0123456789abcdef"
    directory.mkdir(parents=True)
    package_layer = layer.PackageLayer(directory, tmp_path / "cache" / "base.tar.gz", directory / "layer.tar.gz")
    _store(package_layer)
    package_layer.finish()
    return package_layer


def _store(package_layer: layer.PackageLayer) -> None:
    package_layer.contents.write_bytes(b"the packages")
    package_layer.tarball.write_bytes(b"an empty tarball")
    (package_layer.directory / layer.XATTRS).write_text("{}")


@pytest.fixture
def saved(tmp_path):
    return _save(tmp_path)


def test_a_finished_layer_is_used(saved):
    assert saved.prepare()


@pytest.mark.parametrize("damaged", ["contents", "tarball", "xattrs"])
def test_a_damaged_layer_is_not_used(saved, damaged):
    path = {"contents": saved.contents, "tarball": saved.tarball, "xattrs": saved.directory / layer.XATTRS}[damaged]
    path.write_bytes(b"garbage")
    assert not saved.prepare()
    assert not (saved.directory / layer.RECORD).exists()
    assert not saved.contents.exists()  # so root.d/07-package-layer-unpack does not unpack it over the base


def test_a_layer_made_again_starts_from_debootstraps_base(saved):
    saved.base.write_bytes(b"debootstrap's tree")
    (saved.directory / layer.RECORD).unlink()
    assert not saved.prepare()
    assert saved.tarball.read_bytes() == b"debootstrap's tree"


def test_age_counts_from_creation_not_last_use(tmp_path, monkeypatch):
    now = time.time()
    monkeypatch.setattr(layer.time, "time", lambda: now - 6 * DAY)
    package_layer = _save(tmp_path)
    monkeypatch.setattr(layer.time, "time", lambda: now)
    assert package_layer.prepare()  # six days old, and used: that must not make it younger
    monkeypatch.setattr(layer.time, "time", lambda: now + 2 * DAY)
    assert not package_layer.prepare()


def test_a_layer_used_by_a_build_is_not_saved_again(saved, monkeypatch):
    record = (saved.directory / layer.RECORD).read_text()
    an_hour_later = time.time() + 3600
    monkeypatch.setattr(layer.time, "time", lambda: an_hour_later)
    assert saved.prepare()
    saved.finish()
    assert (saved.directory / layer.RECORD).read_text() == record


def test_a_second_build_waits_for_the_first_and_uses_its_layer(saved, tmp_path):
    """Two builds with one key: the second blocks on the layer's lock until the first is done."""
    (saved.directory / layer.RECORD).unlink()
    waiter = f"""
from pathlib import Path
from pipeline import layer
package_layer = layer.PackageLayer(Path({str(saved.directory)!r}), Path({str(saved.base)!r}),
                                   Path({str(saved.tarball)!r}))
print("waiting", flush=True)
with package_layer.locked():
    print(package_layer.prepare())
"""
    with saved.locked():
        second = subprocess.Popen([sys.executable, "-c", waiter], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert second.stdout.readline() == "waiting\n"
        # It says for whom it waits: this process, the first build.
        waiting = f"waiting for package layer {saved.directory.name} (held by pid {os.getpid()})\n"
        assert second.stderr.readline() == waiting
        assert second.poll() is None  # waiting for the lock
        assert not saved.prepare()  # the first build: no layer yet, it saves one
        _store(saved)
        saved.finish()
    assert second.communicate(timeout=30) == ("True\n", "")  # it starts from the first build's layer


def test_prune_keeps_a_layer_in_use(saved):
    with saved.locked():
        layer.prune(saved.directory.parent, keep=0)
    assert saved.directory.is_dir()
    layer.prune(saved.directory.parent, keep=0)
    assert not saved.directory.exists()


def test_prune_keeps_the_most_recently_used(tmp_path):
    layers = tmp_path / "layers"
    for age, name in enumerate(["new", "used", "old"]):
        (layers / name).mkdir(parents=True)
        os.utime(layers / name, (time.time() - age * DAY,) * 2)
    layer.prune(layers, keep=4)
    assert sorted(p.name for p in layers.iterdir()) == ["new", "old", "used"]
    layer.prune(layers, keep=2)
    assert sorted(p.name for p in layers.iterdir()) == ["new", "used"]


def test_the_store_hook_uses_a_temporary_file_of_its_own(tmp_path):
    """Another build's temporary file beside the layer is neither overwritten nor moved."""
    cache = tmp_path / "cache"
    saved_tree = cache / layer.SAVING  # bind-mounted on the tree's /tmp/package-layer during the build
    saved_tree.mkdir(parents=True)
    subprocess.run(["tar", "--create", "--file", saved_tree / "layer.tar", "--files-from", "/dev/null"], check=True)
    (saved_tree / "xattrs.json").write_text("{}")
    tarball = cache / "debootstrap-debian-bookworm-amd64.tar.gz"
    others = cache / f"{tarball.name}.tmp"
    others.write_text("another build's, half written")
    env = {"PATH": os.environ["PATH"], "TMP_MOUNT_PATH": str(tmp_path / "mnt"), "DIB_IMAGE_CACHE": str(cache),
           "DISTRO_NAME": "debian", "DIB_RELEASE": "bookworm", "ARCH": "amd64"}
    subprocess.run([ELEMENT / "post-root.d/90-package-layer-store"], env=env, check=True)
    assert others.read_text() == "another build's, half written"
    # The tree as it was saved, and an empty tarball for debootstrap's 08-debootstrap to unpack.
    assert subprocess.run(["tar", "--list", "--file", cache / "layer.tar"], check=True).returncode == 0
    listed = subprocess.run(["tar", "--list", "--gzip", "--file", tarball], check=True, capture_output=True)
    assert listed.stdout == b""
    assert sorted(p.name for p in cache.iterdir()) == sorted([tarball.name, others.name, "xattrs.json", "layer.tar",
                                                              layer.SAVING])
    assert not any(saved_tree.iterdir())  # renamed, not copied


def _restore_xattrs(root: Path, dump: dict) -> subprocess.CompletedProcess:
    """root.d/08-package-layer's restore, as that hook runs it (its Python, without sudo)."""
    hook = (ELEMENT / "root.d/08-package-layer").read_text()
    program = hook.split("<<'PYTHON'\n", 1)[1].split("\nPYTHON\n", 1)[0]
    (root.parent / "xattrs.json").write_text(json.dumps(dump))
    return subprocess.run([sys.executable, "-c", program, root, root.parent / "xattrs.json"],
                          capture_output=True, text=True)


XATTR = {"user.layer": "c2V0"}  # base64 of "set"


@pytest.mark.parametrize("path", ["/../outside/file", "/usr/../../outside/file", "/link/file"])
def test_restoring_xattrs_stays_inside_the_tree(tmp_path, path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "usr").mkdir(parents=True)
    outside.mkdir()
    (outside / "file").write_text("not the image's")
    (root / "link").symlink_to(outside)
    restored = _restore_xattrs(root, {"/usr": XATTR, path: XATTR})
    assert os.listxattr(outside / "file") == []
    assert restored.returncode != 0
    assert restored.stderr.strip().splitlines() == [f"{root.parent / 'xattrs.json'}: path {path!r} leaves the tree"]


def test_restoring_xattrs_sets_them_inside_the_tree(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/ping").write_text("")
    restored = _restore_xattrs(root, {"/usr/bin/ping": XATTR, "/gone": XATTR})
    assert restored.returncode == 0, restored.stderr
    assert os.getxattr(root / "usr/bin/ping", "user.layer") == b"set"


def test_the_cache_keeps_a_layer_for_every_image_we_ship():
    """Building every image of images.toml in turn (./inv ci, ./inv test) must not evict the first
    one's layer before its next build: CI's guest rebuild once downloaded everything again."""
    from pipeline import spec as specs
    from pipeline.paths import SPEC_FILE

    assert len(specs.load(SPEC_FILE).images) < layer.KEEP


def test_a_layer_made_again_drops_the_policy_stores_cached_from_the_old_one(saved, tmp_path, monkeypatch):
    """kvm-build-speed caches the store our modules make from the layer's store: a layer that is
    made again (expired, damaged) has a store of its own, from newer packages."""
    saved.policy_cache.mkdir()
    (saved.policy_cache / "0123.tar").write_text("a store")
    assert saved.prepare()
    assert (saved.policy_cache / "0123.tar").exists()
    later = time.time() + layer.MAX_AGE + DAY
    monkeypatch.setattr(layer.time, "time", lambda: later)
    assert not saved.prepare()
    assert not saved.policy_cache.exists()
    assert saved.environment(saving=True)["DIB_POLICY_STORE_CACHE"] == str(saved.policy_cache)


SPEED = ROOT / "elements" / "kvm-build-speed"


def _policy_hooks(tmp_path: Path, modules: dict[str, bytes]):
    """The host side of kvm-build-speed's policy store cache, on a fake build: the modules DIB hands
    in, the tree's /tmp, the cache. Returns a runner for a hook by its path in the element."""
    hooks, mnt, cache = tmp_path / "hooks", tmp_path / "mnt", tmp_path / "cache"
    shutil.rmtree(hooks, ignore_errors=True)
    (hooks / "selinux-modules").mkdir(parents=True)
    (mnt / "tmp").mkdir(parents=True, exist_ok=True)
    for name, content in modules.items():
        (hooks / "selinux-modules" / name).write_bytes(content)
    env = {"PATH": os.environ["PATH"], "TMP_HOOKS_PATH": str(hooks), "TMP_MOUNT_PATH": str(mnt),
           "DIB_POLICY_STORE_CACHE": str(cache)}
    return lambda hook: subprocess.run([SPEED / hook], env=env, check=True, capture_output=True, text=True)


def test_a_policy_store_saved_by_one_build_is_handed_to_the_next_with_the_same_modules(tmp_path):
    run_hook = _policy_hooks(tmp_path, {"a.pp": b"module a", "b.pp": b"module b"})
    run_hook("extra-data.d/20-policy-store-cache")  # nothing cached yet
    handover = tmp_path / "hooks" / "kvm-build-speed-policy"
    assert not (handover / "store.tar").exists()
    (tmp_path / "mnt/tmp/kvm-build-speed-policy.tar").write_bytes(b"the store")  # as the wait hook leaves it
    run_hook("post-root.d/91-policy-store-cache")
    assert not (tmp_path / "mnt/tmp/kvm-build-speed-policy.tar").exists()  # not left in the image
    key = (handover / "key").read_text().strip()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.tar", f"{key}.tar.sha256"]

    run_hook = _policy_hooks(tmp_path, {"a.pp": b"module a", "b.pp": b"module b"})
    run_hook("extra-data.d/20-policy-store-cache")
    assert (handover / "store.tar").read_bytes() == b"the store"

    run_hook = _policy_hooks(tmp_path, {"a.pp": b"module a, changed", "b.pp": b"module b"})
    run_hook("extra-data.d/20-policy-store-cache")
    assert (handover / "key").read_text().strip() != key
    assert not (handover / "store.tar").exists()


def test_a_cached_policy_store_that_does_not_match_its_sha256_is_not_used(tmp_path):
    run_hook = _policy_hooks(tmp_path, {"a.pp": b"module a"})
    run_hook("extra-data.d/20-policy-store-cache")
    (tmp_path / "mnt/tmp/kvm-build-speed-policy.tar").write_bytes(b"the store")
    run_hook("post-root.d/91-policy-store-cache")
    key = (tmp_path / "hooks/kvm-build-speed-policy/key").read_text().strip()
    (tmp_path / "cache" / f"{key}.tar").write_bytes(b"the store, damaged")
    run_hook = _policy_hooks(tmp_path, {"a.pp": b"module a"})
    run_hook("extra-data.d/20-policy-store-cache")
    assert not (tmp_path / "hooks/kvm-build-speed-policy/store.tar").exists()


def test_the_policy_store_cache_keeps_the_four_most_recently_used(tmp_path):
    for index in range(6):
        run_hook = _policy_hooks(tmp_path, {"a.pp": f"version {index}".encode()})
        run_hook("extra-data.d/20-policy-store-cache")
        (tmp_path / "mnt/tmp/kvm-build-speed-policy.tar").write_bytes(f"store {index}".encode())
        run_hook("post-root.d/91-policy-store-cache")
        time.sleep(0.01)  # distinct mtimes
    stores = sorted((tmp_path / "cache").glob("*.tar"))
    assert len(stores) == 4
    assert sorted(p.read_text() for p in stores) == [f"store {index}" for index in range(2, 6)]
    assert len(list((tmp_path / "cache").glob("*.sha256"))) == 4


@pytest.mark.parametrize("saving", ["", "1"])
def test_the_unpack_hook_unpacks_the_layer_only_in_a_build_that_starts_from_one(tmp_path, saving):
    cache, target = tmp_path / "cache", tmp_path / "mnt"
    (tmp_path / "tree/etc").mkdir(parents=True)
    (tmp_path / "tree/etc/hostname").write_text("layer\n")
    cache.mkdir()
    target.mkdir()
    subprocess.run(["tar", "--create", "--file", cache / "layer.tar", "--directory", tmp_path / "tree", "."],
                   check=True)
    env = {"PATH": os.environ["PATH"], "TARGET_ROOT": str(target), "DIB_IMAGE_CACHE": str(cache),
           "DIB_PACKAGE_LAYER_SAVE": saving}
    subprocess.run([ELEMENT / "root.d/07-package-layer-unpack"], env=env, check=True)
    assert (target / "etc/hostname").exists() is (saving == "")
