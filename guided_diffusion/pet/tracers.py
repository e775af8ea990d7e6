"""Tracer uptake tables for the procedural phantoms.

Every value is a typical SUV (g/mL) of a normal organ in a whole-body scan ~60 min after
injection, taken from published normal-biodistribution ranges (FDG: EANM guideline and
reference-liver studies; PSMA-11, DOTATATE, FAPI-04: normal-organ SUVmean tables of the
first clinical series). Each entry is ``(typical SUV, relative spread)``; a subject draws
``typical * exp(N(0, spread))`` so organs vary between subjects the way they do between
patients (myocardial FDG and bladder filling vary most).

Organ names are the keys of :data:`guided_diffusion.pet.phantoms.ORGAN_LABELS`. The organs of the
brain, dead-leaves and detailed whole-body anatomies sit in a second table, ``extra_uptake``,
drawn after the first (``draw_uptake(rng, extra=True)``), so a whole-body subject draws the same
organ values with or without them; vessels carry the blood pool's value (:data:`SAME_UPTAKE`).
"""

from dataclasses import dataclass, field

import numpy as np

# Linear attenuation coefficients at 511 keV in 1/mm (ICRU-44 based values used by
# PET attenuation maps: water 0.0096, soft tissue ~0.0099, fat 0.0086, lung ~0.003,
# trabecular bone ~0.0125, cortical bone ~0.0165).
ATTENUATION_PER_MM = {
    "background": 0.0,
    "fat": 0.0086,
    "muscle": 0.0099,
    "bone": 0.0165,
    "spine": 0.0125,
    "brain_gm": 0.0097,
    "brain_wm": 0.0097,
    "cerebellum": 0.0097,
    "salivary": 0.0098,
    "lung": 0.0030,
    "myocardium": 0.0099,
    "blood_pool": 0.0100,
    "liver": 0.0100,
    "spleen": 0.0100,
    "stomach": 0.0096,
    "bowel": 0.0096,
    "kidney_cortex": 0.0099,
    "kidney_medulla": 0.0098,
    "bladder": 0.0096,
    "csf": 0.0096,
    "brainstem": 0.0097,
    "vessel": 0.0100,
    "lymph_node": 0.0099,
    "cyst": 0.0096,
    "structure": 0.0099,
}
LESION_ATTENUATION_PER_MM = 0.0099  # tumour tissue ~ soft tissue

# Organs whose uptake is that of another organ of the same subject.
SAME_UPTAKE = {"vessel": "blood_pool"}


@dataclass(frozen=True)
class Tracer:
    """Normal-organ uptake table of one radiotracer.

    uptake: organ name -> (typical SUV, relative log-normal spread between subjects).
    lesion_suv: (low, high) range of lesion SUVs, drawn log-uniformly.
    lesion_sites: lesion location -> relative frequency (lung, liver, bone, lymph_node).
    half_life_min: physical half-life of the radionuclide in minutes.
    extra_uptake: like ``uptake``, for the organs of the brain, dead-leaves and detailed
        whole-body anatomies (CSF, brainstem, normal lymph nodes, cysts, dead-leaves structures:
        the median SUV of their shapes).
    """

    name: str
    uptake: dict
    lesion_suv: tuple
    lesion_sites: dict
    half_life_min: float
    extra_uptake: dict = field(default_factory=dict)

    def draw_uptake(self, rng, extra=False):
        """Per-subject organ SUVs: typical value times a log-normal factor (dict name -> SUV);
        with ``extra`` also the organs of ``extra_uptake`` and :data:`SAME_UPTAKE`."""
        table = {**self.uptake, **self.extra_uptake} if extra else self.uptake
        values = {
            organ: float(typical * np.exp(rng.normal(0.0, spread)))
            for organ, (typical, spread) in table.items()
        }
        if extra:
            values.update({organ: values[source] for organ, source in SAME_UPTAKE.items()})
        return values


F18_HALF_LIFE_MIN = 109.77
GA68_HALF_LIFE_MIN = 67.71

# The same moderate spread for most organs; large spreads are stated explicitly.
_S = 0.12

