"""Where the project's own inputs live."""

from pathlib import Path

import diskimage_builder

ROOT = Path(__file__).resolve().parent.parent
ELEMENTS = ROOT / "elements"
PROFILES = ROOT / "profiles"
SPEC_FILE = ROOT / "images.toml"
DIB_ELEMENTS = Path(diskimage_builder.__file__).parent / "elements"
DEFAULT_OUTPUT = ROOT / "build"
