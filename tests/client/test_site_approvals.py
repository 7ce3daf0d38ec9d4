"""``python -m client approve`` edits only the approved list: every comment, the key order,
the quoting and the indentation of a hospital's site YAML stay as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from client.config import load_site_config
from client.site_approvals import approve_app
from sic_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

FIRST = "sha256:" + "ab" * 32
SECOND = "sha256:" + "cd" * 32

#: What approving adds to a file that has no federation section yet.
ADDED_SECTION = ["federation:", "  approved_apps:", f"  - {FIRST}"]


def _approve(site: Path, app_hash: str) -> None:
    result = runner.invoke(app, ["approve", "--site", str(site), "--app-hash", app_hash])
    assert result.exit_code == 0, result.output


def test_approving_the_commented_example_changes_only_the_approved_list(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    shutil.copy(ROOT / "site_configs" / "example_dicom.yaml", site)
    before = site.read_text().splitlines()
    site.chmod(0o640)
    _approve(site, FIRST)
    after = site.read_text().splitlines()
    assert after[: len(before)] == before  # every comment, quote and blank line kept
    assert after[len(before) :] == ADDED_SECTION
    assert site.stat().st_mode & 0o777 == 0o640
    assert load_site_config(site).federation.approved_apps == [FIRST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]  # no temporary left


def test_a_second_hash_joins_an_existing_list_in_its_own_style(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    lines = [
        "# hospital P",
        "name: 'site_p'   # quoted on purpose",
        'state_dir: "state"',
        "data:",
        "    format: folder",
        '    root: "images"',
        "    class_names:",
        "    -   normal   # index 0",
        "    -   nodule",
        "federation:",
        "    # what our board approved",
        "    approved_apps:",
        f"    -   {FIRST}   # release 1",
        "reporting:",
        "    audit_set_size: 8",
    ]
    site.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").mkdir()
    _approve(site, SECOND)
    expected = [*lines[:13], f"    -   {SECOND}", *lines[13:]]
    assert site.read_text().splitlines() == expected
    assert load_site_config(site).federation.approved_apps == [FIRST, SECOND]


def test_an_approved_hash_leaves_the_file_untouched(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    shutil.copy(ROOT / "site_configs" / "example_dicom.yaml", site)
    approve_app(site, FIRST)
    text = site.read_text()
    assert approve_app(site, FIRST) is False
    assert site.read_text() == text


def test_an_invalid_config_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    text = "# broken on purpose\nname: site_x\ndata:\n  format: folder\n  rooot: images\n"
    site.write_text(text)
    with pytest.raises(ConfigError, match=r"rooot"):
        approve_app(site, FIRST)
    assert site.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]
