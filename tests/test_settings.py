"""The one settings resolver: flag > tuning-table row > checkpoint sidecar > default, tested
directly (no subprocess)."""

import argparse

import numpy as np
import pytest

from guided_diffusion import fp16_util
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments, settings
from guided_diffusion.sampling.fusion import difference_noise_index, noise_index

TABLE = [dict(noise_index=0.01, bc_lambda=0.2, bc_sigma_mm=3.0),
         dict(noise_index=0.25, bc_lambda=0.05, bc_sigma_mm=12.0)]


def metadata(cond="none", **sampling):
    return dict(cond=cond, flags=dict(timestep_respacing="100"), normalisation=dict(clip=16, scale=16),
                voxel_mm=4.0, sampling=sampling)


@pytest.fixture(scope="module")
def low():
    rng = np.random.default_rng(0)
    return rng.poisson(30.0 * np.full((24, 24, 24), 2.0)) / 30.0  # variance per SUV 1/30


def test_tuned_row_follows_the_nearest_noise_level_in_log_scale():
    assert settings.tuned_row(TABLE, 0.04)["bc_sigma_mm"] == 3.0  # 0.04 is nearer 0.01 than 0.25
    assert settings.tuned_row(TABLE, 0.06)["bc_sigma_mm"] == 12.0
    assert settings.tuned_row(TABLE, None) is None and settings.tuned_row([], 0.1) is None


def test_every_key_has_a_default_and_its_source():
    resolved = settings.resolve_settings({}, metadata("paired"), "paired")
    assert set(resolved.values) == set(settings.DEFAULTS)
    assert resolved["patch_overlap"] == 8 and resolved.sources["patch_overlap"] == "default"
    assert resolved["precision"] == "auto" and resolved["fusion_kappa"] == 0.0
    # the respacing falls back to the checkpoint's diffusion flags; DDIM follows it
    assert resolved["timestep_respacing"] == "100" and resolved.sources["timestep_respacing"] == "checkpoint"
    assert resolved["use_ddim"] is False
    assert resolved.noise_index is None


def test_flag_beats_sidecar_beats_default():
    meta = metadata("paired", timestep_respacing="ddim10", patch_z=32, patch_overlap=4, fusion_kappa=2.0)
    resolved = settings.resolve_settings(dict(patch_overlap=6, patch_z=None), meta, "paired")
    assert resolved["patch_overlap"] == 6 and resolved.sources["patch_overlap"] == "given"
    assert resolved["patch_z"] == 32 and resolved.sources["patch_z"] == "checkpoint"
    assert resolved["fusion_kappa"] == 2.0 and resolved["use_ddim"] is True
    # an explicit 0 is a value (fusion off), not "not given"
    assert settings.resolve_settings(dict(fusion_kappa=0.0), meta, "paired")["fusion_kappa"] == 0.0


def test_an_ensemble_takes_the_sidecars_ensemble_respacing():
    meta = metadata("paired", timestep_respacing="log2@999", ensemble_respacing="ddim10")
    one = settings.resolve_settings({}, meta, "paired")
    assert one["timestep_respacing"] == "log2@999" and one["use_ddim"] is False
    for members in (2, 4):
        many = settings.resolve_settings(dict(members=members), meta, "paired")
        assert many["timestep_respacing"] == "ddim10" and many.sources["timestep_respacing"] == settings.ENSEMBLE_SOURCE
        assert many["use_ddim"] is True
        # its image is the one-member estimate, which keeps the trained blend width
        assert many.estimate["timestep_respacing"] == "log2@999" and many.estimate.estimate is None
        wide = settings.resolve_settings(dict(members=members, x0_skip_sigma=0.05, patch_overlap=2), meta, "paired")
        assert wide["x0_skip_sigma"] == 0.05 and wide.estimate["x0_skip_sigma"] is None
        assert wide.estimate["patch_overlap"] == 2  # the other given settings hold for both
    assert one.estimate is None
    given = settings.resolve_settings(dict(members=4, timestep_respacing="log10"), meta, "paired")
    assert given["timestep_respacing"] == "log10" and given.sources["timestep_respacing"] == "given"
    assert given.estimate is None  # a given sampler: the image is the members' mean
    # without an ensemble recommendation an ensemble samples like one member
    plain = metadata("paired", timestep_respacing="ddim5")
    assert settings.resolve_settings(dict(members=4), plain, "paired")["timestep_respacing"] == "ddim5"


