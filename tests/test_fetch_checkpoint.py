"""scripts/fetch_checkpoint.py: verified, atomic fetches of checkpoints (local files and file://
URLs only: nothing here touches the network)."""

import contextlib
import hashlib
import importlib.util
import json
import os

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.checkpoints import read_metadata
from tests.mpi_helpers import REPO

torch.set_num_threads(1)

SCRIPT = os.path.join(REPO, "scripts", "fetch_checkpoint.py")
spec = importlib.util.spec_from_file_location("fetch_checkpoint", SCRIPT)
fetch_checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_checkpoint)

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


def _run(capsys, *argv):
    status = fetch_checkpoint.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def tiny(tmp_path):
    source = tmp_path / "src" / "tiny.pt"
    source.parent.mkdir()
    return source, _save_tiny(source), tmp_path / "dest"


def test_file_url_with_sidecar(tiny, capsys):
    source, digest, dest = tiny
    sidecar = dict(flags=TINY_FLAGS, cond="paired", voxel_mm=3.3, sha256=digest)
    source.with_suffix(".json").write_text(json.dumps(sidecar))
    status, out, err = _run(capsys, source.as_uri(), "--dest", dest)
    assert status == 0, err
    assert sorted(os.listdir(dest)) == ["tiny.json", "tiny.pt"]
    assert (dest / "tiny.pt").read_bytes() == source.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (dest / "tiny.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    written = read_metadata(dest / "tiny.pt")
    assert written["sha256"] == digest and written["voxel_mm"] == 3.3
    assert written["weights"] == "tiny.pt" and written["flags"] == TINY_FLAGS
    assert f"verified against {source.with_suffix('.json').as_uri()}" in out
    assert "--num_channels 8" in out and "--channel_mult 1,2" in out
    assert "--model_path" in out and "tiny.pt" in out


def test_sha256_flag_and_flags_inferred_without_sidecar(tiny, capsys):
    source, digest, dest = tiny
    status, out, err = _run(capsys, source, "--sha256", digest.upper(), "--dest", dest,
                            "--name", "renamed.pt")
    assert status == 0, err
    assert os.listdir(dest) == ["renamed.pt"]
    assert "verified against --sha256" in out
    assert "no sidecar" in out and "published" in out and "1.65 mm" in out
    for flag in ("--num_channels 8", "--channel_mult 1,2", "--num_res_blocks 1", "--dims 3",
                 "--learn_sigma True", "--resblock_updown True"):
        assert flag in out


@pytest.mark.parametrize("where", ["flag", "sidecar"])
def test_wrong_hash_exit_2_and_nothing_written(tiny, capsys, where):
    source, digest, dest = tiny
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    args = [source, "--dest", dest]
    if where == "flag":
        args += ["--sha256", wrong]
    else:
        source.with_suffix(".json").write_text(json.dumps(dict(flags=TINY_FLAGS, cond="paired",
                                                               sha256=wrong)))
    status, out, err = _run(capsys, *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and f"sha256 {digest} does not match {wrong}" in err
    assert not dest.exists() or os.listdir(dest) == []


def test_failed_replacement_keeps_the_old_file(tiny, capsys):
    source, digest, dest = tiny
    assert _run(capsys, source, "--dest", dest)[0] == 0
    before = (dest / "tiny.pt").read_bytes()
    status, _, err = _run(capsys, source, "--dest", dest)
    assert status == 2 and "already exists (use --force" in err
    status, _, err = _run(capsys, source, "--dest", dest, "--force", "--sha256", "ab" * 32)
    assert status == 2 and "does not match" in err
    assert os.listdir(dest) == ["tiny.pt"] and (dest / "tiny.pt").read_bytes() == before


def test_force_drops_a_stale_sidecar(tiny, capsys):
    source, digest, dest = tiny
    sidecar = source.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(flags=TINY_FLAGS, cond="paired")))
    assert _run(capsys, source, "--dest", dest)[0] == 0
    assert read_metadata(dest / "tiny.pt")["sha256"] == digest  # filled in from the file
    sidecar.unlink()
    assert _run(capsys, source, "--dest", dest, "--force")[0] == 0
    assert os.listdir(dest) == ["tiny.pt"]


