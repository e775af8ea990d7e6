"""
Shipping checkpoints: fetch one into ``checkpoint/`` verified, or package a training checkpoint
as a shipped one (``scripts/fetch_checkpoint.py``, ``scripts/package_checkpoint.py``).

Fetching (:func:`fetch`). ``source`` is a local path, a ``file://`` URL, a blobfile path
(``gs://``, ``az://``, ``https://ACCOUNT.blob.core.windows.net/...``) or an ``http(s)://`` URL.
The weights are copied in chunks (progress bar on a terminal) into ``DEST/NAME.pt`` (``NAME``
defaults to the source's stem). When the source has a sidecar ``NAME.json`` beside it (or
``json_source`` names one), it is fetched too and written as ``DEST/NAME.json``; its ``flags``
are what ``scripts/test.py`` uses. Checks before anything appears in ``DEST``: the SHA-256 of
the written bytes equals the given ``sha256`` and the sidecar's ``sha256`` (whichever are
given), and the weights load as a plain state_dict (``torch.load(..., weights_only=True)``) that
fits the sidecar's flags, or, without a sidecar, whose flags can be inferred from the tensor
shapes. Files are written to a temporary name in ``DEST`` and renamed, so a wrong hash, an
unreachable source or an interrupt leaves nothing behind. ``published`` writes the sidecar of
the published 3D DDPM (Yu, Gong et al. 2025; :data:`PUBLISHED_FLAGS` and
:data:`~guided_diffusion.checkpoints.PUBLISHED_CONVENTIONS`) after checking that the weights fit
that architecture.

Packaging (:func:`package`): the weights are copied as a plain float32 ``state_dict``; the
sidecar is the training sidecar plus ``sampling`` (recommended sampling flags that
``scripts/test.py`` uses as defaults), optional ``validation`` numbers, the licence, and the new
file's ``sha256``; ``SHA256SUMS`` in the destination is rewritten from every ``.pt`` there.

Sidecars record no machine's absolute paths: a path inside the repository is recorded relative
to it, any other as its base name (:func:`repository_path`, :func:`portable_paths`).
"""

import contextlib
import http.client
import io
import json
import ntpath
import os
import re
import urllib.error
import urllib.parse
import urllib.request

import torch
from tqdm import tqdm

