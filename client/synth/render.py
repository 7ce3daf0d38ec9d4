"""The SynthCXR image model: anatomy and lesions as attenuation, then one site's detector.

Coordinates are normalised to [-1, 1] across the detector (x: columns, left to right; y:
rows, top to bottom), so 64, 128 and 224 px show the same anatomy. Each image draws from
three random streams keyed by (seed, site, index): *geometry* (pose, organs, lesion places,
marker and collimation) does not depend on the image size, *texture* and *noise* do. The
noise stream is a fixed Gaussian field per image (the normal approximation of quantum
noise), so an image rendered with and without its lesions differs only around the lesions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from client.synth.font import render_text
from client.synth.params import Preset, SiteSpec

__all__ = ["Case", "Lesion", "Rendered", "public_marker_mask", "render_case"]

LesionType = Literal["none", "solid", "cavitary"]

_SUPERSAMPLE = 4
_MARKER_TEXT = "PORT"
_DISTRACTOR_RADIUS_MM = (1.5, 3.0)
#: Attenuation window mapped to display [0, 1] (before the per-patient shift).
_WINDOW = (0.0, 2.9)


@dataclass(frozen=True)
class Case:
    """What is decided about one image before it is drawn."""

    index: int
    label: int
    lesion_type: LesionType
    marker: bool
    distractor: bool


@dataclass(frozen=True)
class Lesion:
    """Where a disc-shaped finding was drawn, in pixels of the output image."""

    row: float
    col: float
    radius_px: float
    radius_mm: float


@dataclass(frozen=True)
class Rendered:
    """One finished image.

    Attributes
    ----------
    stored
        uint16 ``(S, S)`` pixel data as stored in DICOM (MONOCHROME1 already inverted).
    display
        float32 ``(S, S)`` in [0, 1], brighter = denser (standard chest display).
    masks
        bool ``(S, S)`` per drawn finding: ``lesion``, ``distractor``, ``marker``.
    lesion
        The nodule's geometry (``None`` for normal images).
    sex
        ``"F"`` or ``"M"`` (DICOM PatientSex).
    age
        Years.
    """

    stored: np.ndarray
    display: np.ndarray
    masks: dict[str, np.ndarray]
    lesion: Lesion | None
    sex: str
    age: int


def _sigmoid(value: np.ndarray, width: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(value / (2.0 * width)))


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient organ geometry in patient coordinates (normalised units)."""

    angle: float
    shift: tuple[float, float]
    body_width: float
    lung_x: float
    lung_y: float
    lung_width: float
    lung_height: float
    dome_top: tuple[float, float]
    dome_curvature: float
    mediastinum: float
    heart: tuple[float, float, float, float]
    spine_width: float
    rib_top: float
    rib_spacing: float
    clavicle_y: float
    soft_tissue: float
    lung_air: float
    exposure: float
    window_shift: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Anatomy:
        uniform = rng.uniform
        right_dome = uniform(0.32, 0.44)
        return cls(
            angle=math.radians(uniform(-4.0, 4.0)),
            shift=(uniform(-0.04, 0.04), uniform(-0.04, 0.04)),
            body_width=uniform(0.76, 0.92),
            lung_x=uniform(0.33, 0.39),
            lung_y=uniform(-0.10, 0.0),
            lung_width=uniform(0.24, 0.29),
            lung_height=uniform(0.56, 0.66),
            dome_top=(right_dome, right_dome + uniform(0.03, 0.07)),
            dome_curvature=uniform(0.8, 1.3),
            mediastinum=uniform(0.09, 0.13),
            heart=(
                uniform(0.08, 0.15),
                uniform(0.2, 0.3),
                uniform(0.22, 0.28),
                uniform(0.17, 0.23),
            ),
            spine_width=uniform(0.055, 0.075),
            rib_top=uniform(-0.64, -0.56),
            rib_spacing=uniform(0.11, 0.13),
            clavicle_y=uniform(-0.68, -0.6),
            soft_tissue=uniform(1.5, 1.9),
            lung_air=uniform(0.85, 1.05),
            exposure=uniform(0.75, 1.3),
            window_shift=uniform(-0.12, 0.12),
        )

    def to_patient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector coordinates → patient coordinates (undo the pose)."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.shift[0], y - self.shift[1]
        return cos * dx + sin * dy, -sin * dx + cos * dy

    def to_detector(self, u: float, v: float) -> tuple[float, float]:
        """Patient coordinates → detector coordinates (apply the pose)."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return cos * u - sin * v + self.shift[0], sin * u + cos * v + self.shift[1]

    def lungs(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Soft lung-field indicator in [0, 1] (both lungs, heart cut out)."""
        total = np.zeros(np.broadcast(u, v).shape)
        for side, dome in zip((-1.0, 1.0), self.dome_top, strict=True):
            centre = side * self.lung_x
            height = (v - self.lung_y) / self.lung_height
            width = self.lung_width * (1.0 + 0.22 * np.clip(height, -1.0, 1.0))
            ellipse = ((u - centre) / width) ** 2 + height**2
            lung = _sigmoid(1.0 - ellipse, 0.04)
            lung = lung * _sigmoid(side * u - self.mediastinum, 0.012)
            lung = lung * _sigmoid(dome + self.dome_curvature * (u - centre) ** 2 - v, 0.012)
            total = total + lung
        return total * (1.0 - self.heart_field(u, v))

    def heart_field(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        cx, cy, rx, ry = self.heart
        return _sigmoid(1.0 - ((u - cx) / rx) ** 2 - ((v - cy) / ry) ** 2, 0.08)

    def attenuation(self, u: np.ndarray, v: np.ndarray, texture: np.ndarray) -> np.ndarray:
        """Line-integral attenuation of the anatomy (no lesions)."""
        width = self.body_width * (1.0 - 0.4 * _sigmoid(-0.8 - v, 0.03))
        body = _sigmoid(width - np.abs(u), 0.015)
        thickness = np.sqrt(np.clip(1.0 - (u / width) ** 2, 0.0, 1.0))
        lungs = self.lungs(u, v)
        spine = _sigmoid(self.spine_width - np.abs(u), 0.01) * (1.0 + 0.12 * np.cos(v * 60.0))
        value = self.soft_tissue * thickness * body - self.lung_air * lungs
        value = value + 0.12 * self.heart_field(u, v) + 0.45 * spine * body
        value = value + 0.17 * self._ribs(u, v, width) + 0.3 * self._clavicles(u, v)
        return value + 0.07 * texture * lungs

    def _ribs(self, u: np.ndarray, v: np.ndarray, width: np.ndarray) -> np.ndarray:
        lateral = np.abs(u) - 0.07
        # Ribs are far apart compared with their width: only the nearest one matters.
        offset = v + 0.22 * lateral - 0.95 * lateral**2 - self.rib_top
        nearest = np.clip(np.rint(offset / self.rib_spacing), 0, 9)
        bands = np.exp(-(((offset - nearest * self.rib_spacing) / 0.028) ** 2))
        return bands * _sigmoid(lateral, 0.02) * _sigmoid(0.93 * width - np.abs(u), 0.02)

    def _clavicles(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        lateral = np.abs(u)
        along = np.clip((lateral - 0.08) / 0.47, 0.0, 1.0)
        centre = self.clavicle_y - 0.06 * along + 0.03 * np.sin(math.pi * along)
        inside = _sigmoid(lateral - 0.08, 0.01) * _sigmoid(0.55 - lateral, 0.01)
        return np.exp(-(((v - centre) / 0.03) ** 2)) * inside


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(centres, centres, indexing="xy")


@functools.lru_cache(maxsize=8)
def _pink_filter(size: int) -> np.ndarray:
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    frequency[0, 0] = np.inf
    return (frequency * size / 8.0) ** -1.5


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Zero-mean, unit-variance 1/f-like lung texture."""
    field = np.fft.irfft2(
        np.fft.rfft2(rng.standard_normal((size, size))) * _pink_filter(size), s=(size, size)
    )
    return (field - field.mean()) / (field.std() + 1e-12)


def _place_disc(
    rng: np.random.Generator,
    anatomy: _Anatomy,
    radius: float,
    avoid: tuple[float, float, float] | None = None,
) -> tuple[float, float]:
    """A disc centre (patient coordinates) wholly inside a lung and outside the heart."""
    angles = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
    ring_u, ring_v = np.cos(angles) * radius * 1.1, np.sin(angles) * radius * 1.1
    for _ in range(500):
        side = rng.choice((-1.0, 1.0))
        u = side * anatomy.lung_x + rng.uniform(-1.0, 1.0) * anatomy.lung_width
        v = anatomy.lung_y + rng.uniform(-1.0, 1.0) * anatomy.lung_height
        if avoid is not None and math.hypot(u - avoid[0], v - avoid[1]) < avoid[2] + radius * 1.5:
            continue
        points_u = np.append(ring_u + u, u)
        points_v = np.append(ring_v + v, v)
        if np.all(anatomy.lungs(points_u, points_v) > 0.5):
            return float(u), float(v)
    raise RuntimeError("no place for a lesion inside the lungs (radius too large?)")


def _draw_disc(
    canvas: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    peak: float,
    *,
    cavity: float = 0.0,
) -> np.ndarray:
    """Add a projected (optionally hollow) sphere to ``canvas``; returns its disc mask.

    The projected thickness of a sphere is proportional to sqrt(R² - r²); a cavity of
    radius ``cavity * R`` subtracts its own. Pixels are supersampled so that discs of a
    pixel or less keep their attenuation, and the mask holds the pixels at least half
    covered (at least the most covered one).
    """
    size = canvas.shape[0]
    x0, y0 = centre
    half = radius + 2.0 / size
    cols = np.arange(
        max(0, int((x0 - half + 1) / 2 * size)), min(size, int((x0 + half + 1) / 2 * size) + 1)
    )
    rows = np.arange(
        max(0, int((y0 - half + 1) / 2 * size)), min(size, int((y0 + half + 1) / 2 * size) + 1)
    )
    mask = np.zeros(canvas.shape, bool)
    if not len(cols) or not len(rows):
        return mask
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    sub_x = (cols[:, None] + offsets[None, :]).reshape(-1) / size * 2.0 - 1.0
    sub_y = (rows[:, None] + offsets[None, :]).reshape(-1) / size * 2.0 - 1.0
    r2 = (sub_x[None, :] - x0) ** 2 + (sub_y[:, None] - y0) ** 2
    thickness = np.sqrt(np.clip(1.0 - r2 / radius**2, 0.0, None))
    if cavity > 0:
        thickness -= cavity * np.sqrt(np.clip(1.0 - r2 / (cavity * radius) ** 2, 0.0, None))
    shape = (len(rows), _SUPERSAMPLE, len(cols), _SUPERSAMPLE)
    canvas[np.ix_(rows, cols)] += peak * thickness.reshape(shape).mean(axis=(1, 3))
    coverage = (r2 <= radius**2).reshape(shape).mean(axis=(1, 3))
    if coverage.max() < 0.5:
        coverage = coverage >= coverage.max()
    mask[np.ix_(rows, cols)] = coverage >= 0.5
    return mask


def _collimation(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Exposed field (left, top, right, bottom) in detector coordinates."""
    left, top, right, bottom = rng.uniform(0.04, 0.12, size=4)
    return -1.0 + left, -1.0 + top, 1.0 - right, 1.0 - bottom


def _marker(
    size: int, field: tuple[float, float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Burned-in text near the top-right corner of the exposed field."""
    # Cropped to the image: at thumbnail sizes the text is wider than the image.
    bitmap = render_text(_MARKER_TEXT, scale=max(1, round(size / 128)))[:size, :size]
    height, width = bitmap.shape
    inset_row, inset_col = rng.uniform(0.03, 0.06, size=2) * size
    top = int((field[1] + 1.0) / 2.0 * size + inset_row)
    left = int((field[2] + 1.0) / 2.0 * size - inset_col) - width
    mask = np.zeros((size, size), bool)
    top, left = min(max(top, 0), size - height), min(max(left, 0), size - width)
    mask[top : top + height, left : left + width] = bitmap
    return mask


def public_marker_mask(size: int) -> np.ndarray:
    """``(size, size)`` bool mask of the burned-in marker at a fixed, typical position.

    The same text and font as the shortcut site's marker, placed as on an image with a mid
    collimation and mid inset (no randomness): a site without markers pastes it onto its
    audit images, so that shortcut metrics compare across sites.
    """
    mid = -1.0 + 0.08
    return _marker(size, (mid, mid, -mid, -mid), np.random.default_rng(0))


def render_case(
    case: Case,
    site: SiteSpec,
    preset: Preset,
    *,
    size: int,
    seed: int,
    site_index: int,
    draw_findings: bool = True,
) -> Rendered:
    """Draw one image of ``site``.

    Parameters
    ----------
    case
        Label, lesion type and which optional findings this image has.
    site
        The site's acquisition model.
    preset
        Lesion size and contrast.
    size
        Output side in pixels.
    seed, site_index
        Together with ``case.index`` they key the image's random streams.
    draw_findings
        ``False`` renders the lesion-free counterfactual twin of the same image (same
        patient, pose and noise; nodule and granuloma left out, masks still returned).

    Returns
    -------
    Rendered
        Stored pixels, display image, masks and lesion geometry.
    """
    key = [seed, site_index, case.index]
    geometry_rng = np.random.default_rng([*key, 0])
    anatomy = _Anatomy.sample(geometry_rng)
    sex = "F" if geometry_rng.random() < 0.5 else "M"
    age = int(geometry_rng.integers(25, 86))
    x, y = _grid(size)
    u, v = anatomy.to_patient(x, y)
    attenuation = anatomy.attenuation(u, v, _texture(np.random.default_rng([*key, 1]), size))

    masks: dict[str, np.ndarray] = {}
    findings = np.zeros_like(attenuation)
    lesion = None
    half_fov = site.fov_mm / 2.0
    nodule = None
    if case.lesion_type != "none":
        low, high = site.lesion_radius_mm
        radius_mm = geometry_rng.uniform(low, high) * preset.radius_scale
        radius = radius_mm / half_fov
        contrast = preset.contrast * site.lesion_contrast * geometry_rng.uniform(0.85, 1.15)
        centre_u, centre_v = _place_disc(geometry_rng, anatomy, radius)
        nodule = (centre_u, centre_v, radius)
        centre = anatomy.to_detector(centre_u, centre_v)
        cavity = 0.6 if case.lesion_type == "cavitary" else 0.0
        masks["lesion"] = _draw_disc(findings, centre, radius, contrast, cavity=cavity)
        lesion = Lesion(
            row=(centre[1] + 1.0) / 2.0 * size - 0.5,
            col=(centre[0] + 1.0) / 2.0 * size - 0.5,
            radius_px=radius * size / 2.0,
            radius_mm=radius_mm,
        )
    if case.distractor:
        radius = geometry_rng.uniform(*_DISTRACTOR_RADIUS_MM) / half_fov
        place = _place_disc(geometry_rng, anatomy, radius, avoid=nodule)
        centre = anatomy.to_detector(*place)
        masks["distractor"] = _draw_disc(findings, centre, radius, preset.distractor_contrast)
    if draw_findings:
        attenuation = attenuation + findings

    field = _collimation(geometry_rng) if site.collimation else (-1.0, -1.0, 1.0, 1.0)
    if case.marker:
        masks["marker"] = _marker(size, field, geometry_rng)
    display = _acquire(attenuation, anatomy, site, field, size, np.random.default_rng([*key, 2]))
    if case.marker:
        display[masks["marker"]] = 1.0
    top = 2**site.bits_stored - 1
    stored = np.rint(display * top).astype(np.uint16)
    if site.photometric == "MONOCHROME1":
        stored = top - stored
    return Rendered(stored, display, masks, lesion, sex, age)


def _acquire(
    attenuation: np.ndarray,
    anatomy: _Anatomy,
    site: SiteSpec,
    field: tuple[float, float, float, float],
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Detector model: heel effect, collimation, quantum noise, blur, log, grid, window."""
    x, y = _grid(size)
    pixel_mm = site.fov_mm / size
    exposure = (1.0 - site.heel * y) * anatomy.exposure
    left, top, right, bottom = field
    if site.collimation:
        inside = _sigmoid(x - left, 0.004) * _sigmoid(right - x, 0.004)
        inside = inside * _sigmoid(y - top, 0.004) * _sigmoid(bottom - y, 0.004)
        exposure = exposure * (0.03 + 0.97 * inside)
    photons = site.dose * pixel_mm**2
    expected = photons * exposure * np.exp(-attenuation)
    counts = expected + np.sqrt(expected) * rng.standard_normal((size, size))
    sigma = site.blur_mm / pixel_mm
    if sigma > 0.05:
        counts = gaussian_filter(counts, sigma, mode="nearest")
    measured = -np.log(np.maximum(counts, 0.5) / photons)
    if site.grid_period_px is not None:
        phase = rng.uniform(0.0, site.grid_period_px)
        columns = np.arange(size)[None, :]
        measured = measured + site.grid_amplitude * np.cos(
            2 * math.pi * (columns + phase) / site.grid_period_px
        )
    low, high = _WINDOW[0] + anatomy.window_shift, _WINDOW[1] + anatomy.window_shift
    display = np.clip((measured - low) / (high - low), 0.0, 1.0) ** site.gamma
    return display.astype(np.float32)
