"""Tests for guided_diffusion.script_util: flags, factories, strict checkpoint loading."""

import argparse

import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import script_util as su
from guided_diffusion.unet import SuperResModel, UNetModel

th.set_num_threads(1)

PUBLISHED_FLAGS = {
    "dims": 3, "in_channels": 1, "num_channels": 128, "num_res_blocks": 2,
    "channel_mult": "1,1,2,3,4", "learn_sigma": True, "use_scale_shift_norm": True,
    "resblock_updown": True, "attention_resolutions": "", "class_cond": False,
    "unet_layout": "published3d", "paired": True,
}


def tiny_sr_flags(**overrides):
    flags = dict(su.sr_model_and_diffusion_defaults(), num_channels=32,
                 channel_mult="1,2", num_res_blocks=1, diffusion_steps=100)
    flags.update(overrides)
    return flags


def test_sr_defaults_build_the_published_model():
    with th.device("meta"):
        model, diffusion = su.sr_create_model_and_diffusion(
            **su.sr_model_and_diffusion_defaults())
    assert isinstance(model, SuperResModel) and model.layout == "published3d"
    assert model.dims == 3 and model.in_channels == 2 and model.out_channels == 2
    assert model.channel_mult == (1, 1, 2, 3, 4)
    assert sum(p.numel() for p in model.parameters()) == 206_964_610
    assert diffusion.num_timesteps == 1000
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE


def test_sr_2d_uses_upstream_layout():
    model = su.sr_create_model_and_diffusion(**tiny_sr_flags(dims=2))[0]
    assert model.layout == "upstream" and model.dims == 2


def test_create_model_2d_and_3d():
    flags = dict(su.model_and_diffusion_defaults(), image_size=32, num_channels=32,
                 channel_mult="1,2", num_res_blocks=1, attention_resolutions="16",
                 learn_sigma=True, diffusion_steps=100)
    model, diffusion = su.create_model_and_diffusion(**flags)
    assert isinstance(model, UNetModel) and model.attention_resolutions == (2,)
    with th.no_grad():
        assert model(th.randn(1, 3, 8, 8), th.tensor([3])).shape == (1, 6, 8, 8)
    model3d = su.create_model_and_diffusion(**dict(flags, dims=3, in_channels=1))[0]
    with th.no_grad():
        assert model3d(th.randn(1, 1, 3, 8, 8), th.tensor([3])).shape == (1, 2, 3, 8, 8)
    assert diffusion.num_timesteps == 100


def test_channel_mult_defaults_and_parsing():
    sr = (su.SR_CHANNEL_MULT, su.SR_FALLBACK_CHANNEL_MULT)
    assert su.parse_channel_mult("", 96, *sr) == (1, 1, 2, 3, 4)
    assert su.parse_channel_mult("", 256, *sr) == (1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult("", 512, *sr) == (1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult("", 64, *sr) == (1, 2, 3, 4)
    assert su.parse_channel_mult("1,2,2,4", 96, *sr) == (1, 2, 2, 4)
    assert su.parse_channel_mult("0.5,1", 96, *sr) == (0.5, 1)
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult("1,x", 96, *sr)
    with pytest.raises(ValueError, match="no default channel_mult for image size 96"):
        su.create_model(96, 32, 1)


def test_attention_resolutions():
    assert su.parse_attention_resolutions("1000", 96) == (0,)
    assert su.parse_attention_resolutions("16,8", 64) == (4, 8)
    assert su.parse_attention_resolutions("", 64) == ()
    with pytest.raises(ValueError, match="attention_resolutions"):
        su.parse_attention_resolutions("16,a", 64)


def test_argparser_round_trip():
    parser = argparse.ArgumentParser()
    defaults = su.sr_model_and_diffusion_defaults()
    su.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--learn_sigma", "False", "--num_channels", "64",
                              "--timestep_respacing", "ddim25"])
    parsed = su.args_to_dict(args, defaults.keys())
    assert parsed["learn_sigma"] is False and parsed["num_channels"] == 64
    assert parsed["timestep_respacing"] == "ddim25" and parsed["dims"] == 3
    assert set(parsed) == set(defaults)
    assert su.str2bool("YES") is True and su.str2bool("0") is False
    with pytest.raises(argparse.ArgumentTypeError):
        su.str2bool("maybe")


def test_infer_flags_published():
    with th.device("meta"):
        model = su.sr_create_model_and_diffusion(**su.sr_model_and_diffusion_defaults())[0]
    assert su.infer_flags_from_state_dict(model.state_dict()) == PUBLISHED_FLAGS


def test_infer_flags_upstream_2d():
    flags = dict(su.model_and_diffusion_defaults(), learn_sigma=True, class_cond=True)
    with th.device("meta"):
        model = su.create_model_and_diffusion(**flags)[0]
    inferred = su.infer_flags_from_state_dict(model.state_dict(), image_size=64)
    assert inferred["paired"] is False and inferred["dims"] == 2
    assert inferred["channel_mult"] == "1,2,3,4"
    assert inferred["attention_resolutions"] == "16,8"
    assert inferred["learn_sigma"] and inferred["class_cond"]
    assert inferred["unet_layout"] == "upstream" and not inferred["resblock_updown"]
    with pytest.raises(ValueError, match="not a guided-diffusion UNet"):
        su.infer_flags_from_state_dict({"weight": th.zeros(2)})


def test_load_checkpoint_strict_reports_and_suggests():
    model = su.sr_create_model_and_diffusion(**tiny_sr_flags())[0]
    other = su.sr_create_model_and_diffusion(
        **tiny_sr_flags(num_channels=64, resblock_updown=False))[0]
    with pytest.raises(ValueError) as err:
        su.load_checkpoint_strict(model, other.state_dict(), "ckpt/model.pt")
    message = str(err.value)
    assert "ckpt/model.pt" in message
    assert "missing keys: input_blocks.2.0.in_layers.0.weight" in message
    assert "unexpected keys: input_blocks.2.0.op.weight" in message
    assert "time_embed.0.weight: checkpoint (256, 64) vs model (128, 32)" in message
    assert "--num_channels 64" in message and "--resblock_updown False" in message
    assert "--channel_mult 1,2" in message


def test_load_checkpoint_strict_ddp_prefix_hint_and_success():
    model = su.sr_create_model_and_diffusion(**tiny_sr_flags())[0]
    state = {k: th.randn_like(v) for k, v in model.state_dict().items()}
    prefixed = {f"module.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match="'module.' prefix"):
        su.load_checkpoint_strict(model, prefixed, "ddp.pt")
    with pytest.raises(ValueError, match="(?s)nested.pt.*key 'model' holds dict"):
        su.load_checkpoint_strict(model, {"model": state}, "nested.pt")
    su.load_checkpoint_strict(model, state, "ok.pt")
    assert all(th.equal(model.state_dict()[k], v) for k, v in state.items())
