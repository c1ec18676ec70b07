"""Where the project's own inputs live."""

import os
from pathlib import Path

import diskimage_builder

ROOT = Path(__file__).resolve().parent.parent
ELEMENTS = ROOT / "elements"
PROFILES = ROOT / "profiles"
SPEC_FILE = ROOT / "images.toml"
DIB_ELEMENTS = Path(diskimage_builder.__file__).parent / "elements"
DEFAULT_OUTPUT = ROOT / "build"
# DIB's download cache (debootstrap base, .debs), kept across builds.
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvm-image-pipeline"
# The live tests run on a booted image, in this order (the last checks for SELinux
# denials after all the others): `inv boot-test` and the benchmark run them.
BOOT_TESTS = tuple(str(ROOT / "tests" / "integration" / name)
                   for name in ("test_boot.py", "test_host.py", "test_login.py", "test_zz_final.py"))
