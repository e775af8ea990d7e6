"""
Distributed set-up on top of MPI.

Every entry point calls :func:`setup_dist` once. Launched by ``mpiexec -n N`` (or ``srun``),
it builds a ``torch.distributed`` process group over the N MPI ranks: backend ``gloo`` for CPU
tensors and, when CUDA is present, ``nccl`` for CUDA tensors (one group serving both). Rank 0
picks the rendezvous address (its host, or loopback when all ranks share one node) and a free
TCP port and broadcasts both over MPI.

Without ``mpiexec`` (one MPI rank), or when ``mpi4py`` cannot be imported, the process forms a
single-rank group on an in-memory store, so ``dist.get_rank()``, ``all_gather``, ``barrier``
and DDP behave the same everywhere.

Teardown: entry points call :func:`cleanup` when their work is done (every rank waits, then
the group is destroyed); :func:`setup_dist` also registers an exit hook that destroys a group
left behind (after an error). A gloo group alive at interpreter shutdown can abort the
process (SIGABRT, "terminate called without an active exception").

Device: the GPU of a rank is its node-local rank (MPI shared-memory communicator) modulo the
number of GPUs the node makes visible; CPU otherwise. On CPU the torch thread count is split
between the ranks of a node unless the user chose it (``threads`` argument or
``OMP_NUM_THREADS``).
"""

import atexit
import io
import os
import socket

import blobfile as bf
import torch as th
import torch.distributed as dist

try:
    from mpi4py import MPI
except ImportError:  # pure single-process use
    MPI = None

# MPI messages are limited to 2**31 elements; broadcast large files in pieces.
BROADCAST_CHUNK_BYTES = 2**30

_state = {}


def _comm_world():
    return MPI.COMM_WORLD if MPI is not None else None


def _local_comm():
    """
    The communicator of the ranks that share this node, or None without MPI. Its creation
    is collective over all ranks (done by :func:`setup_dist`).
    """
    if "local_comm" not in _state:
        comm = _comm_world()
        _state["local_comm"] = (
            comm.Split_type(MPI.COMM_TYPE_SHARED) if comm is not None else None
        )
    return _state["local_comm"]


def local_rank():
    """Rank of this process among the ranks of its node."""
    comm = _local_comm()
    return comm.Get_rank() if comm is not None else 0


def local_world_size():
    """Number of ranks on this node."""
    comm = _local_comm()
    return comm.Get_size() if comm is not None else 1


def setup_dist(threads=None):
    """
    Set up the process group, the device and (on CPU) the thread count. Idempotent.

    :param threads: torch intra-op threads for this rank on CPU; None chooses
        ``max(1, cores of this process's affinity // ranks on this node)`` unless the
        environment sets ``OMP_NUM_THREADS``.
    """
    if dist.is_initialized():
        return
    comm = _comm_world()
    size = comm.Get_size() if comm is not None else 1
    _local_comm()  # collective on first use: every rank builds it here
    _select_device()
    backend = "cpu:gloo,cuda:nccl" if th.cuda.is_available() else "gloo"
    if size > 1:
        address = comm.bcast(_rendezvous_address() if comm.Get_rank() == 0 else None, root=0)
        port = comm.bcast(_find_free_port() if comm.Get_rank() == 0 else None, root=0)
        os.environ["MASTER_ADDR"] = address
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{address}:{port}",
            rank=comm.Get_rank(),
            world_size=size,
        )
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if not _state.get("exit_hook"):
        _state["exit_hook"] = atexit.register(_destroy_group)
    _set_threads(threads)
    from . import logger  # late import: logger asks this module for the rank

    logger.log(describe())


def cleanup():
    """Wait for every rank, then destroy the process group (end of a run; no-op without one)."""
    if dist.is_initialized():
        dist.barrier()
    _destroy_group()


