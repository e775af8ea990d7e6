"""
Key-value and text logger in the shape of guided-diffusion's (from OpenAI baselines).

``configure(dir, format_strs)`` chooses the outputs: ``stdout`` (a table per ``dumpkvs``),
``log`` (``log.txt``), ``csv`` (``progress.csv``, one row per ``dumpkvs``, columns added as new
keys appear) and ``json`` (``progress.json``, one object per line). Only rank 0 writes unless
``all_ranks=True`` (other ranks then write ``*-rankNNN`` files). With ``comm`` (an mpi4py
communicator) ``dumpkvs`` averages every value over the ranks, weighted by how many times each
rank logged it.
"""

import datetime
import json
import os
import sys
import tempfile
from collections import defaultdict

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40


class HumanOutputFormat:
    """A boxed key/value table per dump, plain lines for ``log``."""

    def __init__(self, file, own_file):
        self.file = file
        self.own_file = own_file

    def writekvs(self, kvs):
        if not kvs:
            return
        rows = [(_truncate(k), _truncate(_format_value(v))) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        dashes = "-" * (kw + vw + 7)
        lines = [dashes] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [dashes]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class CSVOutputFormat:
    """``progress.csv``: a header row then one row per dump; new keys extend all rows."""

    def __init__(self, filename):
        self.file = open(filename, "w+t")
        self.keys = []

    def writekvs(self, kvs):
        extra = sorted(kvs.keys() - set(self.keys))
        if extra:
            self.keys.extend(extra)
            self.file.seek(0)
            old_rows = self.file.read().splitlines()[1:]
            self.file.seek(0)
            self.file.truncate()
            self.file.write(",".join(self.keys) + "\n")
            for row in old_rows:
                self.file.write(row + "," * len(extra) + "\n")
        values = ["" if kvs.get(k) is None else str(kvs[k]) for k in self.keys]
        self.file.write(",".join(values) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class JSONOutputFormat:
    """``progress.json``: one JSON object per dump."""

    def __init__(self, filename):
        self.file = open(filename, "wt")

    def writekvs(self, kvs):
        row = {k: float(v) if hasattr(v, "dtype") else v for k, v in kvs.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def _format_value(v):
    return "%-8.3g" % v if hasattr(v, "__float__") else str(v)


def _truncate(s, maxlen=30):
    return s[: maxlen - 3] + "..." if len(s) > maxlen else s


def make_output_format(fmt, directory, suffix=""):
    """Build one output (``stdout``, ``log``, ``csv``, ``json``) writing into ``directory``."""
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout, own_file=False)
    os.makedirs(directory, exist_ok=True)
    if fmt == "log":
        return HumanOutputFormat(open(os.path.join(directory, f"log{suffix}.txt"), "wt"), True)
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(directory, f"progress{suffix}.csv"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(directory, f"progress{suffix}.json"))
    raise ValueError(f"unknown log format {fmt!r} (expected stdout, log, csv or json)")


class Logger:
    """Accumulates key/values between dumps and forwards text and tables to its outputs."""

    CURRENT = None

    def __init__(self, directory, output_formats, comm=None):
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = directory
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        old, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self):
        kvs = dict(self.name2val)
        if self.comm is not None:
            kvs = _weighted_mean_over_ranks(
                self.comm, {k: (v, self.name2cnt.get(k, 1)) for k, v in kvs.items()}
            )
        for fmt in self.output_formats:
            fmt.writekvs(kvs)
        self.name2val.clear()
        self.name2cnt.clear()
        return kvs

    def log(self, *args, level=INFO):
        if level >= self.level:
            for fmt in self.output_formats:
                if isinstance(fmt, HumanOutputFormat):
                    fmt.writeseq([str(a) for a in args])

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def _weighted_mean_over_ranks(comm, name2valcount):
    """Mean of each key over all ranks, weighted by per-rank counts (every rank gets it)."""
    sums, counts = defaultdict(float), defaultdict(float)
    for rank_values in comm.allgather(name2valcount):
        for name, (val, cnt) in rank_values.items():
            sums[name] += float(val) * cnt
            counts[name] += cnt
    return {name: sums[name] / counts[name] for name in sums}


def _rank():
    from . import dist_util  # late import: dist_util logs through this module

    return dist_util.rank()


def configure(dir=None, format_strs=None, comm=None, all_ranks=False):
    """
    Start a new logger writing into ``dir``.

    :param dir: output directory; default ``$OPENAI_LOGDIR`` or a new folder under the
        system temporary directory.
    :param format_strs: list of outputs; default ``$OPENAI_LOG_FORMAT`` or
        ``stdout,log,csv``.
    :param comm: mpi4py communicator to average logged values over ranks (None: local values).
    :param all_ranks: if False (default) ranks other than 0 write nothing.
    """
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(),
            datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"),
        )
    dir = os.path.expanduser(dir)
    if format_strs is None:
        format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
    rank = _rank()
    if rank > 0 and not all_ranks:
        format_strs = []
    suffix = f"-rank{rank:03d}" if rank > 0 else ""
    formats = [make_output_format(f, dir, suffix) for f in format_strs if f]
    if rank == 0:
        os.makedirs(dir, exist_ok=True)
    Logger.CURRENT = Logger(dir, formats, comm=comm)
    log(f"Logging to {dir}")


def get_current():
    """The active logger; before ``configure`` a stdout-only one (rank 0) with no directory."""
    if Logger.CURRENT is None:
        Logger.CURRENT = Logger(
            None, [make_output_format("stdout", None)] if _rank() == 0 else []
        )
    return Logger.CURRENT


def logkv(key, val):
    """Record ``val`` for ``key`` in this iteration (last value wins)."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Record ``val`` for ``key``; repeated calls are averaged until the next dump."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """``logkv`` for every item of ``d``."""
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    """Write the recorded values to every output, clear them, and return them."""
    return get_current().dumpkvs()


def getkvs():
    """The values recorded since the last dump."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write ``args`` separated by spaces to stdout / ``log.txt``."""
    get_current().log(*args, level=level)


def warn(*args):
    """``log`` at warning level."""
    log(*args, level=WARN)


def set_level(level):
    """Drop ``log`` calls below ``level`` (DEBUG, INFO, WARN, ERROR)."""
    get_current().level = level


def get_dir():
    """The output directory of the active logger (None before ``configure``)."""
    return get_current().dir


def reset():
    """Close the active logger's files; the next call starts a stdout-only logger."""
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
        Logger.CURRENT = None