def test_one_member_takes_the_sidecars_flips_an_ensemble_its_ensemble_flips():
    meta = metadata("paired", timestep_respacing="log2@999", ensemble_respacing="log10", flips="zxy")
    one = settings.resolve_settings({}, meta, "paired")
    assert one["flips"] == "zxy" and one.sources["flips"] == "checkpoint"
    assert settings.sampling_settings(one, meta, "fp32").flips == "zxy"
    # posterior samples are not averaged over mirrored inputs unless the sidecar says so
    many = settings.resolve_settings(dict(members=4), meta, "paired")
    assert many["flips"] == "" and many.sources["flips"] == "default"
    meta["sampling"]["ensemble_flips"] = "x"
    assert settings.resolve_settings(dict(members=4), meta, "paired")["flips"] == "x"
    assert settings.resolve_settings(dict(flips="y"), meta, "paired")["flips"] == "y"
    assert settings.resolve_settings({}, metadata("paired"), "paired")["flips"] == ""
    with pytest.raises(ValueError, match="flips must name distinct axes"):
        settings.check_settings(settings.resolve_settings(dict(flips="xq"), meta, "paired"), 10)
    # --flips none is a given value (no flips), not "not given"
    parser = argparse.ArgumentParser()
    arguments.add_patching_arguments(parser)
    given = arguments.given_settings(parser.parse_args(["--flips", "none"]))
    assert given["flips"] == "" and settings.resolve_settings(given, meta, "paired")["flips"] == ""
    assert arguments.given_settings(parser.parse_args(["--flips", "xy"]))["flips"] == "xy"


def test_tuning_rows_apply_per_input_in_bcdpm_modes_only(low):
    meta = metadata(bc_tuning=TABLE, bc_steps=7)
    resolved = settings.resolve_settings({}, meta, "bcdpm", low_dose=low)
    assert resolved.noise_index == pytest.approx(noise_index(low))
    assert 0.01 < resolved.noise_index < 0.06  # the high-pass estimate of 1/30 (gain < 1)
    row = settings.tuned_row(TABLE, resolved.noise_index)
    assert (resolved["bc_lambda"], resolved["bc_sigma_mm"]) == (row["bc_lambda"], row["bc_sigma_mm"])
    assert resolved.sources["bc_lambda"] == resolved.sources["bc_sigma_mm"] == "tuning"
    # a row without l: the sidecar's; without a hot-voxel mode: the default
    assert resolved["bc_steps"] == 7 and resolved.sources["bc_steps"] == "checkpoint"
    assert resolved["hot_voxels"] == "rescale" and resolved.sources["hot_voxels"] == "default"
    given = settings.resolve_settings(dict(bc_lambda=0.3), meta, "bcdpm", low_dose=low)
    assert given["bc_lambda"] == 0.3 and given.sources["bc_lambda"] == "given"
    assert given.sources["bc_sigma_mm"] == "tuning"
    # the paired mode, and run-level resolution without an input, never read the table
    assert settings.resolve_settings({}, dict(meta, cond="paired"), "paired", low_dose=low).noise_index is None
    assert settings.resolve_settings({}, meta, "bcdpm")["bc_lambda"] == settings.DEFAULTS["bc_lambda"]
    # l and the hot-voxel mode from rows that have them, typed as ints / strings
    with_l = [dict(row, bc_steps=float(k + 1), hot_voxels="input") for k, row in enumerate(TABLE)]
    resolved = settings.resolve_settings({}, metadata(bc_tuning=with_l), "bcdpm", low_dose=low)
    assert resolved["bc_steps"] == 1 and type(resolved["bc_steps"]) is int
    assert resolved["hot_voxels"] == "input" and resolved.sources["bc_steps"] == "tuning"
    # a table measured by the second-difference estimator is looked up by it
    new = [dict(row, noise_estimator="second_difference") for row in TABLE]
    resolved = settings.resolve_settings({}, metadata(bc_tuning=new), "bcdpm", low_dose=low)
    assert resolved.noise_index == pytest.approx(difference_noise_index(low))
    assert resolved.noise_index == pytest.approx(1 / 30, rel=0.05)  # white noise: the variance per SUV
    # everything tuned given: no noise-index lookup
    all_given = dict(bc_lambda=0.1, bc_sigma_mm=5.0, bc_steps=2, hot_voxels="clip")
    assert settings.resolve_settings(all_given, meta, "bcdpm", low_dose=low).noise_index is None


