"""
Turn a training checkpoint into a shipped one: ``checkpoint/NAME.pt`` + ``NAME.json`` + SHA256SUMS.

    python scripts/package_checkpoint.py runs/demo/paired/ema_0.999_003000.pt --name demo_paired \\
        --sampling '{"timestep_respacing": "ddim10"}' --validation docs/quality/summary.json

The weights are copied as a plain float32 ``state_dict`` (loadable with ``weights_only=True``);
the sidecar is the training sidecar plus ``sampling`` (recommended sampling flags that
``scripts/test.py`` uses as defaults), optional ``validation`` numbers, the licence, and the
new file's ``sha256``. ``checkpoint/SHA256SUMS`` is rewritten from every ``.pt`` there.
"""

import argparse
import json
import os


import torch

from guided_diffusion.checkpoints import read_metadata, sha256_file, sidecar_path
from guided_diffusion.pet.volumes import atomic_write, atomic_write_bytes

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def write_sha256sums(directory):
    """Rewrite ``directory/SHA256SUMS`` from the ``.pt`` files in it (sorted, sha256sum format)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".pt"))
    lines = "".join(f"{sha256_file(os.path.join(directory, n))}  {n}\n" for n in names)
    atomic_write_bytes(os.path.join(directory, "SHA256SUMS"), lines)


def package(source, name, dest, sampling=None, validation=None):
    """Copy ``source`` (a state_dict .pt with a training sidecar) to ``dest/NAME.pt`` + JSON."""
    metadata = read_metadata(source)
    if metadata is None:
        raise ValueError(f"{source}: no JSON sidecar ({sidecar_path(source)}); package training checkpoints")
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.float().contiguous() for k, v in state.items()}
    target = os.path.join(dest, name + ".pt")
    atomic_write(target, lambda temporary: torch.save(state, temporary), ".pt")
    card = dict(metadata)
    card.update(
        name=name,
        source_checkpoint=os.path.relpath(os.path.abspath(source), REPO),
        weights=os.path.basename(target),
        sha256=sha256_file(target),
        licence="CC BY-NC-SA 4.0 (see MODEL_LICENSE); trained on simulated phantoms only",
        sampling=dict(metadata.get("sampling", {}), **(sampling or {})),
    )
    if validation is not None:
        card["validation"] = validation
    atomic_write_bytes(sidecar_path(target), json.dumps(card, indent=2, sort_keys=True) + "\n")
    write_sha256sums(dest)
    return target, card


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="training checkpoint (.pt with its .json sidecar)")
    parser.add_argument("--name", required=True, help="shipped name, e.g. demo_paired")
    parser.add_argument("--dest", default=os.path.join(REPO, "checkpoint"))
    parser.add_argument("--sampling", action="append", default=[],
                        help="JSON dict of recommended sampling flags; repeat to merge several "
                             "(later keys win), e.g. the 'bc_tuning' of scripts/tune_bcdpm.py")
    parser.add_argument("--validation", default=None, help="JSON file with validation numbers")
    args = parser.parse_args(argv)
    validation = None
    if args.validation:
        with open(args.validation) as handle:
            validation = json.load(handle)
    sampling = {}
    for text in args.sampling:
        sampling.update(json.loads(text))
    target, card = package(args.source, args.name, args.dest, sampling, validation)
    print(f"wrote {target} (sha256 {card['sha256']}) and {sidecar_path(target)}")


if __name__ == "__main__":
    main()
