"""
The training loop (upstream ``TrainLoop`` shape) with DDP, EMA, mixed precision, gradient
clipping, atomic checkpoints and exact resume.

Step ``N`` means N optimiser updates done. A save at step N writes into ``save_dir``:

* ``modelNNNNNN.pt``      model ``state_dict`` (upstream name; plain tensors)
* ``ema_RATE_NNNNNN.pt``  EMA weights per rate, same keys
* ``optNNNNNN.pt``        optimiser ``state_dict``
* ``stateNNNNNN.pt``      step, grad-scaler and timestep-sampler state, and per rank the RNG
                          states (torch, CUDA, numpy, python) and the data iterator position
* ``modelNNNNNN.json`` / ``ema_RATE_NNNNNN.json``  sidecars: the ``metadata`` given to the loop
                          plus step, weights file, EMA rate and sha256 (absolute paths in it
                          are recorded as :func:`~guided_diffusion.checkpoint_hub.repository_path`;
                          :func:`data_record` describes a data directory)
* ``loss_curve.png``      loss against step from the logger's ``progress.csv``

Every file is written to a temporary name and renamed (``os.replace``), model file last, so a
crash never leaves a truncated checkpoint; :func:`find_resume_checkpoint` only returns a step
whose files are all there. Resuming restores parameters, EMA, optimiser, step, RNG streams and
data position, so N straight steps equal N/2 + resume + N/2 bit for bit (same world size).
"""

import contextlib
import copy
import csv
import glob
import hashlib
import io
import json
import os
import random
import re

import numpy as np
import torch as th
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from .checkpoint_hub import portable_paths, repository_path
from .fp16_util import MixedPrecisionTrainer
from .image_datasets import describe_datasets
from .nn import update_ema
from .pet.volumes import atomic_write, atomic_write_bytes
from .resample import LossAwareSampler, UniformSampler


