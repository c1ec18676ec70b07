"""`inv ci` with the pipeline's steps faked: order, skipping, and stopping at the first failure."""

import pytest
import yaml
from invoke import Context, Exit

import tasks
from pipeline import build, publish
from pipeline.artifacts import artifacts_for
from pipeline.errors import PipelineError
from pipeline.paths import ROOT
from pipeline.progress import Timings


def _image(pytest_args: list[str]) -> str:
    return next(arg for arg in pytest_args if arg.startswith("--image="))


@pytest.fixture
def steps(monkeypatch, tmp_path):
    done = []

    def fake_build(spec, output_dir, cache_dir, force=False):
        done.append(("build", spec.name))
        if spec.name in fail_build:
            raise PipelineError(f"{spec.name}: mirror unreachable")
        return build.BuildResult(artifacts_for(spec, output_dir), built=True, timings=Timings({"tree": 1.0}))

    fail_build: set[str] = set()
    monkeypatch.setattr(publish, "require_key", lambda key, home=None: done.append(("key", key)) or "FPR")
    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(tasks, "_run_check", lambda spec, out: done.append(("check", spec.name)))
    monkeypatch.setattr(tasks, "_pytest", lambda c, args, warn=False: done.append(("boot", _image(args))) or True)
    monkeypatch.setattr(publish, "publish", lambda directory, name, target, **kw: done.append(("publish", name))
                        or publish.Published(name, "20261125-00000000", str(target), True, ()))
    return done, fail_build


def test_every_image_is_built_checked_booted_and_published_in_order(steps, tmp_path):
    done, _ = steps
    tasks.ci(Context(), key="ops@example.org", output_dir=str(tmp_path))
    assert done == [("key", "ops@example.org"),
                    ("build", "host-image"), ("check", "host-image"), ("boot", "--image=host-image"),
                    ("publish", "host-image"),
                    ("build", "guest-image"), ("check", "guest-image"), ("boot", "--image=guest-image"),
                    ("publish", "guest-image"),
                    ("build", "installer")]  # a netboot image: nothing to check, boot or publish


def test_first_failure_stops_everything_after_it(steps, tmp_path):
    done, fail_build = steps
    fail_build.add("host-image")
    with pytest.raises(Exit, match="mirror unreachable"):
        tasks.ci(Context(), key="ops@example.org", output_dir=str(tmp_path))
    assert done == [("key", "ops@example.org"), ("build", "host-image")]


def test_failed_boot_test_is_not_published(steps, monkeypatch, tmp_path):
    done, _ = steps
    monkeypatch.setattr(tasks, "_pytest", lambda c, args, warn=False: False)
    with pytest.raises(Exit, match="boot test of host-image failed: not published"):
        tasks.ci(Context(), key="ops@example.org", output_dir=str(tmp_path))
    assert ("publish", "host-image") not in done


def test_missing_key_fails_before_any_build(monkeypatch, tmp_path):
    called = []
    monkeypatch.setattr(build, "build", lambda *a, **k: called.append(a))
    with pytest.raises(Exit, match="key"):
        tasks.ci(Context(), key=None, gnupg_home=str(tmp_path / "empty"), output_dir=str(tmp_path))
    assert called == []


# --- the CI example a user copies


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
