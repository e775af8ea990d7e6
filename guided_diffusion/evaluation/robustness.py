"""The out-of-distribution test matrix: how a denoiser holds up on data unlike its training data.

A *cell* is one combination of what varies between real scans: anatomy class, tracer,
reconstruction (algorithm, iterations, resolution modelling, post-filter), native voxel size and
dose. :func:`default_cells` varies one factor at a time around a reference cell (a training-like
scan) and marks the settings held out of the toolkit's training data (:data:`HELD_OUT`). Each
cell's volumes are simulated on the fly (:mod:`guided_diffusion.pet.acquisition`) from subjects
whose seeds no training set uses (:func:`subject_seed`): validation subjects tune the classical
baselines per cell (Gaussian FWHM, BM3D sigma), test subjects score every method. Models see the
volume at its native voxel size; the denoiser resamples it to the model's grid and back, as
``scripts/test.py`` does.

Per cell and method: PSNR / SSIM (UDPET conventions, inside the body: full dose > 0.05 SUV),
lesion SUVmean / SUVmax bias, mean over the test subjects; :func:`run_cell` returns them,
:func:`heat_map` draws the PSNR gain over the tuned Gaussian.
"""

import dataclasses
import math
import os
import time

import numpy as np

from ..pet import phantoms
from ..pet.acquisition import SCANNERS, ScanSettings, simulate_scan
from ..pet.filters import fwhm_to_sigma
from . import baselines, metrics
from .cases import body_mask
from .figures import save_figure
from .methods import DiffusionMethod, case_seeds
from .statistics import describe

ROBUSTNESS_SEED_TAG = 0x0D15EA5E
"""Mixed into every subject seed of the matrix, so no training set (seeded by make_dataset.py's
dataset seed and subject index) draws the same subjects."""

REFERENCE_SCAN = ScanSettings(iterations=2, subsets=8, psf_mm=4.5, post_filter_mm=0.0, voxel_mm=3.3)
"""The training-like reconstruction of the shipped demo data: OSEM 2x8 with PSF, 3.3 mm."""

HELD_OUT = ("mlem100_nopsf", "1.65")
"""Settings (:meth:`~guided_diffusion.pet.acquisition.ScanSettings.tags`) the toolkit's training
recipes keep out of training: ``make_dataset.py --randomise --hold_out mlem100_nopsf 1.65``."""

FOV_MM = {"whole_body": (330.0, 264.0, 529.0), "brain": (198.0, 231.0, 99.0),
          "dead_leaves": (264.0, 264.0, 99.0)}
"""Field of view (X, Y, Z mm) built per anatomy class: a body from the vertex down to the upper
abdomen (of which the bottom :data:`SLAB_MM` are simulated), a head, a random-structure block."""

SLAB_MM = 99.0
"""Axial extent simulated: for the body, its bottom slab (liver, kidneys, lung bases, lesions)."""

COUNTS_PER_MM = 4.0e5
"""Full-dose prompts per mm of axial field of view (the generator's default)."""

FWHM_GRID_MM = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
BM3D_FACTORS = (0.5, 1.0, 2.0)
"""BM3D sigma grid: multiples of the validation volumes' RMS error inside the body."""

MASK_SUV = 0.05

REFERENCE_ROWS = ("low_dose", "oracle")
"""Images scored beside the methods that are not methods (the input, the oracle bound's)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One test condition (a row of the matrix)."""

    anatomy: str = "whole_body"
    tracer: str = "FDG"
    scan: ScanSettings = REFERENCE_SCAN
    drf: float = 10.0
    factor: str = "reference"

    def label(self):
        return f"{self.anatomy}, {self.tracer}, {self.scan.label()}, DRF {self.drf:g}"

    def held_out(self):
        """Which of :data:`HELD_OUT` this cell uses (a reconstruction or voxel size never trained on)."""
        return [tag for tag in HELD_OUT if tag in self.scan.tags()]


