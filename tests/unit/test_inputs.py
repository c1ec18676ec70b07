"""The input hash, the package layer's key and what two builds' records say about each other."""

import dataclasses
import re
import shutil
import textwrap

import pytest

from pipeline import inputs, layer, manifest
from pipeline import spec as specs
from pipeline.errors import PipelineError
from pipeline.paths import ELEMENTS


def copy_of_elements(tmp_path):
    copy = tmp_path / "elements"
    shutil.copytree(ELEMENTS, copy)
    return copy


def with_element_dir(spec, directory):
    return dataclasses.replace(spec, element_dirs=(directory,))


def test_input_hash_is_stable_and_ignores_the_description():
    spec = specs.load().get("guest-image")
    assert inputs.input_hash(spec) == inputs.input_hash(dataclasses.replace(spec, description="other words"))


def test_input_hash_follows_spec_elements_and_profiles(tmp_path):
    spec = specs.load().get("guest-image")
    copy = copy_of_elements(tmp_path)
    before = inputs.input_hash(with_element_dir(spec, copy))
    assert before == inputs.input_hash(spec)  # the same contents elsewhere: the same hash
    assert inputs.input_hash(dataclasses.replace(spec, kernel_args=("quiet",))) != inputs.input_hash(spec)
    hook = copy / "kvm-base/post-install.d/60-lock-passwords"
    hook.write_text(hook.read_text() + "# changed\n")
    assert inputs.input_hash(with_element_dir(spec, copy)) != before


def test_layer_key_ignores_changes_after_the_installs(tmp_path):
    """A post-install hook changes the image but not the packages: the layer is reused."""
    spec = with_element_dir(specs.load().get("guest-image"), copy_of_elements(tmp_path))
    copy = spec.element_dirs[0]
    key = layer.key(spec, inputs.resolved_elements(spec))
    hook = copy / "kvm-base/post-install.d/60-lock-passwords"
    hook.write_text(hook.read_text() + "# changed\n")
    assert layer.key(spec, inputs.resolved_elements(spec)) == key
    late_install_hook = copy / "selinux-enforcing/install.d/05-selinux-policy-modules"
    late_install_hook.write_text(late_install_hook.read_text() + "# changed\n")
    assert layer.key(spec, inputs.resolved_elements(spec)) == key
    early_install_hook = copy / "kvm-build-speed/install.d/01-zz-initramfs-once"  # runs before the save
    early_install_hook.write_text(early_install_hook.read_text() + "# changed\n")
    assert layer.key(spec, inputs.resolved_elements(spec)) != key
    key = layer.key(spec, inputs.resolved_elements(spec))
    stub_command = copy / "kvm-build-speed/bin/kvm-build-speed-defer-semodule"  # pre-install.d runs it
    stub_command.write_text(stub_command.read_text() + "# changed\n")
    assert layer.key(spec, inputs.resolved_elements(spec)) != key
    key = layer.key(spec, inputs.resolved_elements(spec))
    packages = copy / "kvm-base/package-installs.yaml"
    packages.write_text(packages.read_text() + "htop:\n")
    assert layer.key(spec, inputs.resolved_elements(spec)) != key
    assert layer.key(dataclasses.replace(spec, packages=("vim",)), inputs.resolved_elements(spec)) != key


def test_every_build_gets_the_pipelines_own_elements():
    spec = specs.load().get("host-image")
    assert inputs.dib_elements(spec) == ["debian-minimal", "kvm-host", *inputs.PIPELINE_ELEMENTS]
    assert inputs.PIPELINE_ELEMENTS == ("kvm-package-layer", "kvm-private-dev", "kvm-build-speed")
    assert inputs.dib_elements(spec, pipeline_elements=False) == ["debian-minimal", "kvm-host"]
    assert set(inputs.PIPELINE_ELEMENTS) <= {e.name for e in inputs.resolved_elements(spec)}


def test_layer_prepare_starts_from_debootstraps_base(tmp_path):
    spec = specs.load().get("guest-image")
    package_layer = layer.layer_for(spec, tmp_path)
    package_layer.base.write_bytes(b"base")
    assert package_layer.prepare() is False  # no layer yet: this build saves one
    assert package_layer.tarball.read_bytes() == b"base"
    assert (package_layer.directory / "apt").resolve() == (tmp_path / "apt").resolve()
    package_layer.finish()  # the build saved nothing: still not complete
    assert not package_layer.complete
    package_layer.tarball.unlink()  # what the element's post-root.d hook leaves: the tree, an empty tarball
    package_layer.tarball.write_bytes(b"empty")
    package_layer.contents.write_bytes(b"layer")
    (package_layer.directory / layer.XATTRS).write_text("{}")
    package_layer.finish()
    assert package_layer.complete and package_layer.prepare() is True
    assert package_layer.base.read_bytes() == b"base"


