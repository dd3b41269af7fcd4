"""The U-Net's inference as predict.py runs it, in a process of its own: what
`bench.py --vs-pytorch` sets against PyTorch.

What this script teaches: predict.py run as a script declares its process inference-only
(tp4/inference/frozen.py: oneDNN reorders each convolution's weights once and keeps them), which a
process that also trains cannot do: bench.py's matrix trains and infers in one process. So this
builds the U-Net in a fresh process, at the precision and XLA setting given, puts it through
segment.at_speed as predict.py does (batch norms folded, logits guarded), times --repeats batches
after a warm-up as bench.py times inference (throughput.py), and prints the median rate as JSON.

    python -m tools.bench_predict --precision bfloat16
    python -m tools.bench_predict --size 32 --filters 8 --depth 3 --batch 4 --repeats 2
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import json
import sys

import unet
from tp4 import cli
from tp4.inference import frozen, segment
from tp4.models import batchnorm
from tp4.perf import speed, throughput


def parse_args(argv=None):
    parser = cli.argument_parser("python -m tools.bench_predict", __doc__)
    add = parser.add_argument
    add("--size", type=cli.at_least(8), default=128, help="height and width of the images")
    add("--filters", type=cli.at_least(1), default=32, help="filters at the first level")
    add("--depth", type=cli.at_least(1), default=4, help="levels, bottleneck included")
    add("--batch", type=cli.at_least(1), default=8, help="images per call")
    add("--repeats", type=cli.at_least(1), default=5, help="timed calls (the median counts)")
    add("--precision", choices=speed.PRECISIONS, default="float32")
    add("--xla", choices=("on", "off"), default="off")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with speed.policy_scope(args.precision):
        model = unet.build_unet(
            (args.size, args.size, 1),
            args.filters,
            args.depth,
            batch_norm=batchnorm.layer("fused"),
        )
    model = segment.at_speed(model, args.precision, args.xla)
    rate = throughput.median_rate(throughput.inference_calls(model, args.batch), args.repeats)
    print(json.dumps({"infer_examples_per_s": rate, frozen.VARIABLE: frozen.assumed()}))


if __name__ == "__main__":
    # This process only predicts, as predict.py's does (never from a caller that trains).
    frozen.inference_only_process()
    sys.exit(main())
