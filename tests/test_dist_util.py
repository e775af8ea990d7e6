import os
import subprocess
import sys

import pytest
import torch as th
import torch.distributed as dist

from guided_diffusion import dist_util
from tests.mpi_helpers import REPO, run_mpi


@pytest.fixture(scope="module")
def single_process_group():
    # Keep this pytest process's thread count: the automatic choice is checked under mpiexec.
    dist_util.setup_dist(threads=th.get_num_threads())
    return dist.group.WORLD


def test_single_process_group_works(single_process_group):
    dist_util.setup_dist()  # idempotent
    assert dist.group.WORLD is single_process_group
    assert (dist_util.rank(), dist_util.world_size(), dist_util.is_main()) == (0, 1, True)
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    x = th.tensor([3.0, 4.0])
    out = [th.zeros(2)]
    dist.all_gather(out, x)
    assert th.equal(out[0], x)
    dist_util.barrier()
    expected = "cuda" if th.cuda.is_available() else "cpu"
    assert dist_util.dev().type == expected


def test_cleanup_destroys_the_group_and_setup_works_again():
    dist_util.setup_dist(threads=th.get_num_threads())
    dist_util.cleanup()
    assert not dist.is_initialized()
    dist_util.cleanup()  # no group: no-op
    dist_util.setup_dist(threads=th.get_num_threads())
    assert dist_util.world_size() == 1


def test_load_state_dict_single_process(single_process_group, tmp_path):
    state = {"w": th.arange(6.0).reshape(2, 3), "b": th.tensor([1, 2], dtype=th.int64)}
    path = tmp_path / "w.pt"
    th.save(state, path)
    loaded = dist_util.load_state_dict(str(path), map_location="cpu")
    assert loaded.keys() == state.keys()
    assert all(th.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="weights_only"):
        dist_util.load_state_dict(str(path), weights_only=False)
    with pytest.raises(Exception):
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))


def test_load_state_dict_refuses_pickled_objects(single_process_group, tmp_path):
    path = tmp_path / "obj.pt"
    th.save({"obj": object.__new__(_Dummy)}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        dist_util.load_state_dict(str(path))


class _Dummy:
    pass


def test_setup_without_mpi4py():
    """A pure single process (mpi4py import fails) still gets a working group."""
    script = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import torch, torch.distributed as dist\n"
        "from guided_diffusion import dist_util\n"
        "assert dist_util.MPI is None\n"
        "dist_util.setup_dist(threads=1)\n"
        "out = [torch.zeros(1)]; dist.all_gather(out, torch.ones(1))\n"
        "print(dist_util.rank(), dist_util.world_size(), out[0].item(), torch.get_num_threads())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-4:] == ["0", "1", "1.0", "1"]


MPI_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from guided_diffusion import dist_util

dist_util.setup_dist()
dist_util.setup_dist()  # idempotent
r, n = dist_util.rank(), dist_util.world_size()
gathered = [torch.zeros(1) for _ in range(n)]
dist.all_gather(gathered, torch.tensor([float(r)]))

dist_util.BROADCAST_CHUNK_BYTES = 1000  # force many chunks
path = sys.argv[1]
if r == 0:
    torch.manual_seed(0)
    torch.save({"w": torch.randn(40, 50), "step": torch.tensor(7)}, path)
dist_util.barrier()
state = dist_util.load_state_dict(path, map_location="cpu")
try:
    dist_util.load_state_dict(path + ".missing")
    missing = "no error"
except Exception as exc:
    missing = type(exc).__name__
dist_util.barrier()
dist_util.cleanup()
print("RESULT " + json.dumps(dict(
    group_after_cleanup=torch.distributed.is_initialized(),
    rank=r, world=n, local_rank=dist_util.local_rank(), local_size=dist_util.local_world_size(),
    device=str(dist_util.dev()), threads=torch.get_num_threads(),
    affinity=len(os.sched_getaffinity(0)), gathered=[g.item() for g in gathered],
    w=state["w"].flatten().tolist(), step=int(state["step"]), missing=missing,
)), flush=True)
"""


@pytest.mark.mpi
def test_mpiexec_two_ranks(tmp_path):
    results = run_mpi(MPI_SCRIPT, tmp_path, n=2, args=[tmp_path / "ckpt.pt"])
    th.manual_seed(0)
    expected_w = th.randn(40, 50).flatten().tolist()
    for r, res in enumerate(results):
        assert (res["rank"], res["world"]) == (r, 2)
        assert (res["local_rank"], res["local_size"]) == (r, 2)
        assert res["gathered"] == [0.0, 1.0]
        assert res["threads"] == max(1, res["affinity"] // 2)
        assert res["device"] == ("cuda:%d" % (r % th.cuda.device_count()) if th.cuda.is_available() else "cpu")
        assert res["w"] == expected_w and res["step"] == 7
        assert res["missing"] != "no error"
        assert res["group_after_cleanup"] is False  # destroyed: no gloo threads left at exit