def test_missing_sources_are_clear_errors(tiny, capsys):
    source, _, dest = tiny
    missing = source.parent / "absent.pt"
    status, _, err = _run(capsys, missing, "--dest", dest)
    assert status == 2 and err == f"fetch_checkpoint.py: error: {missing}: no such file\n"
    status, _, err = _run(capsys, source, "--dest", dest, "--json", source.parent / "none.json")
    assert status == 2 and "none.json: no such file" in err
    status, _, err = _run(capsys, "ftp://host/tiny.pt", "--dest", dest)
    assert status == 2 and "unsupported source" in err
    assert not dest.exists() or os.listdir(dest) == []


def test_weights_that_fit_nothing_are_refused(tmp_path, capsys):
    source, dest = tmp_path / "junk.pt", tmp_path / "dest"
    torch.save({"weight": torch.zeros(3)}, source)
    status, _, err = _run(capsys, source, "--dest", dest)
    assert status == 2 and "no sidecar and not a guided-diffusion UNet" in err
    source.write_bytes(b"not a checkpoint")
    status, _, err = _run(capsys, source, "--dest", dest)
    assert status == 2 and "not a loadable weights file" in err and err.count("\n") == 1
    assert os.listdir(dest) == []


def test_interrupt_and_truncated_transfer_leave_nothing(tiny, capsys, monkeypatch):
    source, _, dest = tiny

    def interrupted(path):
        assert os.path.getsize(path) == os.path.getsize(source)  # the copy was complete
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(fetch_checkpoint, "sha256_file", interrupted)
        status, _, err = _run(capsys, source, "--dest", dest)
    assert status == 130 and "interrupted" in err
    assert os.listdir(dest) == []

    real_open = fetch_checkpoint.open_source

    @contextlib.contextmanager
    def announces_more(src):
        with real_open(src) as (stream, size):
            yield stream, size + 10

    monkeypatch.setattr(fetch_checkpoint, "open_source", announces_more)
    status, _, err = _run(capsys, source, "--dest", dest)
    assert status == 2 and f"transfer stopped after {source.stat().st_size} of" in err
    assert os.listdir(dest) == []


def test_published_writes_the_published_sidecar(tmp_path, capsys):
    source, dest = tmp_path / "model.pt", tmp_path / "dest"
    digest = _save_published_shaped(source)
    status, out, err = _run(capsys, source, "--name", "published_3d_ddpm", "--published",
                            "--dest", dest, "--sha256", digest)
    assert status == 0, err
    assert sorted(os.listdir(dest)) == ["published_3d_ddpm.json", "published_3d_ddpm.pt"]
    metadata = read_metadata(dest / "published_3d_ddpm.pt")
    assert metadata["cond"] == "paired" and metadata["sha256"] == digest
    assert {k: metadata["flags"][k] for k in PUBLISHED} == PUBLISHED
    assert metadata["normalisation"] == dict(clip=16.0, scale=16.0, range=[0.0, 1.0])
    assert metadata["voxel_mm"] == 1.65 and metadata["patch_size_zxy"] == [96, 192, 288]
    assert "--num_head_channels 64" in out and "--attention_resolutions 1000" in out
    assert "published_3d_ddpm.pt" in out


def test_published_refuses_other_weights(tiny, capsys):
    source, _, dest = tiny
    status, _, err = _run(capsys, source, "--published", "--dest", dest)
    assert status == 2 and "do not fit the published flags" in err and err.count("\n") == 1
    assert os.listdir(dest) == []


def test_sidecar_locations_and_help(capsys):
    assert fetch_checkpoint.source_sidecar("gs://bucket/run/model.pt") == "gs://bucket/run/model.json"
    assert (fetch_checkpoint.source_sidecar("https://host/w/model.pt?sig=a.b")
            == "https://host/w/model.json?sig=a.b")
    assert fetch_checkpoint.source_sidecar("file:///x/y/m.pt") == "file:///x/y/m.json"
    assert fetch_checkpoint.source_sidecar("/x/y/m.pt") == "/x/y/m.json"
    assert fetch_checkpoint.source_stem("https://host/w/ema_0.9999_100.pt?sig=1") == "ema_0.9999_100"
    with pytest.raises(SystemExit) as exit_info:
        fetch_checkpoint.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--name published_3d_ddpm --published" in text
    assert ("--attention_resolutions 1000 --large_size 96 --small_size 96 --num_channels 128 "
            "--num_head_channels 64 --learn_sigma True --resblock_updown True "
            "--use_scale_shift_norm True --diffusion_steps 1000 --noise_schedule linear") in text
