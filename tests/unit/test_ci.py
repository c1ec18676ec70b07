"""The CI example a user copies (examples/ci/github-actions.yml). What `inv ci` runs is
tested in test_workflow.py."""

import yaml

from pipeline.paths import ROOT


def _example_steps() -> list[dict]:
    workflow = yaml.safe_load((ROOT / "examples/ci/github-actions.yml").read_text())
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_example_passes_secrets_and_expressions_through_env_never_into_scripts():
    steps = _example_steps()
    scripts = [step["run"] for step in steps if "run" in step]
    assert scripts and not [script for script in scripts if "${{" in script]
    passed = " ".join(str(value) for step in steps for value in step.get("env", {}).values())
    for secret in ("IMAGES_SIGNING_KEY", "IMAGES_SIGNING_KEY_ID", "IMAGES_SSH_KEY", "IMAGES_KNOWN_HOSTS"):
        assert f"secrets.{secret} " in passed + " "


def test_example_uploads_logs_but_never_a_boot_tests_directory():
    uploads = [step for step in _example_steps() if step.get("uses", "").startswith("actions/upload-artifact")]
    paths = [path for step in uploads for path in step["with"]["path"].split()]
    assert paths and "build/*/logs/" in paths
    # A boot test's directory (build/NAME/boot-FW/) held the guest's SSH private key: only its logs go.
    assert all(not path.rstrip("/").endswith(("boot-*", "build/*")) for path in paths)
    assert all(path.endswith((".log", ".json", "logs/")) for path in paths)


def test_example_matrix_names_an_image_of_images_toml_for_every_image_and_release():
    from pipeline import spec as specs
    from pipeline.paths import SPEC_FILE

    job = yaml.safe_load((ROOT / "examples/ci/github-actions.yml").read_text())["jobs"]["images"]
    matrix = job["strategy"]["matrix"]
    # The job's IMAGE expression: trixie's images (the default release) keep the plain name, others get -RELEASE.
    assert job["env"]["IMAGE"] == ("${{ matrix.release == 'trixie' && matrix.image || "
                                   "format('{0}-{1}', matrix.image, matrix.release) }}")
    known = specs.load(SPEC_FILE).images
    for image in matrix["image"]:
        for release in matrix["release"]:
            name = image if release == "trixie" else f"{image}-{release}"
            assert known[name].release == release, name
    assert set(matrix["release"]) == set(specs.DEBIAN_RELEASES)
