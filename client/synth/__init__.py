"""SynthCXR: the synthetic chest-radiograph federation (see DATA.md).

Examples
--------
>>> from client.synth import generate_synthcxr
>>> generate_synthcxr(Path("synth"), preset="easy", size=64, scale=0.25)  # doctest: +SKIP
"""

from client.synth.generate import GENERATOR_VERSION, generate_synthcxr, plan_site
from client.synth.params import PRESETS, Preset, SiteSpec, default_sites, load_site_specs
from client.synth.render import Case, Rendered, render_case

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "Case",
    "Preset",
    "Rendered",
    "SiteSpec",
    "default_sites",
    "generate_synthcxr",
    "load_site_specs",
    "plan_site",
    "render_case",
]
