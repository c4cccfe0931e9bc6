"""The README's Results table says what the shipped ``results/<preset>/results.json`` files say.

``tools/results_table.py --write README.md`` generates the table after each ``tools/publish_result.py``;
these tests catch a table not regenerated since (a row left behind when a result is republished, a
result without a row or a row without a result) and check each row against the JSON on their own.
"""

from __future__ import annotations

import json
import re

import pytest
from repo_scripts import ROOT, load_script

RESULTS = ROOT / "results"
PUBLISHED = sorted(path.parent.name for path in RESULTS.glob("*/results.json"))


def _results_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Results\n(.*?)(?=^## )", text, flags=re.DOTALL | re.MULTILINE)
    assert match, "README.md has no '## Results' section"
    return match.group(1)


def _rows() -> dict[str, list[str]]:
    """Table rows of the Results section by preset name (a trailing footnote mark dropped)."""
    rows = {}
    for line in _results_section().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([\w.-]+)`(?: \*)?", cells[0]) if line.startswith("| `") else None
        if name:
            rows[name.group(1)] = cells
    return rows


def _integer(text: str) -> int:
    return int(text.replace(",", ""))


def _seconds(text: str) -> float:
    """'7 h 14 min', '11 min 46 s', '9 h 45 min' -> seconds."""
    units = {"h": 3600, "min": 60, "s": 1}
    parts = re.findall(r"(\d+) (h|min|s)\b", text)
    assert parts, f"no duration in {text!r}"
    return sum(int(value) * units[unit] for value, unit in parts)


def test_every_published_result_has_a_row_and_every_row_a_result() -> None:
    assert PUBLISHED, "results/ holds no results.json"
    assert sorted(_rows()) == PUBLISHED


@pytest.mark.parametrize("preset", PUBLISHED)
def test_row_matches_results_json(preset: str) -> None:
    results = json.loads((RESULTS / preset / "results.json").read_text(encoding="utf-8"))
    config = json.loads((RESULTS / preset / "config.json").read_text(encoding="utf-8"))
    _, split, paper, ours, iterations, time, *_ = _rows()[preset]

    assert split == f"`{config['data']['split_scheme']}`"
    assert results["paper"].startswith(paper), (paper, results["paper"])
    accuracy = f"{100 * results['test_accuracy']:.2f} +/- {100 * results['test_ci95']:.2f}"
    assert ours.strip("*") == accuracy
    match = re.fullmatch(r"([\d,]+) / ([\d,]+) \(([\d,]+)\)", iterations)
    assert match, f"iterations cell {iterations!r} is not 'DONE / PLANNED (BEST)'"
    done, planned, best = match.groups()
    assert (_integer(done), _integer(planned), _integer(best)) == (
        results["iterations"], results["iterations_planned"], results["checkpoint_iteration"])
    # Hours and minutes are rounded in the table; seconds are shown when under an hour.
    # (results.json files published before "training_wall_time_s" existed name it "wall_time_s".)
    trained_s = results.get("training_wall_time_s", results["wall_time_s"])
    tolerance = 60 if " h " in time else 1
    assert abs(_seconds(time) - trained_s) <= tolerance, (time, trained_s)


def test_bold_marks_exactly_the_results_that_meet_their_paper() -> None:
    for preset, cells in _rows().items():
        results = json.loads((RESULTS / preset / "results.json").read_text(encoding="utf-8"))
        paper = re.match(r"([\d.]+) \+/- ", results["paper"])
        meets = paper is not None and 100 * results["test_accuracy"] >= float(paper.group(1))
        assert cells[3].startswith("**") == meets, (preset, cells[3], results["paper"])


def test_the_readme_recheck_command_prints_the_shipped_number() -> None:
    match = re.search(r"metagrad eval results/([\w-]+) .*# ([\d.]+)% \+/- ([\d.]+)%", _results_section())
    assert match, "the Results section shows no `metagrad eval results/...` line with its number"
    preset, accuracy, ci = match.groups()
    results = json.loads((RESULTS / preset / "results.json").read_text(encoding="utf-8"))
    assert (accuracy, ci) == (f"{100 * results['test_accuracy']:.2f}", f"{100 * results['test_ci95']:.2f}")


def test_the_table_is_the_generators_output() -> None:
    generator = load_script("tools/results_table.py")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert generator.replace_table(readme, generator.table(RESULTS)) == readme, (
        "README.md's results table is stale: run python tools/results_table.py --write README.md")


def test_the_generator_replaces_only_what_lies_between_its_markers() -> None:
    generator = load_script("tools/results_table.py")
    text = f"intro\n{generator.BEGIN}\nold table\n{generator.END}\nafter\n"
    assert generator.replace_table(text, "| new |") == (
        f"intro\n{generator.BEGIN}\n| new |\n{generator.END}\nafter\n")
    with pytest.raises(SystemExit, match="no results table markers"):
        generator.replace_table("no markers here", "| new |")
