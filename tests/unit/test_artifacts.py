"""pipeline.artifacts: the one JSON reader, and the one rule for whether a verdict counts."""

import json

import pytest

from pipeline import build
from pipeline.artifacts import BOOT_TEST, CHECK, Artifacts, read_json
from pipeline.errors import PipelineError


@pytest.mark.parametrize("text, problem", [
    (None, "{path} is missing: run ./inv make-it"),
    ("{not json", "{path}: not valid JSON: Expecting property name enclosed in double quotes"),
    ("[1, 2]", "{path}: not a JSON object"),
])
def test_read_json_says_in_one_line_what_is_wrong_with_which_file(tmp_path, text, problem):
    path = tmp_path / "report.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PipelineError) as caught:
        read_json(path, "run ./inv make-it")
    assert str(caught.value).startswith(problem.format(path=path))
    assert "\n" not in str(caught.value)


@pytest.fixture
def art(tmp_path):
    art = Artifacts(tmp_path / "img", "img")
    art.directory.mkdir()
    art.info.write_text(json.dumps({"qcow2_sha256": "a" * 64, "sha256": {"img.qcow2": "a" * 64}}))
    return art


@pytest.mark.parametrize("verdict", [CHECK, BOOT_TEST])
def test_a_verdict_counts_only_when_it_passed_on_this_very_qcow2(art, verdict):
    report = art.directory / verdict.file
    assert art.verdict_problem(verdict) == (f"{report} is missing: the {verdict.what} has not run on this build: "
                                            f"run {verdict.command} img")
    report.write_text(json.dumps({"passed": False, "qcow2_sha256": "a" * 64}))
    assert art.verdict_problem(verdict) == f"{report}: the {verdict.what} did not pass"
    report.write_text(json.dumps({"passed": True, "qcow2_sha256": "b" * 64}))
    assert "was of another qcow2" in art.verdict_problem(verdict)
    assert not art.passed(verdict)
    report.write_text(json.dumps({"passed": True, "qcow2_sha256": "a" * 64}))
    assert art.verdict_problem(verdict) is None and art.passed(verdict)
    # publish compares with the sha256 it has just computed, not the recorded one
    assert "was of another qcow2" in art.verdict_problem(verdict, qcow2_sha256="c" * 64)


def test_recorded_sha256_is_validated_whole(art):
    assert art.recorded_sha256(art.qcow2) == "a" * 64
    art.info.write_text(json.dumps({"sha256": {"img.qcow2": "a" * 64 + "\n"}}))
    with pytest.raises(PipelineError, match=f"^{art.info} records no sha256 of img.qcow2: rebuild"):
        art.recorded_sha256(art.qcow2)


def test_a_corrupt_build_info_is_rebuilt_saying_why(art):
    """Not 'never built': the build says what is wrong with the file it found."""
    assert build.stale_reason(Artifacts(art.directory.parent / "other", "other"), "ab" * 32) == "never built"
    art.info.write_text("{truncated")
    assert build.stale_reason(art, "ab" * 32).startswith(f"{art.info}: not valid JSON")