from .checkpoints import PUBLISHED_CONVENTIONS, read_metadata, sha256_file, sidecar_path
from .normalisation import resolve_normalisation
from .pet.volumes import atomic_write, atomic_write_bytes
from .script_util import (
    _format_flags,
    create_model_and_diffusion,
    describe_state_dict_mismatch,
    infer_flags_from_state_dict,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

#: The repository root (this package's parent directory).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_BYTES = 1 << 20
#: The flags of the published 3D DDPM's test script (script_util names and types).
PUBLISHED_FLAGS = dict(
    attention_resolutions="1000", large_size=96, small_size=96, num_channels=128,
    num_head_channels=64, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True,
    diffusion_steps=1000, noise_schedule="linear",
)
LICENCE = "CC BY-NC-SA 4.0 (see MODEL_LICENSE); trained on simulated phantoms only"
#: An absolute POSIX or Windows path inside a string (not the path part of a URL).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s'\"(),;]+|[A-Za-z]:[\\/][^\s'\"(),;]*)")


# ---------------------------------------------------------------------------------- paths


def repository_path(path):
    """What a sidecar records of ``path``: relative to the repository when inside it, else the
    base name (never an absolute path of this machine)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.commonpath([path, REPO]) == REPO:
        return os.path.relpath(path, REPO)
    return os.path.basename(path.rstrip(os.sep)) or "."


def _portable(path):
    if os.path.isabs(path):
        return repository_path(path)
    return ntpath.basename(path.rstrip("\\/")) or "."  # a Windows path on POSIX


def absolute_paths(value):
    """The absolute paths written anywhere in a JSON-able ``value`` (strings, lists, dicts)."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.findall(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in absolute_paths(item)]
    return []


def portable_paths(value):
    """``value`` with every absolute path in its strings replaced by :func:`repository_path`."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: _portable(match.group(0)), value)
    if isinstance(value, dict):
        return {key: portable_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(item) for item in value]
    return value


class FetchError(Exception):
    """A problem reported as one line on stderr with exit status 2."""


# ---------------------------------------------------------------------------------- sources


def _blobfile_path(source):
    """True for the paths blobfile reads: ``gs://``, ``az://`` and Azure ``https`` URLs."""
    url = urllib.parse.urlsplit(source)
    return url.scheme in ("gs", "az") or (
        url.scheme == "https" and url.netloc.endswith(".blob.core.windows.net"))


def _local_path(source):
    """The file a local path or ``file://`` URL names; None for remote sources."""
    url = urllib.parse.urlsplit(source)
    if url.scheme == "file":
        return urllib.request.url2pathname(url.path)
    if not url.scheme or (len(url.scheme) == 1 and os.name == "nt"):  # C:\... on Windows
        return source
    return None


@contextlib.contextmanager
def open_source(source):
    """Yield ``(binary stream, size in bytes or None)``.

    :raises FileNotFoundError: naming ``source`` when it does not exist.
    :raises FetchError: for an unsupported scheme or an unreachable server.
    """
    path = _local_path(source)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source}: no such file")
        with open(path, "rb") as stream:
            yield stream, os.path.getsize(path)
    elif _blobfile_path(source):
        import blobfile

        try:
            if not blobfile.exists(source):
                raise FileNotFoundError(f"{source}: no such blob")
            size = blobfile.stat(source).size
            stream = blobfile.BlobFile(source, "rb", streaming=True)
        except blobfile.Error as error:
            raise FetchError(f"{source}: cannot reach the storage ({error})") from None
        with stream:
            try:
                yield stream, size
            except blobfile.Error as error:
                raise FetchError(f"{source}: the transfer failed ({error})") from None
    elif urllib.parse.urlsplit(source).scheme in ("http", "https"):
        try:
            response = urllib.request.urlopen(source, timeout=60)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise FileNotFoundError(f"{source}: not found (HTTP 404)") from None
            raise FetchError(f"{source}: HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise FetchError(f"{source}: cannot reach the server ({error.reason})") from None
        with response:
            length = response.headers.get("Content-Length")
            try:
                yield response, int(length) if length else None
            except http.client.HTTPException as error:
                raise FetchError(f"{source}: the transfer failed ({error!r})") from None
    else:
        raise FetchError(f"{source}: unsupported source; give a path, file://, gs://, az:// "
                         f"or http(s):// URL")


def source_sidecar(source):
    """The sidecar beside ``source``: ``.../NAME.pt`` -> ``.../NAME.json`` (URL query kept)."""
    if _local_path(source) == source:
        return sidecar_path(source)
    url = urllib.parse.urlsplit(source)
    return urllib.parse.urlunsplit(url._replace(path=sidecar_path(url.path)))


def source_stem(source):
    """``NAME`` of ``.../NAME.pt`` (path or URL)."""
    path = _local_path(source) or urllib.parse.urlsplit(source).path
    return os.path.splitext(os.path.basename(path.rstrip("/\\")))[0]


def read_sidecar(source, required):
    """The JSON sidecar at ``source`` as a dict; None when absent and not ``required``."""
    try:
        with open_source(source) as (stream, _):
            text = stream.read()
    except FileNotFoundError:
        if required:
            raise
        return None
    try:
        metadata = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FetchError(f"{source}: the sidecar is not valid JSON ({error})") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("flags"), dict):
        raise FetchError(f"{source}: the sidecar has no 'flags' object")
    if metadata.get("cond") not in ("paired", "none"):
        raise FetchError(f"{source}: the sidecar's 'cond' must be 'paired' or 'none', "
                         f"got {metadata.get('cond')!r}")
    return metadata


def copy_in_chunks(source, destination, label):
    """Copy ``source`` into the local file ``destination`` with a progress bar (on a terminal);
    raises FetchError when fewer bytes arrive than announced."""
    with open_source(source) as (stream, size), open(destination, "wb") as out, tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            disable=None, leave=False) as bar:
        copied = 0
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            out.write(block)
            copied += len(block)
            bar.update(len(block))
    if size is not None and copied != size:
        raise FetchError(f"{source}: transfer stopped after {copied} of {size} bytes")


# ---------------------------------------------------------------------------------- checks


def _recorded_source(source):
    """What a sidecar records of a source: a local file as :func:`repository_path`, a URL
    without its query (which may hold an access token)."""
    local = _local_path(source)
    if local is not None:
        return repository_path(local)
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(source)._replace(query="", fragment=""))


