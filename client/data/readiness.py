"""Whether a site's data can train at all: what ``python -m client join`` checks first.

A site that joins without usable data fails every phase of every round and only shows the
coordinator a count of ``missing_file`` codes; these checks name the cause on the site's own
terminal before it connects. :func:`missing_data_sources` needs no decoding (it runs even
with ``join --no-prepare``); :func:`readiness_problems` judges a loaded :class:`SiteData`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from client.config import DataFormat, SiteConfig
from client.data.reasons import Reason

if TYPE_CHECKING:
    from client.data.site import SiteData

__all__ = ["missing_data_sources", "readiness_problems"]

#: The folder format's sub-folder of masks (not a class).
_MASK_FOLDER = "masks"


def missing_data_sources(config: SiteConfig) -> list[str]:
    """The configured data paths that do not exist, each named with its config field.

    Returns
    -------
    list[str]
        One line per missing path, e.g. ``"missing data root: data.root /srv/x is not a
        folder"``; empty when every configured path exists.
    """
    data = config.data
    problems = []
    if data.root is not None and not Path(data.root).is_dir():
        problems.append(f"missing data root: data.root {data.root} is not a folder")
    if data.labels_csv is not None and not Path(data.labels_csv).is_file():
        problems.append(f"missing labels file: data.labels_csv {data.labels_csv} does not exist")
    if data.npz is not None and not Path(data.npz).is_file():
        problems.append(f"missing archive: data.npz {data.npz} does not exist")
    return problems


def readiness_problems(config: SiteConfig, data: SiteData) -> list[str]:
    """Why the loaded site data cannot take part in a federation (empty when it can).

    Checks the train and validation splits (:meth:`SiteData.problems`) and labels outside
    the class list: rows of labels.csv or of a MedMNIST archive whose label is neither a
    class name nor a class index (skipped as ``bad_label``), and, for the folder format,
    class folders that ``data.class_names`` does not list (their images would be ignored).
    """
    problems = list(data.problems())
    bad_labels = data.quarantine_counts.get(Reason.BAD_LABEL, 0)
    if bad_labels:
        problems.append(
            f"{bad_labels} image(s) have labels outside the class list "
            f"data.class_names {config.data.class_names} (reason bad_label; see "
            f"{data.quarantine_report})"
        )
    if config.data.format is DataFormat.FOLDER and config.data.root is not None:
        unknown = sorted(
            path.name
            for path in Path(config.data.root).iterdir()
            if path.is_dir()
            and not path.name.startswith(".")
            and path.name != _MASK_FOLDER
            and path.name not in config.data.class_names
        )
        if unknown:
            problems.append(
                f"class folder(s) {unknown} under data.root {config.data.root} are outside "
                f"the class list data.class_names {config.data.class_names}"
            )
    return problems