def test_a_table_tuned_on_ensemble_means_sets_the_default_ensemble_size():
    assert settings.recommended_members(metadata(bc_tuning=TABLE), "bcdpm") == 1  # rows without the key
    tuned = metadata(bc_tuning=[dict(row, members=4) for row in TABLE], ensemble_respacing="ddim10")
    for mode in ("bcdpm", "hybrid"):
        assert settings.recommended_members(tuned, mode) == 4
    assert settings.recommended_members(dict(tuned, cond="paired"), "paired") == 1  # the table is BC-DPM's
    assert settings.recommended_members(metadata(), "bcdpm") == 1
    # the resolver's ensemble size defaults to it (here: the ensemble respacing), a given size wins
    assert settings.resolve_settings({}, tuned, "bcdpm")["timestep_respacing"] == "ddim10"
    assert settings.resolve_settings({}, tuned, "bcdpm").estimate is None  # BC-DPM's image: the members' mean
    assert settings.resolve_settings(dict(members=1), tuned, "bcdpm")["timestep_respacing"] == "100"


SPREAD = dict(noise_estimator="second_difference", noise_index=0.01, x0_skip_sigma=0.02, power=0.5,
              range=[0.01, 0.08])


def test_spread_sigma_follows_the_fit_within_its_range():
    assert settings.spread_sigma(SPREAD, 0.04) == pytest.approx(0.04)  # 0.02 x (0.04 / 0.01)^0.5
    assert settings.spread_sigma(SPREAD, 0.0025) == pytest.approx(0.01)
    assert settings.spread_sigma(SPREAD, 10.0) == pytest.approx(0.08)  # clipped to the fitted range
    assert settings.spread_sigma(SPREAD, None) is None


def test_the_noise_index_is_measured_on_the_models_grid(low):
    """A 2 mm input of a 4 mm model: its index is the resampled volume's (white noise averages
    down there), as the validation volumes of the fits were measured at 4 mm."""
    meta = metadata("paired", ensemble_spread=SPREAD)
    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    on_grid = difference_noise_index(volumes.resample_image(low, fine, 4.0)[0])
    assert settings.model_grid_noise_index(low, fine, meta, "second_difference") == pytest.approx(on_grid)
    assert on_grid < 0.6 * difference_noise_index(low)
    for same in (np.diag([4.0, 4.0, 4.0, 1.0]), np.diag([4.02, 4.02, 4.02, 1.0]), None):  # within 1 %: as given
        assert settings.model_grid_noise_index(low, same, meta, "second_difference") == difference_noise_index(low)
    many = settings.resolve_settings(dict(members=4), meta, "paired", low_dose=low, affine=fine)
    assert many.noise_index == pytest.approx(on_grid)


def test_ensembles_of_a_paired_sampler_take_the_blend_width_from_the_spread_fit(low):
    meta = metadata("paired", ensemble_spread=SPREAD)
    many = settings.resolve_settings(dict(members=4), meta, "paired", low_dose=low)
    assert many.noise_index == pytest.approx(difference_noise_index(low))
    assert many["x0_skip_sigma"] == pytest.approx(settings.spread_sigma(SPREAD, many.noise_index))
    assert many.sources["x0_skip_sigma"] == "tuning"
    one = settings.resolve_settings({}, meta, "paired", low_dose=low)
    assert one["x0_skip_sigma"] is None and one.sources["x0_skip_sigma"] == "default"
    given = settings.resolve_settings(dict(members=4, x0_skip_sigma=0.03), meta, "paired", low_dose=low)
    assert given["x0_skip_sigma"] == 0.03 and given.sources["x0_skip_sigma"] == "given"
    with pytest.raises(ValueError, match="--x0_skip_sigma must be >= 0"):
        settings.check_settings(settings.resolve_settings(dict(x0_skip_sigma=-0.1), meta, "paired"), 10)


def test_the_noise_class_sets_the_default_l():
    parser = argparse.ArgumentParser()
    arguments.add_guidance_arguments(parser)
    args = parser.parse_args(["--bc_noise", "heavy"])
    resolved = settings.resolve_settings(arguments.given_settings(args), metadata(), "bcdpm",
                                         defaults=arguments.noise_class_defaults(args))
    assert resolved["bc_steps"] == 15 and resolved.sources["bc_steps"] == "default"
    resolved = settings.resolve_settings(arguments.given_settings(args), metadata(bc_steps=3), "bcdpm",
                                         defaults=arguments.noise_class_defaults(args))
    assert resolved["bc_steps"] == 3  # the sidecar's recommendation beats the noise class


def test_check_settings_names_the_bad_value():
    resolved = settings.resolve_settings(dict(bc_steps=20), metadata(), "bcdpm")
    with pytest.raises(ValueError, match=r"--bc_steps.*l = 20 \(given\).*\[0, 10\]"):
        settings.check_settings(resolved, 10)
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        settings.check_settings(settings.resolve_settings(dict(bc_steps=0, bc_start=True), metadata(),
                                                          "bcdpm"), 10)
    for bad in (dict(fusion_kappa=-1.0), dict(dc_steps=11), dict(bc_lambda=1.5), dict(batch_size=0)):
        with pytest.raises(ValueError):
            settings.check_settings(settings.resolve_settings(bad, metadata("paired"), "paired"), 10)


