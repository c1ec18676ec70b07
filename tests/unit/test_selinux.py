"""Our policy modules compile with the host's checkmodule; a broken one is refused by file and line."""

import pytest

from pipeline import selinux
from pipeline.errors import PipelineError


def test_guest_closure_and_its_modules():
    assert selinux.element_closure(("kvm-guest",)) == ["kvm-base", "kvm-cloud-init", "kvm-guest",
                                                       "selinux-enforcing", "tuned-profile"]
    names = sorted(p.stem for p in selinux.module_sources(("kvm-guest",)))
    assert names == ["kvmpipe_base", "kvmpipe_cloudinit", "kvmpipe_tuned"]


def test_host_closure_adds_the_host_module():
    assert "kvm-host" in selinux.element_closure(("kvm-host",))
    names = sorted(p.stem for p in selinux.module_sources(("kvm-host",)))
    assert names == ["kvmpipe_base", "kvmpipe_cloudinit", "kvmpipe_host", "kvmpipe_tuned"]


@pytest.mark.parametrize("image_element", ["kvm-guest", "kvm-host"])
def test_our_modules_compile(tmp_path, image_element):
    sources = selinux.module_sources((image_element,))
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
