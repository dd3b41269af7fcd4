"""The same U-Net in PyTorch, timed as bench.py times Keras: how this project's speed compares.

What this script teaches:
- the U-Net of unet.py (Conv 3x3 without bias -> BatchNorm, momentum 0.1 in PyTorch's convention
  = 0.9 in Keras' -> ReLU, twice per level; 2x2 max pooling; 2x2 transposed convolutions;
  concatenated skips; a 1x1 sigmoid output), trained with the same loss (BCE + soft Dice), Adam at
  1e-3 and Dice/IoU counts at every step, on random images;
- PyTorch's best CPU path: channels_last memory (NHWC, what oneDNN's convolutions want) and, where
  the CPU has bfloat16 arithmetic, bf16 autocast (convolutions in bfloat16, the loss in float32);
  eager, or compiled by `torch.compile` (inductor: the `-compiled` paths; the warm-up compiles);
- timed as bench.py times Keras (throughput.py): epochs of --steps batches, the median of --repeats
  epochs after a warm-up epoch; inference, the median of --repeats forward passes of one batch.

PyTorch is optional, out of requirements.txt: `bench.py --vs-pytorch` runs this script where torch
is installed (`pip install torch`, a CPU build), and prints one line otherwise.

    python -m tools.bench_pytorch  # 128x128, batch 8, float32 and bf16
    python -m tools.bench_pytorch --size 32 --filters 8 --depth 3 --batch 4 --steps 2 --repeats 2
"""

import contextlib
import json
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from tp4 import cli

# The paths timed: precision (bfloat16: autocast), eager or through torch.compile.
PATHS = ("float32", "bfloat16", "float32-compiled", "bfloat16-compiled")


def block(c_in, c_out):
    """(Conv 3x3 without bias -> BatchNorm -> ReLU) twice, as unet.conv_block."""
    layers = []
    for c in (c_in, c_out):
        layers += [
            nn.Conv2d(c, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out, momentum=0.1),
        ]
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """unet.build_unet's network: `depth` levels from `filters` filters, transposed convolutions
    up, concatenated skips, one output logit per pixel."""

    def __init__(self, filters=32, depth=4, channels=1):
        super().__init__()
        widths = [filters * 2**level for level in range(depth)]
        ins = [channels, *widths[:-2]]
        self.down = nn.ModuleList(block(c_in, c) for c_in, c in zip(ins, widths[:-1]))
        self.bottleneck = block(widths[-2], widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2) for c in widths[-2::-1])
        self.decode = nn.ModuleList(block(2 * c, c) for c in widths[-2::-1])
        self.out = nn.Conv2d(filters, 1, 1)

    def forward(self, x):
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips)):
            x = decode(torch.cat([up(x), skip], dim=1))
        return self.out(x)


def bce_dice(logits, masks, epsilon=1e-6):
    """BCE + soft Dice over the batch (losses.BCEDiceLoss), in float32."""
    logits = logits.float()
    probabilities = torch.sigmoid(logits)
    overlap = (probabilities * masks).sum()
    dice = (2 * overlap + epsilon) / (probabilities.sum() + masks.sum() + epsilon)
    return F.binary_cross_entropy_with_logits(logits, masks) + 1 - dice


def measure(args, path):
    """(training, inference) images per second of the U-Net on `path` (one of PATHS)."""
    torch.manual_seed(0)
    precision, _, compiled = path.partition("-")
    model = UNet(args.filters, args.depth).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    shape = (args.batch, 1, args.size, args.size)
    images = [
        torch.rand(shape).contiguous(memory_format=torch.channels_last) for _ in range(args.steps)
    ]
    masks = [(x > 0.9).float() for x in images]

    def autocast():
        if precision == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def epoch():
        model.train()
        start = time.perf_counter()
        for x, y in zip(images, masks):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = forward(x)
            loss = bce_dice(logits, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # Dice/IoU counts, as Keras' epoch metrics
                predicted, truth = logits >= 0, y > 0.5
                tp = (predicted & truth).sum()
                _ = (tp, predicted.sum() - tp, truth.sum() - tp)
        return args.steps * args.batch / (time.perf_counter() - start)

    def infer():
        model.eval()
        start = time.perf_counter()
        with torch.inference_mode(), autocast():
            torch.sigmoid(forward(images[0]))
        return args.batch / (time.perf_counter() - start)

    rates = []
    for run in (epoch, infer):
        run()  # warm-up: oneDNN picks and caches its kernels
        rates.append(statistics.median([run() for _ in range(args.repeats)]))
    return tuple(rates)


def parse_args(argv=None):
    parser = cli.argument_parser("bench_pytorch.py", __doc__)
    add = parser.add_argument
    add("--size", type=int, default=128, help="height and width of the images")
    add("--filters", type=int, default=32, help="filters at the first level")
    add("--depth", type=int, default=4, help="levels, bottleneck included")
    add("--batch", type=int, default=8, help="images per step")
    add("--steps", type=int, default=8, help="training steps per timed epoch")
    add("--repeats", type=int, default=5, help="timed epochs (and inference batches)")
    add(
        "--precisions",
        nargs="+",
        choices=PATHS,
        default=["float32", "bfloat16"],
        help="float32, bfloat16 autocast (where the CPU has bfloat16 arithmetic); -compiled: "
        "through torch.compile",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, channels_last")
    results = {}
    for path in args.precisions:
        train, infer = measure(args, path)
        results[path] = {"train_examples_per_s": train, "infer_examples_per_s": infer}
        print(f"{path:<18}{train:>10.2f} img/s training{infer:>10.2f} img/s inference")
    print(json.dumps({"torch": torch.__version__, "rates": results}))


if __name__ == "__main__":
    sys.exit(main())