def default_cells(quick=False):
    """The matrix: the reference cell, then one factor changed at a time."""
    ref = Cell()
    scan = REFERENCE_SCAN
    if quick:
        return [ref, Cell(scan=dataclasses.replace(scan, iterations=100, subsets=1, psf_mm=0.0),
                          factor="reconstruction"),
                Cell(anatomy="brain", factor="anatomy")]
    return [ref] + [
        Cell(scan=dataclasses.replace(scan, iterations=4, psf_mm=0.0), factor="reconstruction"),
        Cell(scan=dataclasses.replace(scan, iterations=100, subsets=1, psf_mm=0.0), factor="reconstruction"),
        Cell(scan=dataclasses.replace(scan, post_filter_mm=4.0), factor="reconstruction"),
    ] + [Cell(scan=dataclasses.replace(scan, voxel_mm=v), factor="voxel size") for v in (1.65, 2.0, 4.0)] + [
        Cell(tracer="PSMA", factor="tracer"),
    ] + [Cell(drf=d, factor="dose") for d in (4.0, 50.0)] + [
        Cell(anatomy="brain", factor="anatomy"), Cell(anatomy="dead_leaves", factor="anatomy"),
    ]


def subject_seed(role, index):
    """Phantom seed of the matrix's ``index``-th ``"val"`` or ``"test"`` subject."""
    return int(np.random.SeedSequence([ROBUSTNESS_SEED_TAG, ("val", "test").index(role), index])
               .generate_state(1)[0])


def simulate_case(cell, seed, fov_scale=1.0, oracle_draws=0):
    """One subject of ``cell``: low and full dose on the native grid, labels, mask, acquisition.

    :param fov_scale: shrink the field of view (``--quick``).
    :param oracle_draws: > 0 adds ``oracle``, the posterior mean of the full dose given the
        low-dose data and the true activity (:func:`~guided_diffusion.pet.acquisition.simulate_scan`).
    :return: a case dict (``low``, ``full``, ``organs``, ``lesions``, ``mask``, ``affine``,
        ``voxel_mm``, ``drf``, ``name``, ``path`` None, ``acquisition``: the simulated scan for
        BC-DPM's noise insertion).
    """
    x, y, z = FOV_MM[cell.anatomy]
    phantom = phantoms.make_phantom(seed, voxel_mm=cell.scan.voxel_mm, tracer=cell.tracer,
                                    fov_mm=(x * fov_scale, y * fov_scale, z), anatomy=cell.anatomy,
                                    detail=True, arms=False)
    phantom = bottom_slab(phantom, SLAB_MM * fov_scale)
    scan = simulate_scan(phantom, cell.scan, [cell.drf], seed, COUNTS_PER_MM, oracle_draws=oracle_draws)
    full, low = scan["full"], scan["low"][0]
    oracle = dict(oracle=scan["oracle"]) if oracle_draws else {}
    return dict(**oracle,
        low=low, full=full, organs=phantom.organ_labels, lesions=phantom.lesion_labels,
        mask=body_mask(full, MASK_SUV), affine=phantom.affine, voxel_mm=np.asarray(phantom.voxel_mm),
        drf=cell.drf, name=f"s{seed}", path=None,
        acquisition=known_acquisition(cell.scan, float(scan["prompts"][1])))


def validation_cases(drfs, n_val=1, fov_scale=1.0, log=None):
    """The reference cell's validation subjects (the ones that tune the baselines) at each of
    ``drfs``: ``n_val`` subjects per DRF, simulated one at a time (a generator), for tuning a
    model's settings on the matrix's kind of data without touching its test subjects."""
    for drf in drfs:
        cell = Cell(drf=float(drf), factor="dose")
        for k in range(n_val):
            if log:
                log(f"validation subject {k} of {cell.label()}")
            yield simulate_case(cell, subject_seed("val", k), fov_scale)