TRACERS = {
    "FDG": Tracer(
        name="FDG",
        uptake={
            "fat": (0.35, _S), "muscle": (0.7, _S), "bone": (0.6, _S), "spine": (1.6, _S),
            "brain_gm": (9.0, 0.15), "brain_wm": (3.0, _S), "cerebellum": (6.5, 0.15),
            "salivary": (1.8, 0.2), "lung": (0.5, _S), "myocardium": (3.5, 0.6),
            "blood_pool": (1.8, _S), "liver": (2.5, _S), "spleen": (2.0, _S),
            "stomach": (2.0, 0.2), "bowel": (1.8, 0.25), "kidney_cortex": (2.8, 0.15),
            "kidney_medulla": (6.0, 0.4), "bladder": (15.0, 0.45),
        },
        lesion_suv=(4.0, 15.0),
        lesion_sites={"lung": 0.3, "liver": 0.25, "bone": 0.15, "lymph_node": 0.3},
        half_life_min=F18_HALF_LIFE_MIN,
        extra_uptake={
            "csf": (0.1, 0.2), "brainstem": (5.0, 0.15), "lymph_node": (1.0, 0.25), "cyst": (0.0, 0.0),
            "structure": (2.0, 0.2),
        },
    ),
    "PSMA": Tracer(  # 68Ga-PSMA-11
        name="PSMA",
        uptake={
            "fat": (0.2, _S), "muscle": (0.5, _S), "bone": (0.3, _S), "spine": (1.0, _S),
            "brain_gm": (0.2, _S), "brain_wm": (0.1, _S), "cerebellum": (0.2, _S),
            "salivary": (15.0, 0.25), "lung": (0.4, _S), "myocardium": (1.0, _S),
            "blood_pool": (1.2, _S), "liver": (6.0, 0.2), "spleen": (5.0, 0.25),
            "stomach": (1.5, 0.2), "bowel": (3.0, 0.3), "kidney_cortex": (35.0, 0.25),
            "kidney_medulla": (20.0, 0.3), "bladder": (30.0, 0.5),
        },
        lesion_suv=(5.0, 30.0),
        lesion_sites={"lung": 0.05, "liver": 0.1, "bone": 0.4, "lymph_node": 0.45},
        half_life_min=GA68_HALF_LIFE_MIN,
        extra_uptake={
            "csf": (0.05, 0.2), "brainstem": (0.15, _S), "lymph_node": (0.8, 0.3), "cyst": (0.0, 0.0),
            "structure": (1.5, 0.2),
        },
    ),
    "DOTATATE": Tracer(  # 68Ga-DOTATATE
        name="DOTATATE",
        uptake={
            "fat": (0.2, _S), "muscle": (0.6, _S), "bone": (0.5, _S), "spine": (1.2, _S),
            "brain_gm": (0.1, _S), "brain_wm": (0.08, _S), "cerebellum": (0.1, _S),
            "salivary": (3.0, 0.25), "lung": (0.4, _S), "myocardium": (0.8, _S),
            "blood_pool": (1.2, _S), "liver": (8.0, 0.25), "spleen": (22.0, 0.3),
            "stomach": (3.0, 0.3), "bowel": (2.5, 0.3), "kidney_cortex": (15.0, 0.25),
            "kidney_medulla": (10.0, 0.3), "bladder": (20.0, 0.5),
        },
        lesion_suv=(10.0, 40.0),
        lesion_sites={"lung": 0.05, "liver": 0.45, "bone": 0.25, "lymph_node": 0.25},
        half_life_min=GA68_HALF_LIFE_MIN,
        extra_uptake={
            "csf": (0.05, 0.2), "brainstem": (0.08, _S), "lymph_node": (0.7, 0.3), "cyst": (0.0, 0.0),
            "structure": (1.5, 0.2),
        },
    ),
    "FAPI": Tracer(  # 68Ga-FAPI-04
        name="FAPI",
        uptake={
            "fat": (0.3, _S), "muscle": (1.1, _S), "bone": (0.8, _S), "spine": (1.0, _S),
            "brain_gm": (0.2, _S), "brain_wm": (0.1, _S), "cerebellum": (0.2, _S),
            "salivary": (2.0, 0.2), "lung": (0.6, _S), "myocardium": (1.3, _S),
            "blood_pool": (1.6, _S), "liver": (1.2, _S), "spleen": (1.2, _S),
            "stomach": (1.5, 0.2), "bowel": (1.5, 0.25), "kidney_cortex": (2.5, 0.2),
            "kidney_medulla": (5.0, 0.4), "bladder": (12.0, 0.5),
        },
        lesion_suv=(6.0, 15.0),
        lesion_sites={"lung": 0.25, "liver": 0.2, "bone": 0.2, "lymph_node": 0.35},
        half_life_min=GA68_HALF_LIFE_MIN,
        extra_uptake={
            "csf": (0.05, 0.2), "brainstem": (0.15, _S), "lymph_node": (1.0, 0.25), "cyst": (0.0, 0.0),
            "structure": (1.5, 0.2),
        },
    ),
}


def get_tracer(name):
    """The :class:`Tracer` called ``name`` (case-insensitive); ValueError names the choices."""
    key = str(name).upper()
    if key not in TRACERS:
        raise ValueError(f"unknown tracer {name!r}; choose one of {sorted(TRACERS)}")
    return TRACERS[key]
