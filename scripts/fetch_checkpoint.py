"""
Fetch a checkpoint into ``checkpoint/``, verify its SHA-256 and print the flags to use.

    python scripts/fetch_checkpoint.py SOURCE [--sha256 HEX] [--dest checkpoint/] [--name NAME]
                                              [--json SIDECAR_SOURCE] [--published] [--force]

``SOURCE`` is a local path, a ``file://`` URL, a blobfile path (``gs://``, ``az://``,
``https://ACCOUNT.blob.core.windows.net/...``) or an ``http(s)://`` URL. The weights are copied in
chunks (progress bar on a terminal) into ``DEST/NAME.pt`` (``NAME`` defaults to the source's
stem). When the source has a sidecar ``NAME.json`` beside it (or ``--json`` names one), it is
fetched too and written as ``DEST/NAME.json``; its ``flags`` are what ``scripts/test.py`` uses.

Checks before anything appears in ``DEST``: the SHA-256 of the written bytes equals ``--sha256``
and the sidecar's ``sha256`` (whichever are given), and the weights load as a plain state_dict
(``torch.load(..., weights_only=True)``) that fits the sidecar's flags, or, without a sidecar,
whose flags can be inferred from the tensor shapes. Files are written to a temporary name in
``DEST`` and renamed, so a wrong hash, an unreachable source or an interrupt leaves nothing
behind. Exit status: 0 on success, 2 on any error (one line on stderr), 130 when interrupted.

A bare ``.pt`` (no sidecar) is usable as it is: ``scripts/test.py`` infers the architecture from
the tensor shapes and assumes the published 3D DDPM's conventions for the rest (SUV clipped at 16
and divided by 16 into ``[0, 1]``, 1.65 mm voxels; see ``guided_diffusion/checkpoints.py``).

Published 3D DDPM weights (Yu, Gong et al. 2025). Download ``model.pt`` from the authors' link
(see their repository; it is not redistributed here), then record it with its conventions:

    python scripts/fetch_checkpoint.py /path/to/model.pt --name published_3d_ddpm --published
    python scripts/test.py --model_path checkpoint/published_3d_ddpm.pt --base_samples LOW_DOSE \\
        --save_dir OUT

``--published`` writes the sidecar of the published model: ``cond`` paired, the published flags
``--attention_resolutions 1000 --large_size 96 --small_size 96 --num_channels 128
--num_head_channels 64 --learn_sigma True --resblock_updown True --use_scale_shift_norm True
--diffusion_steps 1000 --noise_schedule linear``, normalisation ``{clip 16, scale 16, range
[0, 1]}``, 1.65 mm voxels, patch size (Z, X, Y) = (96, 192, 288), and the file's SHA-256, after
checking that the weights fit that architecture. Give ``--sha256`` as well when you know the
published hash.
"""

import argparse
import os
import sys

from guided_diffusion.checkpoint_hub import REPO, FetchError, fetch, fetch_report


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="weights .pt: path, file://, gs://, az:// or http(s):// URL")
    parser.add_argument("--sha256", default=None, help="expected SHA-256 (64 hex digits)")
    parser.add_argument("--dest", default=os.path.join(REPO, "checkpoint"),
                        help="destination directory (default: the repository's checkpoint/)")
    parser.add_argument("--name", default=None, help="file stem in DEST (default: the source's)")
    parser.add_argument("--json", default=None, dest="json_source",
                        help="sidecar JSON source (default: NAME.json beside SOURCE, if present)")
    parser.add_argument("--published", action="store_true",
                        help="the source is the published 3D DDPM model.pt: write its sidecar")
    parser.add_argument("--force", action="store_true", help="replace an existing DEST/NAME.pt")
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.published and args.json_source:
        print("fetch_checkpoint.py: error: --published writes its own sidecar; drop --json",
              file=sys.stderr)
        return 2
    try:
        result = fetch(args.source, args.dest, name=args.name, sha256=args.sha256,
                       json_source=args.json_source, published=args.published, force=args.force)
    except (FetchError, OSError) as error:
        print(f"fetch_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fetch_checkpoint.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    print("\n".join(fetch_report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
