"""
Turn a training checkpoint into a shipped one: ``checkpoint/NAME.pt`` + ``NAME.json`` + SHA256SUMS.

    python scripts/package_checkpoint.py runs/demo/paired/ema_0.999_003000.pt --name demo_paired \\
        --sampling '{"timestep_respacing": "ddim10"}' --validation docs/quality/summary.json

The weights are copied as a plain float32 ``state_dict`` (loadable with ``weights_only=True``);
the sidecar is the training sidecar plus ``sampling`` (recommended sampling flags that
``scripts/test.py`` uses as defaults), optional ``validation`` numbers, the dataset description
of the model card (``--training_data``), the licence, and the new file's ``sha256``.
``checkpoint/SHA256SUMS`` is rewritten from every ``.pt`` there.
See ``guided_diffusion.checkpoint_hub.package``.

``--update``: merge ``--sampling`` into an already shipped checkpoint's sidecar, the weights
untouched (``checkpoint_hub.update_sampling``), e.g. the test-time flips tuned after packaging:

    python scripts/package_checkpoint.py checkpoint/demo_paired.pt --update --sampling '{"flips": "zxy"}'
"""

import argparse
import json
import os

from guided_diffusion.checkpoint_hub import REPO, package, update_sampling
from guided_diffusion.checkpoints import sidecar_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="training checkpoint (.pt with its .json sidecar)")
    parser.add_argument("--name", default=None, help="shipped name, e.g. demo_paired (required unless --update)")
    parser.add_argument("--update", action="store_true",
                        help="SOURCE is a shipped checkpoint: merge --sampling into its sidecar, nothing else")
    parser.add_argument("--dest", default=os.path.join(REPO, "checkpoint"))
    parser.add_argument("--sampling", action="append", default=[],
                        help="JSON dict of recommended sampling flags; repeat to merge several "
                             "(later keys win), e.g. the 'bc_tuning' of scripts/tune_bcdpm.py")
    parser.add_argument("--flags", default="{}",
                        help='JSON of sampling-only flags to change, e.g. \'{"sigma_small": true}\' (sample with '
                             "the posterior variance; the weights are unaffected)")
    parser.add_argument("--clip_suv", type=float, default=None,
                        help="sqrt normalisations: SUV where the sampler saturates x0 estimates "
                             "(default: the top of the model range, the normalisation's scale)")
    parser.add_argument("--validation", default=None, help="JSON file with validation numbers")
    parser.add_argument("--training_data", action="append", default=[],
                        help="JSON dict merged over the sidecar's training_data (the model card's "
                             "dataset record: description, generator, commands, reproduce); "
                             "repeatable like --sampling")
    args = parser.parse_args(argv)
    validation = None
    if args.validation:
        with open(args.validation) as handle:
            validation = json.load(handle)
    sampling, training_data = ({k: v for text in texts for k, v in json.loads(text).items()}
                               for texts in (args.sampling, args.training_data))
    if args.update:
        update_sampling(args.source, sampling)
        print(f"updated the sampling recommendations of {args.source}: {sampling}")
        return
    if not args.name:
        parser.error("--name is required (unless --update)")
    target, card = package(args.source, args.name, args.dest, sampling, validation, training_data,
                           json.loads(args.flags), args.clip_suv)
    print(f"wrote {target} (sha256 {card['sha256']}) and {sidecar_path(target)}")


if __name__ == "__main__":
    main()
