"""guided_diffusion.checkpoint_hub.fetch and scripts/fetch_checkpoint.py: verified, atomic fetches
of checkpoints (local files and file:// URLs only: nothing here touches the network)."""

import contextlib
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from guided_diffusion import checkpoint_hub as hub
from guided_diffusion import script_util as su
from guided_diffusion.checkpoints import read_metadata
from tests.mpi_helpers import REPO

torch.set_num_threads(1)

SCRIPT = os.path.join(REPO, "scripts", "fetch_checkpoint.py")

TINY_FLAGS = dict(su.sr_model_and_diffusion_defaults(), num_channels=8, channel_mult="1,2",
                  num_res_blocks=1, attention_resolutions="", diffusion_steps=100)
#: From the published 3D DDPM's test command (the brief's list, typed as script_util flags).
PUBLISHED = dict(attention_resolutions="1000", large_size=96, small_size=96, num_channels=128,
                 num_head_channels=64, learn_sigma=True, resblock_updown=True,
                 use_scale_shift_norm=True, diffusion_steps=1000, noise_schedule="linear")


def _save_tiny(path):
    torch.manual_seed(0)
    model = su.sr_create_model_and_diffusion(**TINY_FLAGS)[0]
    torch.save(model.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_published_shaped(path):
    """A state_dict with the published model's keys and shapes whose tensors are expanded
    scalars: ~120 kB on disk, and the 207M-parameter model is only built on the meta device."""
    with torch.device("meta"):
        model = su.sr_create_model_and_diffusion(**su.sr_model_and_diffusion_defaults())[0]
    state = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _script(*argv, prelude=""):
    """Run scripts/fetch_checkpoint.py in a fresh interpreter (``prelude``: Python run first,
    e.g. to inject a fault into the library); returns the CompletedProcess."""
    code = prelude + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, SCRIPT, *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _fetch_error(*args, **kwargs):
    with pytest.raises(hub.FetchError) as error:
        hub.fetch(*args, **kwargs)
    return str(error.value)


@pytest.fixture
def tiny(tmp_path):
    source = tmp_path / "src" / "tiny.pt"
    source.parent.mkdir()
    return source, _save_tiny(source), tmp_path / "dest"


def test_script_fetches_a_file_url_with_sidecar(tiny):
    source, digest, dest = tiny
    sidecar = dict(flags=TINY_FLAGS, cond="paired", voxel_mm=3.3, sha256=digest)
    source.with_suffix(".json").write_text(json.dumps(sidecar))
    proc = _script(source.as_uri(), "--dest", dest)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(dest)) == ["tiny.json", "tiny.pt"]
    assert (dest / "tiny.pt").read_bytes() == source.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (dest / "tiny.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    written = read_metadata(dest / "tiny.pt")
    assert written["sha256"] == digest and written["voxel_mm"] == 3.3
    assert written["weights"] == "tiny.pt" and written["flags"] == TINY_FLAGS
    assert f"verified against {source.with_suffix('.json').as_uri()}" in proc.stdout
    assert "--num_channels 8" in proc.stdout and "--channel_mult 1,2" in proc.stdout
    assert "--model_path" in proc.stdout and "tiny.pt" in proc.stdout


def test_script_errors_are_one_line_with_status_2(tiny):
    source, _, dest = tiny
    missing = source.parent / "absent.pt"
    proc = _script(missing, "--dest", dest)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"fetch_checkpoint.py: error: {missing}: no such file\n"
    proc = _script(source, "--published", "--json", source.with_suffix(".json"), "--dest", dest)
    assert proc.returncode == 2 and "--published writes its own sidecar" in proc.stderr
    assert not dest.exists() or os.listdir(dest) == []


def test_script_interrupt_exits_130_and_leaves_nothing(tiny):
    source, _, dest = tiny
    prelude = ("import guided_diffusion.checkpoint_hub as hub\n"
               "def interrupted(path):\n    raise KeyboardInterrupt\n"
               "hub.sha256_file = interrupted")
    proc = _script(source, "--dest", dest, prelude=prelude)
    assert proc.returncode == 130 and "interrupted; nothing was written" in proc.stderr
    assert os.listdir(dest) == []


def test_sha256_flag_and_flags_inferred_without_sidecar(tiny):
    source, digest, dest = tiny
    result = hub.fetch(str(source), str(dest), name="renamed.pt", sha256=digest.upper())
    assert os.listdir(dest) == ["renamed.pt"]
    assert result["sidecar"] is None and result["inferred"] and result["verified_by"] == ["--sha256"]
    out = "\n".join(hub.fetch_report(result))
    assert "verified against --sha256" in out
    assert "no sidecar" in out and "published" in out and "1.65 mm" in out
    for flag in ("--num_channels 8", "--channel_mult 1,2", "--num_res_blocks 1", "--dims 3",
                 "--learn_sigma True", "--resblock_updown True"):
        assert flag in out


@pytest.mark.parametrize("where", ["flag", "sidecar"])
def test_wrong_hash_is_refused_and_nothing_written(tiny, where):
    source, digest, dest = tiny
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    kwargs = {}
    if where == "flag":
        kwargs["sha256"] = wrong
    else:
        source.with_suffix(".json").write_text(json.dumps(dict(flags=TINY_FLAGS, cond="paired",
                                                               sha256=wrong)))
    message = _fetch_error(str(source), str(dest), **kwargs)
    assert f"sha256 {digest} does not match {wrong}" in message and "\n" not in message
    assert not dest.exists() or os.listdir(dest) == []


def test_failed_replacement_keeps_the_old_file(tiny):
    source, digest, dest = tiny
    hub.fetch(str(source), str(dest))
    before = (dest / "tiny.pt").read_bytes()
    assert "already exists (use --force" in _fetch_error(str(source), str(dest))
    assert "does not match" in _fetch_error(str(source), str(dest), force=True, sha256="ab" * 32)
    assert os.listdir(dest) == ["tiny.pt"] and (dest / "tiny.pt").read_bytes() == before


def test_force_drops_a_stale_sidecar(tiny):
    source, digest, dest = tiny
    sidecar = source.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(flags=TINY_FLAGS, cond="paired")))
    hub.fetch(str(source), str(dest))
    assert read_metadata(dest / "tiny.pt")["sha256"] == digest  # filled in from the file
    sidecar.unlink()
    hub.fetch(str(source), str(dest), force=True)
    assert os.listdir(dest) == ["tiny.pt"]