def _destroy_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def describe():
    """One line naming rank, world size, node-local rank, device, threads and backend."""
    return (
        f"rank {rank()}/{world_size()} (local {local_rank()}/{local_world_size()}) "
        f"device {dev()} threads {th.get_num_threads()} "
        f"backend {dist.get_backend() if dist.is_initialized() else 'none'}"
    )


def _select_device():
    if th.cuda.is_available():
        index = local_rank() % th.cuda.device_count()
        th.cuda.set_device(index)
        _state["device"] = th.device("cuda", index)
    else:
        _state["device"] = th.device("cpu")


def _set_threads(threads):
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    if threads is None:
        if th.cuda.is_available():
            return
        threads = max(1, len(os.sched_getaffinity(0)) // local_world_size())
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    th.set_num_threads(int(threads))


def _rendezvous_address():
    """Loopback when every rank is on this node, else this host's address (rank 0 only)."""
    if MPI is None or local_world_size() == _comm_world().Get_size():
        return "127.0.0.1"
    return socket.gethostbyname(socket.getfqdn())


def _find_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def dev():
    """The torch device of this rank (set by :func:`setup_dist`; CUDA if present, else CPU)."""
    if "device" not in _state:
        _select_device()
    return _state["device"]


def rank():
    """Global rank (0 before set-up without MPI)."""
    if dist.is_initialized():
        return dist.get_rank()
    comm = _comm_world()
    return comm.Get_rank() if comm is not None else 0


def world_size():
    """Number of ranks (1 before set-up without MPI)."""
    if dist.is_initialized():
        return dist.get_world_size()
    comm = _comm_world()
    return comm.Get_size() if comm is not None else 1


def is_main():
    """True on rank 0."""
    return rank() == 0


def barrier():
    """Wait for all ranks (no-op for a single process without a group)."""
    if dist.is_initialized():
        dist.barrier()
    elif _comm_world() is not None:
        _comm_world().Barrier()


def _broadcast_bytes(read, chunk_bytes=None):
    """
    Call ``read()`` on rank 0 only and return its bytes on every MPI rank, sent in pieces
    of ``chunk_bytes`` (default :data:`BROADCAST_CHUNK_BYTES`).

    An exception raised by ``read`` on rank 0 is re-raised on every rank (no rank hangs).
    """
    comm = _comm_world()
    if comm is None or comm.Get_size() == 1:
        return read()
    chunk_bytes = chunk_bytes or BROADCAST_CHUNK_BYTES
    if comm.Get_rank() == 0:
        try:
            data, error = read(), None
        except Exception as exc:  # forwarded to all ranks below
            data, error = b"", exc
        header = (None, repr(error)) if error else (-(-len(data) // chunk_bytes), None)
        comm.bcast(header, root=0)
        if error:
            raise error
        for start in range(0, len(data), chunk_bytes):
            comm.bcast(data[start : start + chunk_bytes], root=0)
        return data
    num_chunks, error = comm.bcast(None, root=0)
    if error:
        raise RuntimeError(f"rank 0 failed to read the file: {error}")
    return b"".join(comm.bcast(None, root=0) for _ in range(num_chunks))


def load_state_dict(path, **kwargs):
    """
    Load a torch file read once (on rank 0, through blobfile) and broadcast to all ranks.

    Always ``weights_only=True``: only tensors and plain containers are accepted.
    ``kwargs`` go to ``torch.load`` (e.g. ``map_location``).
    """
    if kwargs.pop("weights_only", True) is not True:
        raise ValueError("load_state_dict only loads with weights_only=True")

    def read():
        with bf.BlobFile(path, "rb") as f:
            return f.read()

    data = _broadcast_bytes(read)
    return th.load(io.BytesIO(data), weights_only=True, **kwargs)


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank; all ranks must call."""
    if world_size() == 1:
        return obj
    holder = [obj if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sync_params(params):
    """Overwrite a sequence of tensors on every rank with rank 0's values."""
    if world_size() == 1:
        return
    with th.no_grad():
        for p in params:
            dist.broadcast(p, 0)
