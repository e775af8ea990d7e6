"""
Interpolate two checkpoints of one architecture in weight space (WiSE-FT):

    python scripts/interpolate_checkpoints.py runs/paired_skip/ema_0.999_009000.pt \\
        runs/paired_noisy/ema_0.999_010000.pt --alpha 0.5 --out runs/paired_wise/wise_0.5.pt

writes ``(1 - alpha) START + alpha END`` as a training checkpoint (``OUT`` + its JSON sidecar:
END's, with an ``interpolated`` record), ready for ``scripts/package_checkpoint.py``. See
``guided_diffusion.checkpoint_hub.interpolate_checkpoints``.
"""

import argparse
import json
import os

from guided_diffusion.checkpoint_hub import interpolate_checkpoints, portable_paths, save_state_dict
from guided_diffusion.checkpoints import sidecar_path
from guided_diffusion.pet.volumes import atomic_write_bytes
from guided_diffusion.script_util import exit_on_user_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("start", help="checkpoint .pt with its sidecar (alpha 0)")
    parser.add_argument("end", help="checkpoint .pt with its sidecar (alpha 1)")
    parser.add_argument("--alpha", type=float, required=True, help="weight of END, in [0, 1]")
    parser.add_argument("--out", required=True, help="output .pt (its sidecar beside it)")
    args = parser.parse_args(argv)
    state, sidecar = interpolate_checkpoints(args.start, args.end, args.alpha)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_state_dict(args.out, state)
    atomic_write_bytes(sidecar_path(args.out), json.dumps(portable_paths(sidecar), indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({1 - args.alpha:g} x {args.start} + {args.alpha:g} x {args.end})")
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
