import csv
import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch as th

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint_hub import absolute_paths
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults
from guided_diffusion.train_util import (
    TrainLoop,
    data_record,
    find_resume_checkpoint,
    parse_resume_step_from_filename,
)
from tests.mpi_helpers import REPO, run_mpi

PATCH = (8, 16, 16)  # (Z, X, Y)


def tiny_model_and_diffusion(seed=0, learn_sigma=True):
    flags = sr_model_and_diffusion_defaults()
    flags.update(num_channels=8, channel_mult="1,2", num_res_blocks=1, num_head_channels=-1,
                 large_size=16, small_size=16, diffusion_steps=50, learn_sigma=learn_sigma)
    th.manual_seed(seed)
    return sr_create_model_and_diffusion(**flags)


def seed_everything(seed):
    th.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture
def log_dir(tmp_path):
    threads = th.get_num_threads()
    dist_util.setup_dist(threads=threads)
    th.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared machine
    logger.configure(str(tmp_path / "log"), format_strs=["csv"])
    yield tmp_path / "log"
    logger.reset()
    th.set_num_threads(threads)


@pytest.fixture
def data_dir(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    x, y, z = np.meshgrid(np.arange(20), np.arange(20), np.arange(10), indexing="ij")
    for i in range(2):
        full = (1.0 + np.sin(x / 3.0 + i) * np.cos(y / 4.0) + z / 10).astype(np.float32)
        np.savez(directory / f"s{i}.npz", np.stack([0.6 * full, full]))
    return directory


def easy_batches(batch_size=4):
    """The same smooth batch forever: the model only has to learn one image."""
    z, x, y = th.meshgrid(*(th.linspace(-1, 1, n) for n in PATCH), indexing="ij")
    image = (0.5 * th.sin(2 * x) * th.cos(2 * y) + 0.1 * z)[None, None].repeat(batch_size, 1, 1, 1, 1)
    while True:
        yield image, {"low_res": image + 0.1}


def test_tiny_model_loss_drops(log_dir):
    model, diffusion = tiny_model_and_diffusion(learn_sigma=False)
    seed_everything(0)
    mse, steps = [], []

    def record(loop):
        mse.append(logger.getkvs()["mse"])
        steps.append(loop.step)

    TrainLoop(model=model, diffusion=diffusion, data=easy_batches(), batch_size=4, microbatch=-1,
              lr=3e-3, ema_rate="0.99", log_interval=1, save_interval=1000, max_steps=40,
              callback=record).run_loop()
    assert steps == list(range(1, 41))
    assert np.mean(mse[-8:]) < 0.4 * np.mean(mse[:8])
    assert os.path.exists(log_dir / "model000040.pt")  # final save
    rows = (log_dir / "progress.csv").read_text().splitlines()
    assert len(rows) == 41 and "mse" in rows[0].split(",")
    assert (log_dir / "loss_curve.png").stat().st_size > 0


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_its_rate_schedule_by_hand(log_dir, warmup):
    """EMA_k = r_k EMA_{k-1} + (1 - r_k) theta_k, r_k = min(0.99, (1 + k) / (10 + k)) with the
    warm-up (k: the step the update ends), 0.99 without."""
    model, diffusion = tiny_model_and_diffusion(learn_sigma=False)
    seed_everything(0)
    expected = [p.detach().clone() for p in model.parameters()]

    def record(loop):
        k = loop.step - 1
        rate = min(0.99, (1 + k) / (10 + k)) if warmup else 0.99
        for e, p in zip(expected, loop.mp_trainer.master_params):
            e.mul_(rate).add_(p.detach(), alpha=1 - rate)

    loop = TrainLoop(model=model, diffusion=diffusion, data=easy_batches(), batch_size=2, microbatch=-1,
                     lr=3e-3, ema_rate="0.99", ema_warmup=warmup, log_interval=1, save_interval=1000,
                     max_steps=5, callback=record)
    loop.run_loop()
    for e, p in zip(expected, loop.ema_params[0]):
        assert th.allclose(e, p, atol=1e-6)


def make_loop(model, diffusion, data, save_dir, max_steps, precision=None):
    from guided_diffusion.resample import create_named_schedule_sampler

    return TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=1, lr=1e-3,
        ema_rate="0.9,0.99", log_interval=2, save_interval=3, max_steps=max_steps,
        schedule_sampler=create_named_schedule_sampler("loss-second-moment", diffusion),
        grad_clip=0.5, precision=precision, save_dir=str(save_dir),
        metadata={"cond": "paired", "normalisation": {"clip": 16}},
    )