def published_metadata(digest, source):
    """The sidecar of the published 3D DDPM weights (``--published``)."""
    return dict(
        PUBLISHED_CONVENTIONS,
        flags=dict(sr_model_and_diffusion_defaults(), **PUBLISHED_FLAGS),
        origin=f"published 3D DDPM weights (Yu, Gong et al. 2025), fetched from {_recorded_source(source)}",
        sha256=digest,
    )


def fit_problem(state_dict, metadata):
    """"" when ``state_dict`` loads strictly into the model of ``metadata`` (built on the meta
    device, so no memory is used), else a one-line description of the mismatch."""
    paired = metadata["cond"] == "paired"
    defaults = sr_model_and_diffusion_defaults() if paired else model_and_diffusion_defaults()
    flags = {k: metadata["flags"].get(k, v) for k, v in defaults.items()}
    builder = sr_create_model_and_diffusion if paired else create_model_and_diffusion
    with torch.device("meta"):
        model = builder(**flags)[0]
    return "; ".join(describe_state_dict_mismatch(model, state_dict).splitlines())


def load_weights(path, source):
    """The state_dict in ``path``; FetchError naming ``source`` when it is not a plain one."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, zip and format errors all mean the same here
        raise FetchError(f"{source}: not a loadable weights file ({type(error).__name__}: "
                         f"{error})".replace("\n", " ")) from None
    if not isinstance(state_dict, dict):
        raise FetchError(f"{source}: holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


def _check_hex(value, what):
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FetchError(f"{what}: {value!r} is not a SHA-256 (64 hex digits)")
    return value


# ---------------------------------------------------------------------------------- fetch


def fetch(source, dest, name=None, sha256=None, json_source=None, published=False, force=False):
    """Fetch ``source`` into ``dest/NAME.pt`` (and its sidecar), verified; see the module doc.

    :return: dict with ``weights`` (path), ``sidecar`` (path or None), ``sha256``,
        ``verified_by`` (list of where the expected hash came from), ``flags`` (to use with
        scripts/test.py) and ``inferred`` (True when the flags come from tensor shapes).
    :raises FetchError: hash mismatch, bad sidecar, weights that fit nothing, existing files.
    :raises FileNotFoundError: a missing source (or a missing ``--json`` sidecar).
    """
    name = name[:-3] if name and name.endswith(".pt") else (name or source_stem(source))
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise FetchError(f"--name {name!r}: give a plain file stem (no directories)")
    weights = os.path.join(dest, name + ".pt")
    sidecar = sidecar_path(weights)
    existing = [p for p in (weights, sidecar) if os.path.exists(p)]
    if existing and not force:
        raise FetchError(f"{existing[0]}: already exists (use --force to replace it)")

    expected = {}
    if sha256:
        expected["--sha256"] = _check_hex(sha256, "--sha256")
    metadata = None
    if not published:
        sidecar_source = json_source or source_sidecar(source)
        metadata = read_sidecar(sidecar_source, required=json_source is not None)
        if metadata is not None and metadata.get("sha256"):
            expected[sidecar_source] = _check_hex(metadata["sha256"], sidecar_source)
    if len(set(expected.values())) > 1:
        raise FetchError("the expected hashes disagree: " +
                         ", ".join(f"{v} ({k})" for k, v in expected.items()))

    found = {}

    def download_and_check(temporary):
        copy_in_chunks(source, temporary, name + ".pt")
        digest = sha256_file(temporary)  # hash the bytes as written to disk
        for origin, value in expected.items():
            if digest != value:
                raise FetchError(f"{source}: sha256 {digest} does not match {value} from {origin}; "
                                 f"nothing was written")
        state_dict = load_weights(temporary, source)
        if published:
            found["metadata"] = published_metadata(digest, source)
        elif metadata is not None:
            found["metadata"] = dict(metadata, sha256=digest)
        if "metadata" in found:
            problem = fit_problem(state_dict, found["metadata"])
            if problem:
                raise FetchError(f"{source}: the weights do not fit the "
                                 f"{'published' if published else 'sidecar'} flags: {problem}")
            found["flags"] = found["metadata"]["flags"]
        else:
            try:
                found["flags"] = infer_flags_from_state_dict(state_dict)
            except ValueError as error:
                raise FetchError(f"{source}: no sidecar and {error}") from None
        found["sha256"] = digest

    atomic_write(weights, download_and_check, ".pt")
    try:
        if "metadata" in found:
            atomic_write_bytes(sidecar, json.dumps(dict(found["metadata"], weights=name + ".pt"),
                                                   indent=2, sort_keys=True) + "\n")
        elif os.path.exists(sidecar):  # --force over a checkpoint whose sidecar no longer applies
            os.remove(sidecar)
    except BaseException:
        os.remove(weights)
        raise
    return dict(weights=weights, sidecar=sidecar if "metadata" in found else None,
                sha256=found["sha256"], verified_by=list(expected), flags=found["flags"],
                inferred="metadata" not in found)


def fetch_report(result):
    """Lines telling the user what was fetched and how to use it."""
    weights = os.path.relpath(result["weights"])
    lines = [f"fetched {weights} (sha256 {result['sha256']}, "
             + (f"verified against {' and '.join(result['verified_by'])})" if result["verified_by"]
                else "not verified: no expected hash was given; compare it with the publisher's)")]
    flags = _format_flags(result["flags"])
    if result["inferred"]:
        cond = "paired" if result["flags"]["paired"] else "unconditional"
        lines += [
            f"no sidecar: scripts/test.py infers the architecture ({cond}) from the tensor shapes:",
            f"  {flags}",
            "and assumes the published 3D DDPM's conventions for the rest (SUV clipped at 16 and "
            "divided by 16 into [0, 1], 1.65 mm voxels, see guided_diffusion/checkpoints.py).",
            "Attention head counts and diffusion flags do not show in the weights: pass them to "
            "scripts/test.py if yours differ from the defaults, or use --published for the "
            "published model.",
        ]
    else:
        lines += [f"sidecar {os.path.relpath(result['sidecar'])}; scripts/test.py reads these flags "
                  f"from it:", f"  {flags}"]
    lines.append(f"run: python scripts/test.py --model_path {weights} --base_samples LOW_DOSE "
                 f"--save_dir OUT")
    return lines


# ---------------------------------------------------------------------------------- package


def write_sha256sums(directory):
    """Rewrite ``directory/SHA256SUMS`` from the ``.pt`` files in it (sorted, sha256sum format)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".pt"))
    lines = "".join(f"{sha256_file(os.path.join(directory, n))}  {n}\n" for n in names)
    atomic_write_bytes(os.path.join(directory, "SHA256SUMS"), lines)


