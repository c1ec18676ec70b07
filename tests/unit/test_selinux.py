"""Our policy modules compile with the host's checkmodule; a broken one is refused by file and line."""

import pytest

from pipeline import selinux
from pipeline.errors import PipelineError


def test_guest_closure_and_its_modules():
    assert selinux.element_closure(("kvm-guest",)) == ["kvm-base", "kvm-cloud-init", "kvm-guest",
                                                       "selinux-enforcing", "tuned-profile"]
    names = sorted(p.stem for p in selinux.module_sources(("kvm-guest",), "bookworm"))
    assert names == ["kvmpipe_base", "kvmpipe_base_bookworm", "kvmpipe_cloudinit", "kvmpipe_tuned",
                     "kvmpipe_tuned_bookworm"]
    trixie = sorted(p.stem for p in selinux.module_sources(("kvm-guest",), "trixie"))
    assert trixie == ["kvmpipe_base", "kvmpipe_base_trixie", "kvmpipe_cloudinit", "kvmpipe_cloudinit_trixie",
                      "kvmpipe_tuned", "kvmpipe_tuned_trixie"]


def test_host_closure_adds_the_host_module():
    assert "kvm-host" in selinux.element_closure(("kvm-host",))
    names = sorted(p.stem for p in selinux.module_sources(("kvm-host",), "bookworm"))
    assert names == ["kvmpipe_base", "kvmpipe_base_bookworm", "kvmpipe_cloudinit", "kvmpipe_host",
                     "kvmpipe_host_bookworm", "kvmpipe_tuned", "kvmpipe_tuned_bookworm"]


def test_a_release_directory_adds_modules_for_that_release_only(tmp_path):
    element = tmp_path / "my-element"
    (element / "selinux/trixie").mkdir(parents=True)
    (element / "selinux/every.te").write_text("module every 1.0;\n")
    (element / "selinux/trixie/only_trixie.te").write_text("module only_trixie 1.0;\n")
    def names(release):
        return [p.stem for p in selinux.module_sources(("my-element",), release, (tmp_path,))]
    assert names("bookworm") == ["every"]
    assert names("trixie") == ["every", "only_trixie"]


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
@pytest.mark.parametrize("image_element", ["kvm-guest", "kvm-host"])
def test_our_modules_compile(tmp_path, image_element, release):
    sources = selinux.module_sources((image_element,), release)
    packages = selinux.compile_modules(sources, tmp_path)
    assert [p.name for p in packages] == [f"{s.stem}.pp" for s in sources]
    assert all(p.stat().st_size > 0 for p in packages)


def test_module_that_does_not_compile_names_file_and_line(tmp_path):
    source = tmp_path / "broken.te"
    source.write_text("module broken 1.0;\nrequire { type init_t; }\nallow init_t no_such_t:file read;\n")
    with pytest.raises(PipelineError) as caught:
        selinux.compile_modules([source], tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{source}: SELinux policy module does not compile: ")
    assert "unknown type no_such_t" in message and "line 3" in message
    assert not (tmp_path / "out/broken.pp").exists()
