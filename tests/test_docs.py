"""The documentation site: it builds strictly, its generated references cover the code, its
commands exist, and no user-facing file points outside the project."""

from __future__ import annotations

import html
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
#: Design notes that live outside the project: no user-facing file may send readers there.
OUTSIDE_FILES = ("METRICS.md", "SIC.md", "DATA.md", "ARCHITECTURE.md", "FLOWER.md", "STYLE.md")


def _mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(config),
            "-d",
            str(site_dir),
        ],
        cwd=config.parent,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = _mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_the_site_builds_with_every_page_in_the_nav(built_site: Path) -> None:
    for page in PAGES:
        relative = page.relative_to(DOCS).with_suffix(".html")
        assert (built_site / relative).is_file(), relative
    for name in ("how-to/site.html", "how-to/coordinator.html", "how-to/auditor.html"):
        assert (built_site / name).is_file()


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    """The project's validation settings turn a broken link into a failed strict build."""
    settings = (ROOT / "mkdocs.yml").read_text()
    validation = re.search(r"^validation:\n(?:  .*\n)+", settings, re.MULTILINE).group(0)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n## Here\n\n[fine](#here)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"site_name: t\nuse_directory_urls: false\n{validation}")
    assert _mkdocs_build(config, tmp_path / "ok").returncode == 0
    for broken in ("[gone](missing.md)", "[gone](index.md#nowhere)"):
        (tmp_path / "docs" / "index.md").write_text(f"# Home\n\n{broken}\n")
        result = _mkdocs_build(config, tmp_path / "broken")
        assert result.returncode != 0, broken
        assert "Aborted" in result.stdout + result.stderr


def test_the_metrics_reference_has_every_catalog_entry(built_site: Path) -> None:
    from sic_core.metric_catalog import METRICS, metric_anchor

    page = (built_site / "reference" / "metrics.html").read_text()
    missing = [m.key for m in METRICS if f'id="{metric_anchor(m.key)}"' not in page]
    assert missing == []
    assert [m.key for m in METRICS if html.escape(m.name, quote=False) not in page] == []


def test_the_configuration_references_list_every_field_and_key(built_site: Path) -> None:
    from pydantic import BaseModel

    from client.config import SiteConfig
    from server.settings import RunSettings

    site_page = (built_site / "reference" / "site-config.html").read_text()

    def fields(model: type[BaseModel], prefix: str = "") -> list[str]:
        names = []
        for name, field in model.model_fields.items():
            names.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                names.extend(fields(field.annotation, f"{prefix}{name}."))
        return names

    assert [f for f in fields(SiteConfig) if f"<code>{f}</code>" not in site_page] == []
    run_page = (built_site / "reference" / "run-config.html").read_text()
    keys = RunSettings.run_config_keys()
    assert [k for k in keys if f"<code>{k}</code>" not in run_page] == []


def _click_root(prog: str):
    import typer.main

    if prog == "server":
        from server.cli import app
    else:
        from client.cli import app
    return typer.main.get_command(app)


def _visible_commands(group, path=()):
    import click

    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _visible_commands(command, (*path, name))


@pytest.mark.parametrize("prog", ["server", "client"])
def test_the_cli_reference_lists_every_command_and_option(built_site: Path, prog: str) -> None:
    page = (built_site / "reference" / f"cli-{prog}.html").read_text()
    for path, command in _visible_commands(_click_root(prog)):
        assert f"python -m {prog} {' '.join(path)}" in page, path
        for param in command.params:
            if getattr(param, "hidden", False) or not param.opts[0].startswith("--"):
                continue
            assert f"<code>{param.opts[0]}</code>" in page, (path, param.opts[0])


def _documented_commands() -> list[tuple[Path, str]]:
    """Every ``python -m server|client ...`` written in the docs and the README."""
    found = []
    for path in [*PAGES, ROOT / "README.md"]:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued shell lines
        for line in re.findall(r"python -m (?:server|client)\b[^`\n#|]*", text):
            found.append((path, line.strip()))
    return found


def test_every_command_on_a_page_exists_with_its_options() -> None:
    import click

    roots = {prog: _click_root(prog) for prog in ("server", "client")}
    problems = []
    for path, line in _documented_commands():
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        command = roots[words[2]]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for word in words[3:]:
            if word.startswith("-"):
                option = word.split("=", 1)[0]
                visible = {
                    o
                    for p in command.params
                    if not getattr(p, "hidden", False)
                    for o in (*p.opts, *p.secondary_opts)
                }
                if option not in visible | {"--help"}:
                    state = "deprecated" if option in known else "unknown"
                    problems.append(f"{path.name}: {line!r}: {state} option {option}")
            elif isinstance(command, click.Group):
                if word not in command.commands:
                    if word.isupper() or word.endswith(("...", "COMMAND")):
                        break  # a placeholder such as `python -m server COMMAND`
                    problems.append(f"{path.name}: {line!r}: no command {word!r}")
                    break
                command = command.commands[word]
                known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    assert problems == []


def test_every_page_with_commands_says_how_they_are_tested() -> None:
    for page in PAGES:
        text = page.read_text()
        if "```bash" not in text:
            continue
        assert '!!! note "Tested"' in text or '!!! note "Not run by the tests"' in text, page
        for test_file in re.findall(r"`(tests/[\w/]+\.py)`", text):
            assert (ROOT / test_file).is_file(), (page.name, test_file)


def _failure_codes() -> set[str]:
    """Every fixed failure code the code defines (sites' replies, rejections, refusals)."""
    from client.data.reasons import Reason
    from sic_core.wire import ErrorReason

    codes = {str(r) for r in ErrorReason} | {str(r) for r in Reason}
    patterns = (
        r"Rejection\(\s*\"([a-z_]+)\"",
        r"reason\s*=\s*\"([a-z_]+)\"",
        r"reason=\"([a-z_]+)\"",
        r"APP_NOT_APPROVED = \"([a-z_]+)\"",
        r"\"(site_key_missing|site_not_registered)",
        r"reason = \"([a-z_]+):",
    )
    for source in [*ROOT.glob("server/**/*.py"), *ROOT.glob("client/**/*.py")]:
        text = source.read_text()
        for pattern in patterns:
            codes.update(re.findall(pattern, text))
    return codes - {"error"}


def test_every_failure_code_has_a_troubleshooting_entry() -> None:
    codes = _failure_codes()
    assert {"app_not_approved", "non_finite", "config_error", "tls_mismatch"} <= codes
    page = (DOCS / "troubleshooting.md").read_text()
    # Each code starts a code span: `non_finite` or `tls_mismatch: the SuperLink ...`.
    assert sorted(code for code in codes if not re.search(rf"`{code}\b", page)) == []


def test_no_user_facing_file_points_outside_the_project(built_site: Path) -> None:
    files = [
        ROOT / "README.md",
        ROOT / "mkdocs.yml",
        *PAGES,
        *ROOT.glob("site_configs/**/*"),
        *ROOT.glob("docker/*"),
        *built_site.rglob("*.html"),
    ]
    offending = [
        f"{path.relative_to(path.parents[1])}: {name}"
        for path in files
        if path.is_file()
        for name in OUTSIDE_FILES
        if name in path.read_text(errors="replace")
    ]
    assert offending == []


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for needed in ("make demo", "make test", "make docs", "docs/report_dashboard.png"):
        assert needed in readme, needed
