"""Our elements follow diskimage-builder's conventions: its own dib-lint passes on them, and no two
of them name a hook alike."""

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline import inputs
from pipeline import spec as specs
from pipeline.paths import ELEMENTS, ROOT


def test_dib_lint_passes_on_our_elements(tmp_path):
    venv_bin = Path(sys.executable).parent
    # dib-lint runs `python` and reads tox.ini from the current directory; it lints
    # ELEMENTS_DIR and LIB_DIR (DIB's own shell library: none here).
    result = subprocess.run([venv_bin / "dib-lint"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ELEMENTS_DIR": str(ELEMENTS.relative_to(ROOT)),
                                 "LIB_DIR": str(tmp_path), "PATH": f"{venv_bin}:{os.environ['PATH']}"})
    errors = [line for line in result.stdout.splitlines() if line.startswith(("ERROR", "WARNING"))]
    assert result.returncode == 0 and not errors, "\n".join(errors) or result.stdout[-2000:] + result.stderr
    assert "Checking elements/kvm-host/post-install.d/60-ovs-bridges" in result.stdout  # it did look


@pytest.mark.parametrize("image", [spec.name for spec in specs.load().images.values()])
def test_no_two_elements_of_an_image_name_a_hook_alike(image):
    """disk-image-create copies the hooks of a phase from every element of a build into one
    directory, and refuses a duplicated name only once the build has started."""
    owners = defaultdict(list)
    for element in inputs.resolved_elements(specs.load().get(image)):
        for hook in element.path.glob("*.d/*"):
            owners[(hook.parent.name, hook.name)].append(element.name)
    assert {key: names for key, names in owners.items() if len(names) > 1} == {}
