"""`plan` counts duplicates in what it reads (pipeline.run.estimate.Tally), and estimates distinct images."""

from __future__ import annotations

from pipeline.run.estimate import Tally

H1, H2, H3 = "11" * 32, "22" * 32, "33" * 32


def test_a_tally_counts_contents_seen_before_also_across_merged_parts():
    first, second = Tally(), Tally()
    for content in (H1, H2, H1, None):
        first.add_content(content)
    for content in (H2, H3, H3):
        second.add_content(content)
    assert (first.duplicates, second.duplicates) == (1, 1)
    first.merge(second)
    assert first.duplicates == 3 and len(first.contents) == 3  # H1 again, H3 again, H2 across the parts
    assert "contents" not in first.to_dict()  # the report counts, it does not list hashes


def test_plan_reports_the_duplicates_and_estimates_distinct_images_only(tmp_path):
    import shutil

    from pipeline.cli.plan import report
    from pipeline.cli.plan_report import format_plan
    from pipeline.config import build_config
    from pipeline.io.sources import check_input
    from pipeline.run.survey import Ticker, survey
    from pipeline.testing.samples import write_samples

    folder = tmp_path / "in"
    paths = write_samples(folder)
    for n, path in enumerate(paths[:3]):
        shutil.copyfile(path, folder / f"copy{n}_{path.name}")
    for dedup, expected in ((True, 10), (False, 13)):
        config = build_config({"input": {"uri": str(folder)}, "output": {"uri": str(tmp_path / "out")},
                               "model": {"path": "m"}, "modes": "dual", "compute": {"dedup": dedup}})
        layout = check_input(config.input)
        plan = report(config, layout, survey(config, layout.format, None, Ticker(quiet=True)), None, None)
        assert (plan.images, plan.duplicates, plan.duplicate_share) == (13, 3, round(3 / 13, 6))
        assert plan.estimate.images == expected  # with dedup on, each content is captioned once
        assert "duplicates  3 (23.08% of all images read" in format_plan(plan)
