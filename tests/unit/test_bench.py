"""The benchmark's summary: medians over runs, both build ratios, the image's release."""

from pipeline import bench
from pipeline import spec as specs


def _run(build_s: float, dib_alone_s: float, plain_dib_s: float) -> dict:
    return {"stages_s": {"tree": build_s - 20, "relabel": 5.0}, "build_s": build_s, "dib_alone_s": dib_alone_s,
            "plain_dib_s": plain_dib_s, "qcow2_bytes": 160_000_000, "check_passed": True}


def test_the_summary_names_the_release_and_takes_medians_of_the_runs(capsys):
    catalog = specs.load()
    for name, release in (("guest-image", "trixie"), ("guest-image-bookworm", "bookworm")):
        summary = bench.summarize(catalog.get(name), [_run(200, 150, 160), _run(190, 140, 150), _run(300, 100, 100)])
        assert (summary["image"], summary["release"], summary["runs"]) == (name, release, 3)
        assert summary["median"]["build_s"] == 200 and summary["median_stages_s"]["tree"] == 180
        assert "check_passed" not in summary["median"]  # a verdict, not a figure
        assert (summary["ratio_build_to_dib_alone"], summary["ratio_build_to_plain_dib"]) == (1.43, 1.33)
        assert "check_s" not in summary["median"] and "all_checks_and_boot_tests_passed" not in summary