class TrainLoop:
    """
    Train ``model`` on ``diffusion.training_losses`` with batches from ``data``.

    :param data: iterator of ``(batch, model_kwargs)``; if it has ``state_dict`` /
        ``load_state_dict`` its position is checkpointed.
    :param batch_size: per-rank batch size; ``microbatch`` (<= 0: whole batch) splits it for
        memory; the gradient equals the whole batch's (losses weighted by microbatch share).
    :param ema_rate: float or comma-separated string of rates.
    :param ema_warmup: use ``min(rate, (1 + step) / (10 + step))`` (an EMA that forgets the
        random initial weights in short runs: 0.999 alone still holds 17 % of them after 1,750
        steps); False: the constant rate (upstream).
    :param resume_checkpoint: path of a ``modelNNNNNN.pt`` to start from; empty: the latest
        complete checkpoint in ``save_dir`` if any (automatic restart), else from scratch.
    :param precision: "fp32" | "bf16" | "fp16" | None (follow ``use_fp16``), see
        :func:`fp16_util.resolve_precision`.
    :param grad_clip: max global gradient L2 norm (0: no clipping).
    :param betas: AdamW betas (BC-DPM: 0.9, 0.999); ``weight_decay`` default 0.01 as there.
    :param lr_anneal_steps: linear decay of lr to 0 at this step, where training stops.
    :param max_steps: stop at this step (0: no limit).
    :param callback: ``callback(loop)`` after every step (``loop.step`` is the new step),
        before the log dump, e.g. for validation metrics through ``logger.logkv``.
    :param metadata: JSON-able dict written into each weights file's sidecar.
    :param save_dir: checkpoint directory (default: the logger's directory).
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr=1e-4,
        ema_rate="0.9999",
        ema_warmup=False,
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.01,
        lr_anneal_steps=0,
        precision=None,
        grad_clip=0.0,
        betas=(0.9, 0.999),
        max_steps=0,
        callback=None,
        metadata=None,
        save_dir=None,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = (
            [float(ema_rate)]
            if isinstance(ema_rate, (int, float))
            else [float(x) for x in str(ema_rate).split(",") if x]
        )
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.grad_clip = grad_clip
        self.max_steps = max_steps
        self.callback = callback
        self.metadata = dict(metadata or {})
        self.save_dir = save_dir or logger.get_dir()
        if not self.save_dir:
            raise ValueError("TrainLoop needs save_dir or a configured logger directory")
        if self.save_interval < 1 or self.log_interval < 1:
            raise ValueError("save_interval and log_interval must be >= 1")
        self.step = 0
        self.global_batch = batch_size * dist_util.world_size()

        self.mp_trainer = MixedPrecisionTrainer(
            model=model,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            precision=precision,
        )
        self.opt = th.optim.AdamW(
            self.mp_trainer.master_params, lr=lr, betas=tuple(betas), weight_decay=weight_decay
        )
        dist_util.sync_params(self.model.parameters())
        self.ema_warmup = bool(ema_warmup)
        self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]
        # Rank 0's view of the file system decides (other nodes may not share it).
        checkpoint = dist_util.broadcast_object(
            resume_checkpoint or find_resume_checkpoint(self.save_dir, self.ema_rate)
        )
        if checkpoint:
            self._resume(checkpoint)

        self.use_ddp = dist_util.world_size() > 1
        if self.use_ddp:
            device = dist_util.dev()
            self.ddp_model = DDP(
                model,
                device_ids=[device] if device.type == "cuda" else None,
                broadcast_buffers=False,
                find_unused_parameters=False,
            )
        else:
            self.ddp_model = model

    # ------------------------------------------------------------------ resume

    def _resume(self, checkpoint):
        self.step = parse_resume_step_from_filename(checkpoint)
        directory = os.path.dirname(checkpoint)
        logger.log(f"resuming from {checkpoint} (step {self.step})")
        self.model.load_state_dict(
            dist_util.load_state_dict(checkpoint, map_location=dist_util.dev())
        )
        ema_paths = [os.path.join(directory, ema_filename(r, self.step)) for r in self.ema_rate]
        opt_path = os.path.join(directory, f"opt{self.step:06d}.pt")
        state_path = os.path.join(directory, f"state{self.step:06d}.pt")
        paths = ema_paths + [opt_path, state_path]
        exists = dict(zip(paths, dist_util.broadcast_object([os.path.exists(p) for p in paths])))
        for rate, params, path in zip(self.ema_rate, self.ema_params, ema_paths):
            if not exists[path]:
                logger.log(f"no {path}: EMA {rate} starts from the model weights")
            source = path if exists[path] else checkpoint
            state = dist_util.load_state_dict(source, map_location=dist_util.dev())
            with th.no_grad():
                for p, value in zip(params, self.mp_trainer.state_dict_to_master_params(state)):
                    p.copy_(value)
        if exists[opt_path]:
            self.opt.load_state_dict(
                dist_util.load_state_dict(opt_path, map_location=dist_util.dev())
            )
        else:
            logger.log(f"no {opt_path}: optimiser starts fresh")
        if exists[state_path]:
            self._load_training_state(dist_util.load_state_dict(state_path, map_location="cpu"))
        else:
            logger.log(f"no {state_path}: RNG and data position not restored")

    def _load_training_state(self, state):
        if self.mp_trainer.scaler is not None and state.get("grad_scaler"):
            self.mp_trainer.scaler.load_state_dict(state["grad_scaler"])
        for key, value in state.get("schedule_sampler", {}).items():
            setattr(self.schedule_sampler, key, value.numpy().copy())
        if len(state["ranks"]) != dist_util.world_size():
            logger.warn(
                f"checkpoint written by {len(state['ranks'])} ranks, now "
                f"{dist_util.world_size()}: RNG and data position not restored"
            )
            return
        rank_state = state["ranks"][dist_util.rank()]
        _set_rng_state(rank_state["rng"])
        if rank_state.get("data") is not None:
            self.data.load_state_dict(rank_state["data"])

    # ------------------------------------------------------------------ loop

    def _done(self):
        return (self.max_steps and self.step >= self.max_steps) or (
            self.lr_anneal_steps and self.step >= self.lr_anneal_steps
        )

    def run_loop(self):
        """Train until ``max_steps`` / ``lr_anneal_steps`` (forever if neither is set)."""
        last_saved = self.step
        while not self._done():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            if self.callback is not None:
                self.callback(self)
            if self.step % self.log_interval == 0:
                logger.dumpkvs()
            if self.step % self.save_interval == 0:
                self.save()
                last_saved = self.step
        if self.step != last_saved:
            self.save()

    def run_step(self, batch, cond):
        """One optimiser update on one batch; advances ``self.step``."""
        self._anneal_lr()
        self.forward_backward(batch, cond)
        if self.grad_clip > 0:
            self._clip_gradients()
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self.step += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        device = dist_util.dev()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(device)
            micro_cond = {k: v[i : i + self.microbatch].to(device) for k, v in cond.items()}
            last = i + self.microbatch >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], device)
            # DDP all-reduces gradients only after the last microbatch's backward.
            sync = last or not self.use_ddp
            with self.mp_trainer.autocast(), (
                contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            ):
                losses = self.diffusion.training_losses(
                    self.ddp_model, micro, t, model_kwargs=micro_cond
                )
            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
            loss = (losses["loss"].float() * weights).mean() * (micro.shape[0] / batch.shape[0])
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            self.mp_trainer.backward(loss)

    def _clip_gradients(self):
        # Clipping the (possibly loss-scaled) gradients at grad_clip * scale equals clipping
        # the true gradients at grad_clip; non-finite norms still make the step skip.
        scale = self.mp_trainer.scaler.get_scale() if self.mp_trainer.scaler else 1.0
        norm = th.nn.utils.clip_grad_norm_(self.mp_trainer.master_params, self.grad_clip * scale)
        logger.logkv_mean("grad_norm_unclipped", float(norm) / scale)

    def ema_rate_at(self, rate):
        """The EMA rate of the update that ends step ``self.step`` (see ``ema_warmup``)."""
        return min(rate, (1 + self.step) / (10 + self.step)) if self.ema_warmup else rate

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=self.ema_rate_at(rate))

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        lr = self.lr * (1 - self.step / self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ save

    def _training_state(self):
        rank_state = {
            "rng": _get_rng_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }
        if dist_util.world_size() > 1:
            ranks = [None] * dist_util.world_size()
            dist.all_gather_object(ranks, rank_state)
        else:
            ranks = [rank_state]
        sampler_state = {
            k: th.from_numpy(np.array(v))
            for k, v in vars(self.schedule_sampler).items()
            if isinstance(v, np.ndarray)
        }
        scaler = self.mp_trainer.scaler
        return {
            "step": self.step,
            "ranks": ranks,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "schedule_sampler": sampler_state,
        }

    def save(self):
        """Write the checkpoint of the current step (rank 0 writes; all ranks must call)."""
        state = self._training_state()
        if dist_util.is_main():
            os.makedirs(self.save_dir, exist_ok=True)
            step = self.step
            for rate, params in zip(self.ema_rate, self.ema_params):
                self._save_weights(ema_filename(rate, step), params, rate)
            _atomic_save(self.opt.state_dict(), os.path.join(self.save_dir, f"opt{step:06d}.pt"))
            _atomic_save(state, os.path.join(self.save_dir, f"state{step:06d}.pt"))
            self._save_weights(f"model{step:06d}.pt", self.mp_trainer.master_params, None)
            logger.log(f"saved checkpoint model{step:06d}.pt in {self.save_dir}")
            plot_loss_curve(
                os.path.join(logger.get_dir() or self.save_dir, "progress.csv"),
                os.path.join(self.save_dir, "loss_curve.png"),
            )
        dist_util.barrier()

    def _save_weights(self, filename, params, rate):
        state_dict = self.mp_trainer.master_params_to_state_dict(params)
        path = os.path.join(self.save_dir, filename)
        digest = _atomic_save(state_dict, path)
        sidecar = dict(portable_paths(self.metadata), step=self.step, weights=filename, ema_rate=rate,
                       sha256=digest)
        atomic_write_bytes(os.path.splitext(path)[0] + ".json",
                           json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- helpers


def seed_rank_streams(seed):
    """Seed torch, numpy and ``random`` with ``seed + 1_000_003 * rank``: every rank draws its
    own noise stream (call after building the model, whose initial weights rank 0 broadcasts)."""
    rank_seed = seed + 1_000_003 * dist_util.rank()
    th.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


def data_record(data_dir, files, split="train"):
    """A sidecar's record of a data directory: ``data_dir`` relative to the repository when
    inside it, else its base name; ``files`` (the sample sources used); ``datasets``, how they
    were made (:func:`~guided_diffusion.image_datasets.describe_datasets`)."""
    return dict(data_dir=repository_path(data_dir), files=files,
                datasets=describe_datasets(data_dir, split))


def ema_filename(rate, step):
    """``ema_{rate}_{step:06d}.pt`` (upstream name)."""
    return f"ema_{rate}_{step:06d}.pt"


def parse_resume_step_from_filename(filename):
    """The step NNNNNN of ``.../modelNNNNNN.pt``; 0 if the name has no such number."""
    match = re.search(r"model(\d+)\.pt$", os.path.basename(filename))
    return int(match.group(1)) if match else 0


def find_resume_checkpoint(directory, ema_rates=None):
    """
    The latest ``modelNNNNNN.pt`` in ``directory`` whose ``opt``/``state`` files (and EMA
    files for ``ema_rates``, if given) exist; None when there is none.
    """
    if not directory or not os.path.isdir(directory):
        return None
    steps = sorted(
        (parse_resume_step_from_filename(p), p)
        for p in glob.glob(os.path.join(directory, "model[0-9]*.pt"))
        if re.fullmatch(r"model\d+\.pt", os.path.basename(p))
    )
    for step, path in reversed(steps):
        needed = [f"opt{step:06d}.pt", f"state{step:06d}.pt"]
        needed += [ema_filename(rate, step) for rate in ema_rates or []]
        if all(os.path.exists(os.path.join(directory, n)) for n in needed):
            return path
    return None


def log_loss_dict(diffusion, ts, losses):
    """Log the mean of each loss term and its mean per quarter of the diffusion steps."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().float().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)


def _atomic_save(obj, path):
    """``torch.save`` to ``path`` atomically; returns the sha256 of the written bytes."""
    buffer = io.BytesIO()
    th.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _get_rng_state():
    """This process's RNG states as tensors and plain numbers (``weights_only``-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": th.get_rng_state(),
        "cuda": th.cuda.get_rng_state_all() if th.cuda.is_available() else [],
        "numpy": {
            "keys": th.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": py_version, "state": th.tensor(py_state, dtype=th.int64), "gauss": py_gauss},
    }


def _set_rng_state(state):
    th.set_rng_state(state["torch"])
    if state["cuda"] and th.cuda.is_available():
        th.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


def plot_loss_curve(progress_csv, out_png):
    """Plot the ``loss`` column of ``progress_csv`` against ``step`` (no-op without data)."""
    if not os.path.exists(progress_csv):
        return
    with open(progress_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss") and r.get("step")]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([float(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out_png, lambda temporary: fig.savefig(temporary, dpi=100, format="png"), ".png")
    finally:
        plt.close(fig)
