"""Documentation that is generated stays true."""

from pathlib import Path

from shardtune.config_docs import render

REPO = Path(__file__).resolve().parents[1]


def test_config_reference_is_up_to_date():
    assert (REPO / "docs/config.md").read_text() == render(), "run: python -m shardtune.config_docs > docs/config.md"


def test_readme_links_resolve():
    import re

    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (REPO / target).exists(), f"README links to missing {target}"