def test_compare_reports_packages_and_files():
    files_a = {"/etc/a": ("f", "0644", "0:0", "1", "etc_t", "aa"), "/etc/b": ("f", "0644", "0:0", "1", "etc_t", "bb")}
    files_b = {"/etc/a": ("f", "0600", "0:0", "1", "etc_t", "aa"), "/etc/c": ("f", "0644", "0:0", "1", "etc_t", "cc")}
    diff = manifest.compare({"bash": "5.2", "vim": "9"}, {"bash": "5.3", "nano": "7"}, files_a, files_b)
    assert diff.packages_only_a == {"vim": "9"} and diff.packages_only_b == {"nano": "7"}
    assert diff.packages_changed == {"bash": ("5.2", "5.3")}
    assert (diff.files_only_a, diff.files_only_b) == (["/etc/b"], ["/etc/c"])
    assert diff.files_changed == {"/etc/a": ["mode"]}
    assert not diff.same_packages and not diff.same_file_list
    text = manifest.format_difference(diff, "A", "B")
    assert "bash: 5.2 -> 5.3" in text and "/etc/a: mode" in text


def test_file_list_round_trip(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("node\n")
    (tree / "etc/link").symlink_to("hostname")
    listing = tmp_path / "files.tsv"
    assert manifest.write_file_list(tree, listing) == 3
    files = manifest.read_file_list(listing)
    assert files["/etc/hostname"][0] == "f" and files["/etc/hostname"][3] == "5"
    assert files["/etc/link"][0] == "l" and files["/etc/link"][5] == "hostname"
    assert files["/etc"][0] == "d"


def test_a_file_list_row_with_missing_fields_is_refused(tmp_path):
    # A row cut short (a published version's list, edited or truncated) would compare fewer fields.
    listing = tmp_path / "files.tsv"
    listing.write_text(manifest.FILE_LIST_HEADER + "/etc\td\t0755\t0:0\t0\t-\t-\n/etc/hostname\tf\t0644\t0:0\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(listing))}: line 3: 4 fields, expected 7 \(path, "):
        manifest.read_file_list(listing)


DEP5 = textwrap.dedent("""\
    Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
    Upstream-Name: demo

    Files: *
    Copyright: 2020 Someone
    License: GPL-2+

    Files: lib/*
    Copyright: 2021 Someone Else
    License: BSD-3-clause
     The license's text.

    Files: debian/*
    Copyright: 2022 A Maintainer
    License: GPL-2+
    """)


def test_declared_licenses_from_machine_readable_copyright_files(tmp_path):
    doc = tmp_path / "usr/share/doc"
    for name in ("demo", "freeform", "nodoc"):
        (doc / name).mkdir(parents=True)
    (doc / "demo/copyright").write_text(DEP5)
    (doc / "freeform/copyright").write_text("This is demo, written by Someone.\n"
                                            "License: GPL, see /usr/share/common-licenses.\n")
    (doc / "demo-dev").symlink_to("demo")  # as Debian links a -dev package's doc directory
    (doc / "demo-abs").symlink_to("/usr/share/doc/demo")  # absolute: inside the image, not the build host
    (doc / "escapes").symlink_to("../../../../../../../etc")
    (doc / "loops").symlink_to("loops")
    names = ["demo", "demo-dev", "demo-abs", "freeform", "nodoc", "escapes", "loops", "absent"]
    assert manifest.declared_licenses(tmp_path, names) == {
        "demo": ["GPL-2+", "BSD-3-clause"], "demo-dev": ["GPL-2+", "BSD-3-clause"],
        "demo-abs": ["GPL-2+", "BSD-3-clause"]}


def test_the_layer_key_names_the_save_hook_that_exists():
    """The key covers install.d hooks named before layer.SAVE_HOOK: that must be the save's name."""
    assert (ELEMENTS / layer.ELEMENT / "install.d" / layer.SAVE_HOOK).is_file()