#: Flags a packaged checkpoint may change: they act at sampling only, not on the trained weights.
SAMPLING_ONLY_FLAGS = ("sigma_small",)


def save_state_dict(path, state):
    """Write a plain ``state_dict`` atomically. Saved through a buffer, so the archive's inner
    name is fixed (not the temporary file's): the same weights always give the same bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def package(source, name, dest, sampling=None, validation=None, training_data=None, flags=None,
            clip_suv=None):
    """Copy ``source`` (a state_dict .pt with a training sidecar) to ``dest/NAME.pt`` + JSON.

    :param sampling: recommended sampling flags, merged over the training sidecar's.
    :param validation: JSON-able validation numbers recorded in the sidecar.
    :param training_data: the model card's dataset description (e.g. ``description``,
        ``generator``, ``commands``, ``reproduce``), merged over the training sidecar's.
    :param flags: new values of :data:`SAMPLING_ONLY_FLAGS` (e.g. ``sigma_small``).
    :param clip_suv: SUV where the sampler saturates x0 estimates, recorded as the sqrt
        normalisation's ``clip`` (sampling only; see :func:`~.normalisation.x0_clip_range`).
    :return: ``(path of the new .pt, its sidecar dict)``.
    """
    metadata = read_metadata(source)
    if metadata is None:
        raise ValueError(f"{source}: no JSON sidecar ({sidecar_path(source)}); package training checkpoints")
    unknown = sorted(set(flags or {}) - set(SAMPLING_ONLY_FLAGS))
    if unknown:
        raise ValueError(f"--flags {unknown}: only the sampling-only flags {list(SAMPLING_ONLY_FLAGS)} may change")
    normalisation = metadata.get("normalisation") or {}
    if clip_suv is not None and normalisation.get("transform") != "sqrt":
        raise ValueError(f"{source}: a clip SUV needs a sqrt normalisation, not {normalisation}")
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.float().contiguous() for k, v in state.items()}
    target = os.path.join(dest, name + ".pt")
    save_state_dict(target, state)
    card = portable_paths(dict(metadata))  # e.g. the data_dir of an older training sidecar
    card.update(
        name=name,
        source_checkpoint=repository_path(source),
        weights=os.path.basename(target),
        sha256=sha256_file(target),
        licence=LICENCE,
        sampling=dict(metadata.get("sampling", {}), **(sampling or {})),
        flags=dict(metadata["flags"], **(flags or {})),
    )
    if clip_suv is not None:
        card["normalisation"] = resolve_normalisation(dict(normalisation, clip=float(clip_suv)))
    if validation is not None:
        card["validation"] = validation
    if training_data:
        card["training_data"] = dict(card.get("training_data", {}), **training_data)
    atomic_write_bytes(sidecar_path(target), json.dumps(card, indent=2, sort_keys=True) + "\n")
    write_sha256sums(dest)
    return target, card


def interpolate_checkpoints(start_path, end_path, alpha):
    """Weight-space interpolation ``(1 - alpha) start + alpha end`` of two checkpoints of one
    architecture, e.g. a model and its fine-tuned descendant (WiSE-FT, Wortsman et al. 2022:
    part of the fine-tuning's gain at less of its cost elsewhere).

    :param alpha: in ``[0, 1]``; 0 gives ``start``'s weights, 1 ``end``'s.
    :return: ``(state_dict, sidecar)``: float32 tensors, and ``end``'s sidecar with ``step``
        None and an ``interpolated`` record (both files' basenames, sha256 and steps, ``alpha``).
    :raises ValueError: naming the files when ``alpha`` is outside ``[0, 1]``, a sidecar is
        missing, the conditioning or flags differ, or the tensors do not match key for key.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    metadata = {}
    for path in (start_path, end_path):
        metadata[path] = read_metadata(path)
        if metadata[path] is None:
            raise ValueError(f"{path}: no JSON sidecar ({sidecar_path(path)})")
    start_meta, end_meta = metadata[start_path], metadata[end_path]
    arch = [key for key in ("cond", "normalisation", "patch_size_zxy", "voxel_mm") if start_meta.get(key) != end_meta.get(key)]
    arch += [f"flags.{key}" for key in sorted(set(start_meta["flags"]) | set(end_meta["flags"]))
             if key not in SAMPLING_ONLY_FLAGS and start_meta["flags"].get(key) != end_meta["flags"].get(key)]
    if arch:
        raise ValueError(f"{start_path} and {end_path} differ in {', '.join(arch)}: not one architecture")
    start, end = (torch.load(p, map_location="cpu", weights_only=True) for p in (start_path, end_path))
    if start.keys() != end.keys() or any(start[k].shape != end[k].shape for k in start):
        raise ValueError(f"{start_path} and {end_path} hold different tensors (keys or shapes)")
    state = {k: ((1.0 - alpha) * start[k].float() + alpha * end[k].float()).contiguous() for k in start}
    record = dict(alpha=float(alpha), **{
        name: dict(path=os.path.basename(path), sha256=sha256_file(path), step=metadata[path].get("step"))
        for name, path in (("start", start_path), ("end", end_path))})
    return state, dict(end_meta, step=None, interpolated=record)


def update_sampling(shipped, sampling):
    """Merge recommended sampling flags into a shipped checkpoint's sidecar (``NAME.json``
    beside ``shipped``), the weights untouched: for settings tuned after packaging (e.g. the
    test-time ``flips`` of ``scripts/tune_sampler.py``). Raises ValueError naming the file when
    it has no sidecar or its weights no longer match the recorded sha256.

    :return: the new sidecar dict.
    """
    card = read_metadata(shipped)
    if card is None:
        raise ValueError(f"{shipped}: no JSON sidecar ({sidecar_path(shipped)})")
    if card.get("sha256") != sha256_file(shipped):
        raise ValueError(f"{shipped}: the weights' sha256 differs from its sidecar's: not a packaged checkpoint "
                         f"(package it with scripts/package_checkpoint.py)")
    card["sampling"] = dict(card.get("sampling", {}), **sampling)
    atomic_write_bytes(sidecar_path(shipped), json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card