def test_mode_resolution_checks_the_checkpoint():
    assert settings.resolve_mode("auto", metadata("paired"), "x.pt") == "paired"
    assert settings.resolve_mode("auto", metadata("none"), "x.pt") == "bcdpm"
    with pytest.raises(ValueError, match="x.pt.*unconditional"):
        settings.resolve_mode("hybrid", metadata("none"), "x.pt")
    with pytest.raises(ValueError, match="--cond_dropout"):
        settings.resolve_mode("bcdpm", metadata("paired"), "x.pt")
    assert settings.resolve_mode("bcdpm", dict(metadata("paired"), cond_dropout=0.2), "x.pt") == "bcdpm"


def test_sampling_settings_of_a_cond_dropout_prior_feed_the_null_condition():
    meta = dict(metadata("paired"), cond_dropout=0.2)
    for mode, null in (("bcdpm", True), ("paired", False), ("hybrid", False)):
        resolved = settings.resolve_settings(dict(bc_start=True, bc_steps=3), meta, mode)
        sampling = settings.sampling_settings(resolved, meta, "fp32")
        assert sampling.null_condition is null and sampling.start_t == 2
    plain_prior = metadata("none")
    resolved = settings.resolve_settings({}, plain_prior, "bcdpm")
    assert settings.sampling_settings(resolved, plain_prior, "fp32").null_condition is False


def test_precision_auto_on_a_cpu_follows_its_bf16_units(tmp_path):
    expected = "bf16" if fp16_util.cpu_has_fast_bf16() else "fp32"
    assert settings.resolve_precision("auto", False, "cpu") == expected
    assert settings.resolve_precision(None, True, "cpu") == expected
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor : 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor : 0\nflags\t\t: fpu avx2 fma\n")
    assert fp16_util.cpu_has_fast_bf16(str(amx)) and not fp16_util.cpu_has_fast_bf16(str(avx2))
    assert not fp16_util.cpu_has_fast_bf16(str(tmp_path / "missing"))
    assert settings.resolve_precision("fp32", True, "cpu") == "fp32"


def test_acquisition_flag_beats_manifest_beats_default(tmp_path):
    alone = tmp_path / "alone.npz"
    volumes.save_npz(alone, np.ones((4, 4, 4), np.float32))
    none = dict.fromkeys(("scanner", "view_mashing", "psf_fwhm_mm", "randoms_fraction", "total_counts",
                          "drf", "full_counts"))
    with pytest.raises(ValueError, match="alone.npz.*count level"):
        settings.resolve_acquisition(none, str(alone))
    kwargs, sources = settings.resolve_acquisition(dict(none, drf=10.0, full_counts=5e6), str(alone))
    assert kwargs["total_counts"] == 5e5 and sources["total_counts"] == "full_counts / drf"
    assert kwargs["scanner"] == "quadra" and kwargs["randoms_fraction"] == 0.2
    kwargs, sources = settings.resolve_acquisition(dict(none, total_counts=123.0, scanner="demo"), str(alone))
    assert (kwargs["total_counts"], kwargs["scanner"]) == (123.0, "demo")
    assert sources["total_counts"] == sources["scanner"] == "given"


def test_range_warnings_name_an_untrained_t_range_and_slabs_deeper_than_validated():
    paired = dict(metadata("paired"), patch_size_zxy=[16, 48, 48])
    assert settings.range_warnings(settings.resolve_settings({}, paired, "paired"), paired, "m.pt") == []
    same = settings.resolve_settings(dict(patch_z=16), paired, "paired")
    assert settings.range_warnings(same, paired, "m.pt") == []
    [deeper] = settings.range_warnings(settings.resolve_settings(dict(patch_z=32), paired, "paired"), paired, "m.pt")
    assert deeper.startswith("--patch_z 32:") and "16 slices m.pt" in deeper
    # a recommended depth deeper than the training patches was validated: no warning up to it
    slabs = dict(paired, sampling=dict(patch_z=32))
    assert settings.range_warnings(settings.resolve_settings({}, slabs, "paired"), slabs, "m.pt") == []
    prior = dict(metadata("none", trained_max_t=200), patch_size_zxy=[10, 160, 100])
    [untrained] = settings.range_warnings(settings.resolve_settings({}, prior, "bcdpm"), prior, "p.pt")
    assert "t < 200" in untrained and "--bc_start" in untrained
    started = settings.resolve_settings(dict(bc_start=True), prior, "bcdpm")
    assert settings.range_warnings(started, prior, "p.pt") == []