def known_acquisition(scan, low_dose_counts):
    """BC-DPM's acquisition model of a simulated scan (``resolve_acquisition``'s kwargs): its
    scanner preset, mode, view mashing and true resolution, the recorded low-dose prompts, and
    uniform randoms + scatter (as ``dataset_manifest.bcdpm_acquisition`` has it for files)."""
    entry = SCANNERS[scan.scanner]
    return dict(scanner=entry["preset"], mode=entry["mode"], view_mashing=entry["view_mashing"],
                psf_fwhm_mm=entry["psf_fwhm_mm"], total_counts=low_dose_counts,
                randoms_fraction=scan.randoms_fraction + scan.scatter_fraction)


def bottom_slab(phantom, depth_mm):
    """The phantom's bottom ``depth_mm`` (its first slices: the affine stays valid)."""
    n = max(1, int(round(depth_mm / float(phantom.voxel_mm[2]))))
    return dataclasses.replace(phantom, activity=phantom.activity[..., :n], mu=phantom.mu[..., :n],
                               organ_labels=phantom.organ_labels[..., :n],
                               lesion_labels=phantom.lesion_labels[..., :n])


def tune_baselines(val_cases, bm3d=True):
    """Gaussian FWHM (and BM3D sigma) with the best mean PSNR on the cell's validation cases."""
    voxel = tuple(val_cases[0]["voxel_mm"])
    lows, fulls, masks = ([c[k] for c in val_cases] for k in ("low", "full", "mask"))
    tuned = dict(gaussian=baselines.tune("gaussian", lows, fulls,
                                         [{"sigma_mm": fwhm_to_sigma(f)} for f in FWHM_GRID_MM],
                                         fixed_params={"voxel_mm": voxel}, mask_list=masks)[0])
    if bm3d:
        noise = float(np.sqrt(np.mean(np.concatenate([(lo - fu)[m] ** 2 for lo, fu, m in zip(lows, fulls, masks)]))))
        tuned["bm3d"] = baselines.tune("bm3d", lows, fulls, [{"sigma": f * noise} for f in BM3D_FACTORS],
                                       mask_list=masks)[0]
    return tuned


def score(case, image):
    """PSNR, SSIM and lesion biases of ``image`` against the case's full dose."""
    result = metrics.evaluate_pair(case["full"], image, labels=case["organs"], lesion_labels=case["lesions"],
                                   voxel_mm=case["voxel_mm"], mask=case["mask"])
    return dict(psnr=result["psnr"], ssim=result["ssim"],
                lesion_suvmean_bias_pct=result["summary"]["lesion_suvmean_bias_pct"],
                lesion_suvmax_bias_pct=result["summary"]["lesion_suvmax_bias_pct"])


