"""Where a training step's time goes, per TensorFlow op: the TF profiler around one epoch of steps.

What this script teaches: a step's speed is a sum over its ops, and the profiler says which ones.
The U-Net of train.py (its shape, precision and batch norm by default) is trained as bench.py
trains it (throughput.training_epoch: fit on the project's tf.data pipeline, loss and metrics);
after two warm-up epochs (tracing, oneDNN's primitive caches), `tf.profiler.experimental` records
one epoch, and the host plane's op events (the `tf_Compute` threads of TensorFlow's executor) are
summed by op type and by group (convolution gradients, batch norm, ...). The ops' times add up over
all threads, so they can exceed the epoch's wall time; read the shares.

    python -m tools.profile_step                        # train.py's U-Net, at auto's precision
    python -m tools.profile_step --precision float32 --batch-norm keras --top 30
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import collections
import glob
import os
import tempfile

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

import unet
from tp4 import cli
from tp4.models import batchnorm
from tp4.perf import speed, throughput

# Op types (TensorFlow's and oneDNN's names) by group, first match wins: the rows of PERFORMANCE.md.
GROUPS = (
    ("convolution gradients", ("Backprop",)),
    ("convolutions forward", ("Conv",)),
    ("batch norm and its gradient", ("BatchNorm",)),
    ("ReLU and its gradient", ("Relu",)),
    ("casts between precisions", ("Cast",)),
    ("skip concatenations and their gradient", ("Concat", "Slice")),
    ("max pooling and its gradient", ("MaxPool",)),
    ("bias add and its gradient", ("BiasAdd",)),
    ("optimizer (Adam) and variables", ("Adam", "Assign", "Resource", "ReadVariable")),
)
OTHER = "other (loss, metrics, AddN of gradients, ...)"


def op_seconds(xspace: xplane_pb2.XSpace) -> collections.Counter:
    """Seconds of op time by op type on the host's TensorFlow op threads.

    Args:
        xspace: a profile (the `*.xplane.pb` that tf.profiler writes).

    Returns:
        op type (the part after ':' of an event "layer/op:Type") -> seconds, summed over threads.
    """
    found = collections.Counter()
    for plane in xspace.planes:
        if plane.name != "/host:CPU":
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # Op events are "name:Type"; the executor's own events are C++ names ("a::b").
                if ":" in name and "::" not in name:
                    found[name.rsplit(":", 1)[1]] += event.duration_ps / 1e12
    return found


def group_of(op_type: str) -> str:
    """The GROUPS row of an op type (OTHER if none)."""
    return next((group for group, keys in GROUPS if any(k in op_type for k in keys)), OTHER)


def by_group(seconds: collections.Counter) -> collections.Counter:
    """Op seconds summed by GROUPS row."""
    grouped = collections.Counter()
    for op_type, value in seconds.items():
        grouped[group_of(op_type)] += value
    return grouped


def profile_epoch(model, batch: int, steps: int, folder: str) -> tuple[float, xplane_pb2.XSpace]:
    """(images/s of the profiled epoch, its profile): two warm-up epochs, then one recorded."""
    epoch = throughput.training_epoch(model, batch, jit_compile=False, steps=steps)
    epoch(), epoch()
    tf.profiler.experimental.start(folder)
    rate = epoch()
    tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    with open(path, "rb") as f:
        return rate, xplane_pb2.XSpace.FromString(f.read())


def parse_args(argv=None):
    parser = cli.argument_parser("python -m tools.profile_step", __doc__)
    parser.add_argument("--image-size", type=cli.at_least(8), default=128)
    parser.add_argument("--base-filters", type=cli.at_least(1), default=32)
    parser.add_argument("--depth", type=cli.at_least(1), default=4)
    parser.add_argument("--batch-size", type=cli.at_least(1), default=8)
    parser.add_argument("--steps", type=cli.at_least(1), default=6, help="steps profiled")
    parser.add_argument(
        "--precision",
        choices=("auto", *speed.PRECISIONS),
        default="auto",
        help="auto: train.py's choice for this machine, XLA off (the profile is of XLA off)",
    )
    parser.add_argument("--batch-norm", choices=batchnorm.KINDS, default="fused")
    parser.add_argument("--top", type=cli.at_least(0), default=15, help="op types listed")
    return parser, parser.parse_args(argv)


def main(argv=None):
    cli.setup()
    parser, args = parse_args(argv)
    with cli.command_line_errors(parser):

        def build():
            return unet.build_unet(
                (args.image_size, args.image_size, 1),
                args.base_filters,
                args.depth,
                batch_norm=batchnorm.layer(args.batch_norm),
            )

        precision = speed.choose(args.precision, "off", build, args.batch_size).precision
        with speed.policy_scope(precision):
            model = build()
        with tempfile.TemporaryDirectory() as folder:
            rate, xspace = profile_epoch(model, args.batch_size, args.steps, folder)
    seconds = op_seconds(xspace)
    total = sum(seconds.values())
    print(
        f"{precision}, batch norm {args.batch_norm}, batch {args.batch_size}: {rate:.1f} img/s in "
        f"the profiled epoch of {args.steps} steps; {total:.2f} s of op time over all threads"
    )
    print("\n| ops | share of op time |\n|---|---|")
    for group, value in by_group(seconds).most_common():
        print(f"| {group} | {value / total:.0%} |")
    print()
    for op_type, value in seconds.most_common(args.top):
        print(f"{op_type:<40}{value * 1e3:>10.1f} ms{value / total:>8.1%}")


if __name__ == "__main__":
    main()