def test_missing_sources_are_clear_errors(tiny):
    source, _, dest = tiny
    with pytest.raises(FileNotFoundError, match="none.json: no such file"):
        hub.fetch(str(source), str(dest), json_source=str(source.parent / "none.json"))
    assert "unsupported source" in _fetch_error("ftp://host/tiny.pt", str(dest))
    assert not dest.exists() or os.listdir(dest) == []


def test_weights_that_fit_nothing_are_refused(tmp_path):
    source, dest = tmp_path / "junk.pt", tmp_path / "dest"
    torch.save({"weight": torch.zeros(3)}, source)
    assert "no sidecar and not a guided-diffusion UNet" in _fetch_error(str(source), str(dest))
    source.write_bytes(b"not a checkpoint")
    message = _fetch_error(str(source), str(dest))
    assert "not a loadable weights file" in message and "\n" not in message
    assert os.listdir(dest) == []


def test_interrupt_and_truncated_transfer_leave_nothing(tiny, monkeypatch):
    source, _, dest = tiny

    def interrupted(path):
        assert os.path.getsize(path) == os.path.getsize(source)  # the copy was complete
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(hub, "sha256_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            hub.fetch(str(source), str(dest))
    assert os.listdir(dest) == []

    real_open = hub.open_source

    @contextlib.contextmanager
    def announces_more(src):
        with real_open(src) as (stream, size):
            yield stream, size + 10

    monkeypatch.setattr(hub, "open_source", announces_more)
    message = _fetch_error(str(source), str(dest))
    assert f"transfer stopped after {source.stat().st_size} of" in message
    assert os.listdir(dest) == []


def test_published_writes_the_published_sidecar(tmp_path):
    source, dest = tmp_path / "model.pt", tmp_path / "dest"
    digest = _save_published_shaped(source)
    result = hub.fetch(str(source), str(dest), name="published_3d_ddpm", published=True, sha256=digest)
    assert sorted(os.listdir(dest)) == ["published_3d_ddpm.json", "published_3d_ddpm.pt"]
    metadata = read_metadata(dest / "published_3d_ddpm.pt")
    assert metadata["cond"] == "paired" and metadata["sha256"] == digest
    assert {k: metadata["flags"][k] for k in PUBLISHED} == PUBLISHED
    assert metadata["normalisation"] == dict(transform="linear", clip=16.0, scale=16.0, range=[0.0, 1.0])
    assert metadata["voxel_mm"] == 1.65 and metadata["patch_size_zxy"] == [96, 192, 288]
    # the source is recorded without this machine's path
    assert metadata["origin"].endswith("fetched from model.pt") and hub.absolute_paths(metadata) == []
    out = "\n".join(hub.fetch_report(result))
    assert "--num_head_channels 64" in out and "--attention_resolutions 1000" in out
    assert "published_3d_ddpm.pt" in out


def test_published_refuses_other_weights(tiny):
    source, _, dest = tiny
    message = _fetch_error(str(source), str(dest), published=True)
    assert "do not fit the published flags" in message and "\n" not in message
    assert os.listdir(dest) == []


def test_sidecar_locations_and_help():
    assert hub.source_sidecar("gs://bucket/run/model.pt") == "gs://bucket/run/model.json"
    assert (hub.source_sidecar("https://host/w/model.pt?sig=a.b")
            == "https://host/w/model.json?sig=a.b")
    assert hub.source_sidecar("file:///x/y/m.pt") == "file:///x/y/m.json"
    assert hub.source_sidecar("/x/y/m.pt") == "/x/y/m.json"
    assert hub.source_stem("https://host/w/ema_0.9999_100.pt?sig=1") == "ema_0.9999_100"
    assert hub._recorded_source("https://host/w/model.pt?sig=secret") == "https://host/w/model.pt"
    proc = _script("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--name published_3d_ddpm --published" in text
    assert ("--attention_resolutions 1000 --large_size 96 --small_size 96 --num_channels 128 "
            "--num_head_channels 64 --learn_sigma True --resblock_updown True "
            "--use_scale_shift_norm True --diffusion_steps 1000 --noise_schedule linear") in text


def test_repository_paths_and_absolute_path_detection(tmp_path):
    assert hub.repository_path(REPO / "checkpoint" / "demo_paired.pt") == os.path.join("checkpoint", "demo_paired.pt")
    assert hub.repository_path(tmp_path / "runs" / "model000100.pt") == "model000100.pt"
    data_dir, npz = str(tmp_path / "data3d"), str(tmp_path / "a" / "b.npz")  # absolute, made at run time
    record = {"data_dir": data_dir, "note": f"from C:\\data\\x.pt and {npz}",
              "url": "https://host/a/b.pt", "unit": "1/mm", "files": [170, "mean/std"]}
    assert hub.absolute_paths(record) == [data_dir, "C:\\data\\x.pt", npz]
    portable = hub.portable_paths(record)
    assert portable == dict(record, data_dir="data3d", note="from x.pt and b.npz")
    assert hub.absolute_paths(portable) == []