def run_cell(cell, methods, *, n_val=1, n_test=2, seed=0, fov_scale=1.0, bm3d=True, members=None, oracle_draws=0,
             log=print):
    """Every method on one cell: ``{method: {metric: {"mean", "sd", "n"}}}`` plus the tuned
    baseline parameters and the seconds it took. ``members`` > 1 (``None``: each method's
    :meth:`~.methods.DiffusionMethod.ensemble_size`): each sampling method's ``members``-member
    image (:meth:`~.methods.DiffusionMethod.denoise`: the members' mean, or a posterior sampler's
    one-member estimate, then its members' mean is ``"METHOD (members' mean)"``) is scored as the
    method, its first member as ``"METHOD (1 sample)"``,
    and ``calibration[METHOD]`` holds the ensemble's std / RMSE and rank correlation with
    |error| (:func:`~.metrics.uncertainty_calibration`, inside the body). ``oracle_draws`` > 0
    scores the oracle (:func:`simulate_case`) as method ``"oracle"`` and adds ``psnr_bound``:
    the PSNR no denoiser can beat in expectation, the oracle's with its Monte Carlo error taken
    out (:func:`psnr_bound`)."""
    begin = time.perf_counter()
    val = [simulate_case(cell, subject_seed("val", k), fov_scale) for k in range(n_val)]
    tuned = tune_baselines(val, bm3d)
    del val
    rows, calibration = {}, {}
    for k in range(n_test):
        case = simulate_case(cell, subject_seed("test", k), fov_scale, oracle_draws)
        images = dict(low_dose=case["low"],
                      gaussian=baselines.gaussian(case["low"], voxel_mm=case["voxel_mm"], **tuned["gaussian"]))
        if bm3d:
            images["bm3d"] = baselines.bm3d(case["low"], **tuned["bm3d"])
        for name, method in methods.items():
            ensemble = 1 if method.deterministic else method.ensemble_size(members)
            images[name], info = method.denoise(case, case_seeds(seed, case, name, ensemble))
            if ensemble > 1:
                images[f"{name} (1 sample)"] = info["first"]
                if info["image"] != "members' mean":
                    images[f"{name} (members' mean)"] = info["members_mean"]
                calibration.setdefault(name, []).append(metrics.uncertainty_calibration(
                    case["full"], images[name], info["std"], case["mask"]))
        if oracle_draws:
            images["oracle"] = case["oracle"]
        for name, image in images.items():
            rows.setdefault(name, []).append(score(case, image))
    summary = {name: {key: describe([r[key] for r in scored]) for key in scored[0]}
               for name, scored in rows.items()}
    calibration = {name: {key: describe([r[key] for r in scored]) for key in scored[0]}
                   for name, scored in calibration.items()}
    seconds = time.perf_counter() - begin
    log(f"{cell.label()}: " + ", ".join(f"{m} {s['psnr']['mean']:.2f}" for m, s in summary.items())
        + f" dB PSNR ({seconds:.0f} s)")
    bound = dict(psnr_bound=psnr_bound(summary["oracle"]["psnr"]["mean"], oracle_draws)) if oracle_draws else {}
    return dict(cell=cell_record(cell), methods=summary, calibration=calibration, tuned=tuned, seconds=seconds,
                **bound)


def psnr_bound(oracle_psnr, draws):
    """The best PSNR (dB) a denoiser can reach in expectation, from the oracle's with ``draws``
    Monte Carlo draws: the oracle's squared error is ``(1 + 1 / draws)`` times the least one."""
    return float(oracle_psnr + 10.0 * math.log10(1.0 + 1.0 / draws))


def cell_record(cell):
    """A cell as JSON: its factors, label and held-out settings."""
    return dict(anatomy=cell.anatomy, tracer=cell.tracer, scan=cell.scan.to_dict(), drf=cell.drf,
                factor=cell.factor, label=cell.label(), held_out=cell.held_out())


def load_methods(model_paths, *, device, precision="auto", given=None):
    """``{label: DiffusionMethod}`` for the checkpoints (each in its default mode), label = file
    stem; ``given`` settings (e.g. ``timestep_respacing``, patching, ``members``) win over their
    sidecars'."""
    methods = {}
    for path in model_paths:
        methods[os.path.splitext(os.path.basename(path))[0]] = DiffusionMethod(
            path, "auto", dict(given or {}), device=device, precision=precision)
    return methods


def gains_over_gaussian(results, key="psnr"):
    """``(cell labels, method names, array cells x methods)`` of ``key`` minus the tuned Gaussian's."""
    names = [m for m in results[0]["methods"] if m != "gaussian"]
    labels = [r["cell"]["label"] + (" [held out]" if r["cell"]["held_out"] else "") for r in results]
    gains = np.array([[r["methods"][m][key]["mean"] - r["methods"]["gaussian"][key]["mean"] for m in names]
                      for r in results])
    return labels, names, gains