def test_resume_is_exact(log_dir, data_dir, tmp_path):
    def data():
        return load_data(data_dir=str(data_dir), batch_size=2, patch_size=PATCH, paired=True,
                         intensity_jitter=0.1, seed=5, shard=0, num_shards=1)

    seed_everything(1)
    straight = make_loop(*tiny_model_and_diffusion(), data(), tmp_path / "a", max_steps=6)
    straight.run_loop()

    seed_everything(1)
    make_loop(*tiny_model_and_diffusion(), data(), tmp_path / "b", max_steps=3).run_loop()
    seed_everything(123)  # resuming must restore every random stream
    resumed = make_loop(*tiny_model_and_diffusion(seed=7), data(), tmp_path / "b", max_steps=6)
    assert resumed.step == 3
    resumed.run_loop()

    assert resumed.step == straight.step == 6
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert th.equal(p, q)
    for ema_a, ema_b in zip(straight.ema_params, resumed.ema_params):
        assert all(th.equal(p, q) for p, q in zip(ema_a, ema_b))
    opt_a, opt_b = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(th.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    assert np.array_equal(straight.schedule_sampler._loss_history, resumed.schedule_sampler._loss_history)
    # and the parameters did move
    fresh = tiny_model_and_diffusion()[0]
    assert not all(th.equal(p, q) for p, q in zip(fresh.parameters(), straight.model.parameters()))


def test_checkpoint_files_and_metadata(log_dir, tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    seed_everything(0)
    make_loop(model, diffusion, easy_batches(2), tmp_path / "c", max_steps=3).run_loop()
    ckpt = tmp_path / "c"
    names = sorted(os.listdir(ckpt))
    assert names == sorted([
        "model000003.pt", "model000003.json", "ema_0.9_000003.pt", "ema_0.9_000003.json",
        "ema_0.99_000003.pt", "ema_0.99_000003.json", "opt000003.pt", "state000003.pt",
        "loss_curve.png",
    ])
    meta = json.loads((ckpt / "model000003.json").read_text())
    assert meta["cond"] == "paired" and meta["normalisation"] == {"clip": 16}
    assert meta["step"] == 3 and meta["ema_rate"] is None
    assert meta["sha256"] == hashlib.sha256((ckpt / "model000003.pt").read_bytes()).hexdigest()
    ema_meta = json.loads((ckpt / "ema_0.99_000003.json").read_text())
    assert ema_meta["ema_rate"] == 0.99 and ema_meta["weights"] == "ema_0.99_000003.pt"
    state = dist_util.load_state_dict(str(ckpt / "model000003.pt"))
    fresh = tiny_model_and_diffusion(seed=3)[0]
    fresh.load_state_dict(state, strict=True)
    assert all(th.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))


def test_sidecars_record_data_without_absolute_paths(log_dir, tmp_path):
    data = tmp_path / "phantoms"
    (data / "s0000").mkdir(parents=True)
    (data / "train.txt").write_text("s0000/s0000_FDG_drf4.npz\ns0000/s0000_FDG_drf10.npz\n")
    (data / "manifest.json").write_text(json.dumps(dict(
        created_by="scripts/make_dataset.py", seed=100, subjects=1, voxel_mm=3.3, drf=[4.0, 10.0],
        tracers=["FDG"], split=dict(train=["s0000"], val=[], test=[]), entries=[{"subject": "s0000"}])))
    record = data_record(str(data), 2)
    assert record == dict(data_dir="phantoms", files=2, datasets=[dict(
        path=".", files=2, created_by="scripts/make_dataset.py", seed=100, subjects=1, voxel_mm=3.3,
        drf=[4.0, 10.0], tracers=["FDG"], split_subjects=1)])
    model, diffusion = tiny_model_and_diffusion()
    loop = make_loop(model, diffusion, easy_batches(2), tmp_path / "ckpt", max_steps=1)
    loop.metadata.update(training_data=record, note=f"made from {data}")  # a path slipped in
    loop.run_loop()
    meta = json.loads((tmp_path / "ckpt" / "model000001.json").read_text())
    assert meta["training_data"] == record and meta["note"] == "made from phantoms"
    assert absolute_paths(meta) == []


def test_find_resume_checkpoint_skips_incomplete_steps(tmp_path):
    for step in (2, 4):
        for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", f"ema_0.9_{step:06d}.pt"):
            (tmp_path / name).write_bytes(b"x")
    (tmp_path / "state000002.pt").write_bytes(b"x")  # step 4 lacks its state file
    (tmp_path / "model000006.pt.tmp123").write_bytes(b"x")
    assert find_resume_checkpoint(str(tmp_path), [0.9]) == str(tmp_path / "model000002.pt")
    assert find_resume_checkpoint(str(tmp_path), [0.99]) is None
    assert find_resume_checkpoint(str(tmp_path / "missing")) is None
    assert parse_resume_step_from_filename("/x/model012345.pt") == 12345
    assert parse_resume_step_from_filename("/x/published_weights.pt") == 0


class _NoiseFreeDiffusion:
    """training_losses = mean of (model output - 1)^2: deterministic, to compare gradients."""

    num_timesteps = 50

    def training_losses(self, model, x, t, model_kwargs=None):
        out = model(x, t, **(model_kwargs or {}))
        return {"loss": ((out - 1) ** 2).mean(dim=tuple(range(1, out.dim())))}


def gradients_after_one_batch(microbatch, grad_clip=0.0):
    model, _ = tiny_model_and_diffusion()
    loop = TrainLoop(model=model, diffusion=_NoiseFreeDiffusion(), data=None, batch_size=4,
                     microbatch=microbatch, grad_clip=grad_clip, save_dir="unused")
    batch, cond = next(easy_batches())
    batch = batch + th.linspace(0, 0.3, 4).view(4, 1, 1, 1, 1)  # distinct samples
    np.random.seed(0)
    loop.forward_backward(batch, cond)
    if grad_clip:
        loop._clip_gradients()
    return [p.grad.clone() for p in model.parameters()]


def test_microbatches_give_the_whole_batch_gradient_and_clipping_bounds_it(log_dir):
    whole = gradients_after_one_batch(microbatch=-1)
    split = gradients_after_one_batch(microbatch=1)
    for g, h in zip(whole, split):
        assert th.allclose(g, h, atol=1e-6, rtol=1e-4)
    norm = th.sqrt(sum((g.double() ** 2).sum() for g in whole))
    clipped = gradients_after_one_batch(microbatch=-1, grad_clip=0.5 * norm.item())
    clipped_norm = th.sqrt(sum((g.double() ** 2).sum() for g in clipped))
    assert abs(clipped_norm.item() - 0.5 * norm.item()) < 1e-4 * norm.item()


def test_bf16_autocast_trains_on_cpu(log_dir, tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    before = [p.detach().clone() for p in model.parameters()]
    seed_everything(0)
    loop = make_loop(model, diffusion, easy_batches(2), tmp_path / "bf16", max_steps=2, precision="bf16")
    assert loop.mp_trainer.precision == "bf16"
    loop.run_loop()
    assert all(p.dtype == th.float32 and th.isfinite(p).all() for p in model.parameters())
    assert not all(th.equal(p, q) for p, q in zip(before, model.parameters()))


def write_script_data(directory, files=2):
    directory.mkdir()
    for i in range(files):
        full = np.zeros((20, 20, 10), np.float32)
        full[3:17, 3:17] = 1.0 + i
        np.savez(directory / f"s{i}.npz", np.stack([0.5 * full, full]))
    (directory / "manifest.json").write_text(json.dumps({"voxel_mm": 2.0}))


TINY_FLAGS = ["--patch_size", "8", "16", "16", "--num_channels", "8", "--channel_mult", "1,2",
              "--num_res_blocks", "1", "--num_head_channels", "-1", "--attention_resolutions", "1000",
              "--diffusion_steps", "50",
              "--batch_size", "2", "--save_interval", "2", "--log_interval", "1", "--threads", "1"]


def run_train_script(args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_train_script_unconditional_and_resume(tmp_path):
    write_script_data(tmp_path / "data")
    log = tmp_path / "log"
    common = ["--data_dir", tmp_path / "data", "--log_dir", log, "--cond", "none", *TINY_FLAGS,
              "--val_dir", tmp_path / "data", "--val_patches", 2, "--val_respacing", "ddim5"]
    run_train_script([*common, "--max_steps", "2"])
    with open(log / "progress.csv") as handle:
        rows = list(csv.DictReader(handle))
    validated = [row for row in rows if row.get("val_psnr")]
    assert [row["step"] for row in validated] == ["2"]  # every --save_interval
    assert np.isfinite([float(validated[0][k]) for k in ("val_psnr", "val_psnr_input")]).all()
    first = dist_util.load_state_dict(str(log / "model000002.pt"))
    proc = run_train_script([*common, "--max_steps", "4"])
    assert "resuming from" in proc.stdout and "model000002.pt" in proc.stdout
    meta = json.loads((log / "model000004.json").read_text())
    assert meta["cond"] == "none" and meta["voxel_mm"] == 2.0
    # the data directories are recorded without this machine's paths
    assert absolute_paths(meta) == [] and str(tmp_path) not in json.dumps(meta)
    assert meta["training_data"] == dict(data_dir="data", files=2, datasets=[
        dict(path=".", files=None, voxel_mm=2.0)])
    assert meta["training"]["validation"]["data_dir"] == "data"
    assert meta["flags"]["dims"] == 3 and meta["flags"]["in_channels"] == 1
    assert meta["flags"]["image_size"] == 16 and meta["patch_size_zxy"] == [8, 16, 16]
    assert meta["normalisation"] == {"transform": "linear", "clip": 16.0, "scale": 16.0, "range": [-1.0, 1.0]}
    second = dist_util.load_state_dict(str(log / "model000004.pt"))
    assert first.keys() == second.keys()
    assert not all(th.equal(first[k], second[k]) for k in first)


def test_train_script_cond_dropout_records_it_and_needs_paired_data(tmp_path):
    write_script_data(tmp_path / "data")
    log = tmp_path / "log"
    run_train_script(["--data_dir", tmp_path / "data", "--log_dir", log, "--cond", "paired",
                      "--cond_dropout", 0.5, *TINY_FLAGS, "--max_steps", "2"])
    meta = json.loads((log / "model000002.json").read_text())
    assert meta["cond"] == "paired" and meta["cond_dropout"] == 0.5
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--data_dir",
                           str(tmp_path / "data"), "--log_dir", str(tmp_path / "bad"), "--cond", "none",
                           "--cond_dropout", "0.5", *TINY_FLAGS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--cond_dropout needs --cond paired" in proc.stderr


DDP_SCRIPT = """
import hashlib, json, sys
import numpy as np, torch
from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.train_util import TrainLoop
from tests.test_train_util import tiny_model_and_diffusion

dist_util.setup_dist()
out = sys.argv[1]
logger.configure(out, format_strs=["csv"])
model, diffusion = tiny_model_and_diffusion(seed=10 + dist_util.rank())  # differs per rank
torch.manual_seed(dist_util.rank()); np.random.seed(dist_util.rank())
data = load_data(data_dir=sys.argv[2], batch_size=2, patch_size=(8, 16, 16), paired=True, seed=1)
loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=1,
                 lr=1e-3, ema_rate="0.9", save_interval=4, max_steps=4)
init = tiny_model_and_diffusion(seed=10)[0]

def digest(params):
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params)).hexdigest()

loop.run_loop()
print("RESULT " + json.dumps(dict(
    rank=dist_util.rank(), params=digest(model.parameters()), ema=digest(loop.ema_params[0]),
    init=digest(init.parameters()), files=[s[1] for s in data.dataset.sources],
    saved=digest(dist_util.load_state_dict(out + "/model000004.pt").values()),
)), flush=True)
"""


@pytest.mark.mpi
def test_ddp_two_ranks_keep_identical_parameters(tmp_path):
    write_script_data(tmp_path / "data")
    results = run_mpi(DDP_SCRIPT, tmp_path, n=2, args=[tmp_path / "out", tmp_path / "data"])
    assert results[0]["params"] == results[1]["params"] != results[0]["init"]
    assert results[0]["ema"] == results[1]["ema"]
    assert results[0]["saved"] == results[0]["params"]
    assert results[0]["files"] != results[1]["files"]  # each rank trained on its own file


@pytest.mark.mpi
def test_train_script_under_mpiexec(tmp_path):
    write_script_data(tmp_path / "data")
    log = tmp_path / "log"
    script = f"""
import json, runpy, sys
sys.argv = ["train.py", "--data_dir", {str(tmp_path / "data")!r}, "--log_dir", {str(log)!r},
            "--max_steps", "2"] + {TINY_FLAGS!r}
runpy.run_path("scripts/train.py", run_name="__main__")
from guided_diffusion import dist_util
print("RESULT " + json.dumps(dict(rank=dist_util.rank(), world=dist_util.world_size())), flush=True)
"""
    results = run_mpi(script, tmp_path, n=2)
    assert [r["world"] for r in results] == [2, 2]
    meta = json.loads((log / "model000002.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["cond"] == "paired"
    assert meta["flags"]["large_size"] == 16
    state = dist_util.load_state_dict(str(log / "state000002.pt"))
    assert len(state["ranks"]) == 2
    assert state["ranks"][0]["data"]["shard"] == 0 and state["ranks"][1]["data"]["shard"] == 1


def test_logger_csv_adds_columns_and_averages(tmp_path):
    logger.configure(str(tmp_path), format_strs=["csv"])
    try:
        logger.logkv("step", 1)
        logger.logkv_mean("loss", 1.0)
        logger.logkv_mean("loss", 2.0)
        assert logger.dumpkvs() == {"step": 1, "loss": 1.5}
        logger.logkv("step", 2)
        logger.logkv("psnr", 30.0)
        logger.dumpkvs()
    finally:
        logger.reset()
    assert (tmp_path / "progress.csv").read_text().splitlines() == [
        "loss,step,psnr", "1.5,1,", ",2,30.0",
    ]


def _tiny_paired(**extra):
    from tests.conftest import TINY_FLAGS

    flags = dict(sr_model_and_diffusion_defaults(), large_size=16, small_size=16,
                 **dict(TINY_FLAGS, learn_sigma=False, predict_xstart=True,
                        predict_residual=True, **extra))
    th.manual_seed(1)
    model, _ = sr_create_model_and_diffusion(**flags)
    with th.no_grad():
        model.out[-1].weight.normal_(0, 0.05)
    return model, flags


def test_warm_start_from_the_unet_baseline_starts_as_it_whatever_x_t(tmp_path):
    from guided_diffusion.checkpoints import warm_start

    unet, flags = _tiny_paired(regression=True)
    path = tmp_path / "unet.pt"
    th.save(unet.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(dict(flags=flags, cond="paired", step=7)))
    diffusion_model, _ = _tiny_paired()
    low, x_t = th.randn(2, 1, 8, 16, 16), th.randn(2, 1, 8, 16, 16)
    t0 = th.zeros(2, dtype=th.long)
    with th.no_grad():
        assert not th.allclose(diffusion_model(x_t, t0, low_res=low), unet(th.zeros_like(x_t), t0, low_res=low))
        record = warm_start(diffusion_model, str(path))
        expected = unet(th.zeros_like(x_t), t0, low_res=low)
        th.testing.assert_close(diffusion_model(x_t, t0, low_res=low), expected)
    assert record["zeroed_noisy_input"] and record["step"] == 7 and record["path"] == "unet.pt"
    # the x_t weights are trainable zeros, the low-dose weights the U-Net's
    first = diffusion_model.input_blocks[0][0].weight
    assert first.requires_grad and th.count_nonzero(first[:, :1]) == 0
    th.testing.assert_close(first[:, 1:], unet.input_blocks[0][0].weight[:, 1:])


def test_warm_start_rejects_another_architecture_naming_the_file(tmp_path):
    from guided_diffusion.checkpoints import warm_start

    small, _ = _tiny_paired()
    path = tmp_path / "small.pt"
    th.save(small.state_dict(), path)
    wider, _ = _tiny_paired(num_channels=32)
    with pytest.raises(ValueError, match="small.pt"):
        warm_start(wider, str(path))
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        warm_start(wider, str(tmp_path / "absent.pt"))
