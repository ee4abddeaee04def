"""``crossspec data synth``: write a synthetic dataset and its manifest (see ``datasets.synth``).

The parser imports nothing heavy; the runner checks every flag before it writes anything.
"""

from __future__ import annotations

import argparse
import sys
import time

from crossspec_kernels.cli_common import EXIT_OK, UsageError, add_command, int_at_least

# write_synthetic_dataset's argument -> the flag that sets it, so its errors name the flag.
_FLAGS = {
    "clips": "--clips",
    "frames": "--frames",
    "height": "--height",
    "width": "--width",
    "duration_us": "--duration-us",
    "events_per_clip": "--events-per-clip",
    "num_objects": "--objects",
    "event_format": "--event-format",
}


def run_synth(args: argparse.Namespace) -> int:
    from crossspec_kernels.datasets.synth import check_synth_args, write_synthetic_dataset

    settings = {name: getattr(args, name) for name in _FLAGS}
    try:
        try:
            check_synth_args(settings, _FLAGS)
        except ValueError as error:
            raise UsageError(str(error)) from None
        start = time.perf_counter()
        try:
            manifest = write_synthetic_dataset(
                args.out, seed=args.seed, force=args.force, show_progress=not args.quiet, **settings
            )
        except NotADirectoryError:
            raise UsageError(f"OUT {args.out!r} is a file, not a folder") from None
        except FileExistsError:
            raise UsageError(
                f"OUT {args.out!r} is not empty; --force writes into it (overwriting clips of the same names)"
            ) from None
    except UsageError as error:
        print(f"crossspec data synth: error: {error}", file=sys.stderr)
        raise
    print(f"wrote {args.clips} clips and {manifest} in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def add_data_parser(sub) -> None:
    data = add_command(sub, "data", help="datasets for the end-to-end benchmark (synthetic writer)")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = add_command(
        commands,
        "synth",
        help="write synthetic clips (DSEC events.h5 or EventGPT events.npy + video.npy) and a manifest.jsonl",
        description="Write N synthetic clips (the same moving scene as DSEC-layout events and as uint8\n"
        "video frames) and OUT/manifest.jsonl, the input of `crossspec bench e2e --manifest`.",
    )
    synth.add_argument("out", metavar="OUT", help="output folder (must be empty or absent unless --force)")
    synth.add_argument("--clips", type=int_at_least(1), required=True, metavar="N", help="number of clips")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed (each clip derives its own)")
    synth.add_argument("--frames", type=int_at_least(1), default=8, help="video frames per clip")
    synth.add_argument("--height", type=int_at_least(1), default=48, help="sensor and video height, px")
    synth.add_argument("--width", type=int_at_least(1), default=64, help="sensor and video width, px")
    synth.add_argument("--duration-us", type=int_at_least(1), default=250_000, help="clip length, µs")
    synth.add_argument(
        "--events-per-clip", type=int_at_least(1), default=100_000, help="events per clip (at most)"
    )
    synth.add_argument(
        "--objects", dest="num_objects", type=int_at_least(0), default=3, help="moving objects"
    )
    synth.add_argument(
        "--event-format",
        choices=("h5", "npy"),
        default="h5",
        help="events as DSEC h5 (events.h5) or EventGPT npy (events.npy)",
    )
    synth.add_argument("--force", action="store_true", help="write into a non-empty OUT (overwrites clips)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)