def heat_map(path, results):
    """PNG: PSNR gain over the tuned Gaussian per cell (rows) and method (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, names, gains = gains_over_gaussian(results)
    models = [j for j, name in enumerate(names) if name not in REFERENCE_ROWS] or list(range(len(names)))
    limit = max(1.0, float(np.nanmax(np.abs(gains[:, models]))))  # the models' range sets the colours
    fig, axis = plt.subplots(figsize=(5.0 + 1.1 * len(names), 1.2 + 0.42 * len(labels)))
    image = axis.imshow(gains, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(gains):
        axis.text(j, i, "n/a" if not math.isfinite(value) else f"{value:+.1f}", ha="center", va="center", fontsize=8,
                  color="white" if math.isfinite(value) and abs(value) > 0.6 * limit else "black")
    axis.set_xticks(range(len(names)), names, rotation=20)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(image, label="dB")
    axis.set_title("PSNR minus the per-cell tuned Gaussian (dB)", fontsize=10)
    save_figure(fig, path)


def markdown(results):
    """A table: one row per cell, PSNR (SSIM) per method, the held-out settings marked."""
    names = list(results[0]["methods"])
    lines = ["| cell | factor | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in results:
        cells = [f"{r['methods'][m]['psnr']['mean']:.2f} ({r['methods'][m]['ssim']['mean']:.3f})" for m in names]
        held = " **held out**" if r["cell"]["held_out"] else ""
        lines.append(f"| {r['cell']['label']}{held} | {r['cell']['factor']} | " + " | ".join(cells) + " |")
    if "psnr_bound" in results[0]:
        lines += ["", "The PSNR bound: the oracle's with its Monte Carlo error taken out (no denoiser beats it "
                  "in expectation), and how far each method is below it (dB)", "",
                  "| cell | bound | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for r in results:
            cells = [f"{r['methods'][m]['psnr']['mean'] - r['psnr_bound']:+.2f}" for m in names]
            lines.append(f"| {r['cell']['label']} | {r['psnr_bound']:.2f} | " + " | ".join(cells) + " |")
    calibrated = list(results[0].get("calibration") or {})
    if calibrated:
        lines += ["", "Ensembles: mean std / RMSE of the image (rank correlation of std with |error|)", "",
                  "| cell | " + " | ".join(calibrated) + " |", "|---" * (len(calibrated) + 1) + "|"]
        for r in results:
            cells = [f"{r['calibration'][m]['std_over_rmse']['mean']:.2f} "
                     f"({r['calibration'][m]['rank_correlation']['mean']:+.2f})" for m in calibrated]
            lines.append(f"| {r['cell']['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PREVIEW_SCANS = (REFERENCE_SCAN, dataclasses.replace(REFERENCE_SCAN, iterations=4, psf_mm=0.0),
                 dataclasses.replace(REFERENCE_SCAN, iterations=100, subsets=1, psf_mm=0.0),
                 dataclasses.replace(REFERENCE_SCAN, post_filter_mm=4.0))
"""The reconstructions of :func:`preview`: the reference, OSEM 4x8 and MLEM 100 without PSF,
and a 4 mm post-filter."""


def preview(path, anatomies=("whole_body", "brain", "dead_leaves"), scans=PREVIEW_SCANS, drf=10.0,
            fov_scale=1.0, subject=0):
    """PNG: the central axial slice of the ``subject``-th test subject per anatomy class (rows):
    its full dose, then its low dose (DRF ``drf``) under each reconstruction of ``scans``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(anatomies), len(scans) + 1, figsize=(2.6 * (len(scans) + 1), 2.6 * len(anatomies)),
                             squeeze=False)
    for row, anatomy in enumerate(anatomies):
        for col, scan in enumerate(scans):
            case = simulate_case(Cell(anatomy=anatomy, scan=scan, drf=drf), subject_seed("test", subject),
                                 fov_scale)
            middle = case["full"].shape[2] // 2
            vmax = float(np.percentile(case["full"], 99.5)) or 1.0
            images = ([("full dose", case["full"])] if col == 0 else []) + [(scan.label(), case["low"])]
            for offset, (title, volume) in enumerate(images):
                axis = axes[row, col + offset + (0 if col == 0 else 1)]
                axis.imshow(volume[:, :, middle].T, cmap="gray_r", vmin=0, vmax=vmax, origin="lower")
                axis.set_title(f"{anatomy}: {title}" if col + offset == 0 else title, fontsize=8)
                axis.axis("off")
    fig.suptitle(f"Test subjects of the matrix (FDG, DRF {drf:g}), central axial slice", fontsize=10)
    save_figure(fig, path)
