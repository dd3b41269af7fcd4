"""Measured speed: each precision x XLA on/off, against the machine's ceiling and against PyTorch.

What this script teaches:
- the same network can be several times faster or slower depending on the precision and on XLA,
  and which wins depends on the machine: the matrix shows, for the 2D U-Net and the Conv3D model,
  training and inference throughput for each precision this machine supports x XLA on/off, and
  marks the cell `--precision auto --xla auto` picks (speed.py) with its distance to the best cell;
- a speed number means something next to the machine's ceiling: achieved GFLOP/s over a dense
  matmul's rate at the same precision (throughput.py explains the FLOP count and the timing);
- 16-bit activations halve the memory: peak RSS of a training step per precision (memory.py);
- `--vs-pytorch`: the same U-Net in PyTorch, on its best CPU path (bench_pytorch.py);
- the end-to-end train.py run and the levers run in processes of their own (bench_runs.py).

    python -m tools.bench  # the matrix for both models, then train.py end to end
    python -m tools.bench --only unet2d --skip-end-to-end --vs-pytorch   # the U-Net against PyTorch
    python -m tools.bench --levers             # each speed lever in a fresh process
    python -m tools.bench --paste PERFORMANCE.md   # paste the bench.json outputs its marks name
    python -m tools.bench --quick  # CI-size shapes: checks that the benchmark still runs
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import contextlib
import io
import json
import sys

import keras
import tensorflow as tf

import unet
from tools import bench_runs
from tp4 import cli
from tp4.models import batchnorm, folding
from tp4.perf import hardware, memory, speed, throughput

FULL = dict(size=128, filters=32, depth=4, batch=8, volume=(32, 64, 64), filters3d=8, depth3d=3)
FULL.update(batch3d=2, matmul=(1024, 2048, 4096), steps=8, repeats=5, e2e_epochs=3, e2e_images=200)
QUICK = dict(size=32, filters=8, depth=3, batch=4, volume=(8, 16, 16), filters3d=4, depth3d=2)
QUICK.update(batch3d=2, matmul=(512,), steps=2, repeats=2, e2e_epochs=1, e2e_images=24)
# Flags of the vector and matrix units a CPU's speed depends on: printed with the results.
CPU_UNITS = ("avx", "amx", "fma", "f16c", "bf16", "fp16", "asimd", "sve", "neon")


def machine_line(found):
    if found["kind"] == "gpu":
        return f"machine: {found['device']}, TensorFlow {found['tensorflow']}"
    flags = " ".join(f for f in found["flags"] if any(unit in f for unit in CPU_UNITS))
    return f"machine: {found['device']}; flags {flags}; TensorFlow {found['tensorflow']}"


def ceilings(c, precisions):
    """Dense matmul GFLOP/s at each precision: the best library's (throughput.matmul_gflops)."""
    peaks = {}
    for precision in precisions:
        rates = throughput.matmul_gflops(c["matmul"], c["repeats"], precision)
        peaks[precision] = max(rates.values())
        found = ", ".join(f"{library} {rate:.1f}" for library, rate in rates.items())
        print(f"dense {precision} matmul, best of sizes {c['matmul']}: {found} GFLOP/s")
    return peaks


def models(c, args):
    """name -> (builder at the global dtype policy, batch)."""
    builders = {
        "unet2d": (
            lambda: unet.build_unet(
                (c["size"], c["size"], 1),
                c["filters"],
                c["depth"],
                batch_norm=batchnorm.layer(args.batch_norm),
                upsampling=args.upsampling,
            ),
            c["batch"],
        ),
        "conv3d": (
            lambda: unet.build_unet3d(
                (*c["volume"], 1),
                c["filters3d"],
                c["depth3d"],
                batch_norm=batchnorm.layer(args.batch_norm),
            ),
            c["batch3d"],
        ),
    }
    return {name: built for name, built in builders.items() if args.only in (None, name)}


def cells_to_measure(args, supported, auto):
    """The (precision, XLA) cells of the matrix that the flags ask for."""
    precisions = {"all": supported, "auto": (auto.precision,)}.get(
        args.precision, (args.precision,)
    )
    xlas = {"all": (False, True), "auto": (auto.xla,)}.get(args.xla, (args.xla == "on",))
    return [speed.Choice(p, x) for p in precisions for x in xlas]


def measure_cell(build, batch, cell, c, steps_per_execution):
    """Training and inference examples/s of one cell (throughput.py: as train.py trains)."""
    with speed.policy_scope(cell.precision):
        model = build()
    epoch = throughput.training_epoch(model, batch, cell.xla, c["steps"], steps_per_execution)
    return {
        "precision": cell.precision,
        "xla": cell.xla,
        "train_examples_per_s": throughput.median_rate(epoch, c["repeats"]),
        # Inference as predict.py runs it (segment.at_speed): batch norms folded.
        "infer_examples_per_s": throughput.median_rate(
            throughput.inference_calls(folding.fold_batch_norm(model), batch), c["repeats"]
        ),
    }


def bench_model(name, build, batch, c, args, peaks):
    """The matrix of one model, printed: a row per cell, auto's cells marked, peak memory."""
    reference = build()
    flops = throughput.forward_flops(reference)
    shape = "x".join(map(str, reference.input_shape[1:-1]))
    trained = speed.choose("auto", "auto", build, batch)
    auto = {"train": trained, "infer": speed.for_inference(trained.precision)}  # as predict.py
    print(f"\n{name} {shape}, batch {batch}: {flops / 1e9:.2f} GFLOP per example forward")
    header = f"{'train ex/s':>12}{'of peak':>9}{'infer ex/s':>14}{'of peak':>9}"
    print(f"{'precision':<10}{'XLA':<5}{header}")
    cells = []
    for cell in cells_to_measure(args, tuple(peaks), auto["train"]):
        row = measure_cell(build, batch, cell, c, args.steps_per_execution)
        text = f"{cell.precision:<10}{'on' if cell.xla else 'off':<5}"
        for mode, factor in (("train", 3), ("infer", 1)):
            rate = row[f"{mode}_examples_per_s"]
            row[f"{mode}_of_peak"] = factor * flops * rate / 1e9 / peaks[cell.precision]
            mark = "*" if cell == auto[mode] else " "
            text += (
                f"{rate:>{12 if mode == 'train' else 14}.2f}{mark}{row[f'{mode}_of_peak']:>8.0%}"
            )
        print(text, flush=True)
        cells.append(row)
    report = {"shape": shape, "batch": batch, "params": reference.count_params()}
    report.update(gflop_forward_per_example=flops / 1e9, cells=cells)
    report["auto"] = {mode: choice._asdict() for mode, choice in auto.items()}
    summarize_auto(auto, cells)
    if not args.no_peak_memory:
        report["peak_rss_mb"] = peak_memory(reference, batch, peaks)
    return report


def summarize_auto(auto, cells):
    """Where auto's cells stand against the best cells (target: within 10 %)."""
    found = []
    for mode, label in (("train", "training"), ("infer", "inference")):
        key = f"{mode}_examples_per_s"
        best = max(cells, key=lambda row: row[key])
        mine = [row for row in cells if (row["precision"], row["xla"]) == tuple(auto[mode])]
        if mine and len(cells) > 1:
            found.append(
                f"{label} {auto[mode].label}, {mine[0][key] / best[key]:.0%} of the best cell "
                f"({speed.Choice(best['precision'], best['xla']).label})"
            )
    if found:
        print("* auto (speed.py): " + "; ".join(found))


def peak_memory(model, batch, peaks):
    """Peak RSS of a training step (XLA off) at each precision, each in a fresh process."""
    described = unet.describe(model)
    spec = dict(shape=list(model.input_shape[1:-1]), batch=batch, kernel=described["kernel_size"])
    spec.update(filters=described["base_filters"], depth=described["depth"])
    found = {
        p: memory.measure_in_subprocess({**spec, "policy": speed.POLICIES[p]})["peak_rss_mb"]
        for p in peaks
    }
    measured = ", ".join(f"{p} {mb:.0f} MB" for p, mb in found.items() if mb is not None)
    print(f"peak RSS of a training step (a fresh process, XLA off): {measured}")
    return found


def parse_args(argv=None):
    parser = cli.argument_parser("bench.py", __doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help="CI-size shapes (seconds, not minutes)")
    add("--output", default="bench.json", help="where to write the measurements")
    add("--only", choices=("unet2d", "conv3d"), help="benchmark one model only")
    add(
        "--precision",
        choices=("all", "auto", *speed.PRECISIONS),
        default="all",
        help="the matrix's precisions: all those supported here, auto's for training, or one",
    )
    add(
        "--xla",
        choices=("all", *speed.XLA_SETTINGS),
        default="all",
        help="the matrix's XLA settings: both, auto's for training, or one",
    )
    add("--skip-end-to-end", action="store_true", help="skip the train.py run")
    add(
        "--e2e-epochs",
        type=cli.at_least(1),
        help="epochs of the train.py run [default: 3, quick 1]",
    )
    add("--no-peak-memory", action="store_true", help="skip the peak memory per precision")
    add("--vs-pytorch", action="store_true", help="the same U-Net in PyTorch (bench_pytorch.py)")
    add("--levers", action="store_true", help="each lever in a fresh process, then stop")
    add("--paste", metavar="MARKDOWN", help="paste the bench.json outputs MARKDOWN names, and stop")
    # Levers, to measure one change at a time against the defaults.
    count = cli.at_least(1)
    add("--batch-size", type=count, help="2D batch size [default: train.py's, 8]")
    add("--batch-norm", choices=batchnorm.KINDS, default="fused", help="batch norm layer")
    add("--upsampling", choices=unet.UPSAMPLING, default="transpose", help="decoder up-sampling")
    add("--steps-per-execution", type=count, default=1, help="training steps per compiled call")
    add("--inter-op-threads", type=count, help="TensorFlow inter-op threads [default: its own]")
    add("--intra-op-threads", type=count, help="TensorFlow intra-op threads [default: its own]")
    return parser.parse_args(argv), parser


def measure(args, c):
    """Every measurement the flags ask for, printed; returns the report."""
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    # Several models in one process: retracing warnings are expected here.
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(0)
    found = hardware.machine()
    supported = hardware.supported_precisions(found)
    print(machine_line(found))
    report = {"config": c, "machine": machine_line(found), "peak_gflops": ceilings(c, supported)}
    for name, (build, batch) in models(c, args).items():
        report[name] = bench_model(name, build, batch, c, args, report["peak_gflops"])
    if args.vs_pytorch:
        if "unet2d" not in report:
            raise ValueError("--vs-pytorch compares the 2D U-Net: not with --only conv3d")
        build = models(c, args)["unet2d"][0]
        report["pytorch"] = bench_runs.vs_pytorch(
            c,
            supported,
            report["unet2d"]["auto"],
            lambda cell: measure_cell(build, c["batch"], cell, c, 1),
        )
    if not args.skip_end_to_end and "unet2d" in report:
        e2e = bench_runs.train_py(args.e2e_epochs or c["e2e_epochs"], c["e2e_images"], args.quick)
        report["train_py"] = e2e
        print(
            f"\ntrain.py defaults ({e2e['precision']}, XLA {'on' if e2e['xla'] else 'off'}), "
            f"{e2e['epochs']} epochs: wall {e2e['wall_seconds']:.1f} s = "
            f"{e2e['wall_over_run_steps']:.2f}x its own training steps "
            f"({e2e['run_steps_seconds']:.1f} s); beyond them: validation "
            f"{e2e['validation_seconds']:.1f} s, first epoch (compiles) "
            f"{e2e['first_epoch_extra_seconds']:.1f} s longer than the median epoch, MLflow "
            f"{e2e['mlflow_seconds']:.1f} s"
        )
    return report


class _Tee(io.StringIO):
    """Keeps what is printed (for bench.json's "printed") and prints it."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)

    def flush(self):
        self.stream.flush()


def main(argv=None):
    args, parser = parse_args(argv)
    cli.setup()
    with cli.command_line_errors(parser):
        if args.paste:
            pasted, absent = bench_runs.paste(args.paste)
            kept = (
                f"; kept as they were (not on this machine): {', '.join(absent)}" if absent else ""
            )
            return print(f"pasted into {args.paste}: {', '.join(pasted) or 'nothing'}{kept}")
        cli.check_output_file("--output", args.output)  # before minutes of measuring
        c = dict(QUICK if args.quick else FULL)
        c["batch"] = args.batch_size or c["batch"]
        with contextlib.redirect_stdout(_Tee(sys.stdout)) as printed:
            if args.levers:
                print(machine_line(hardware.machine()))
                report = {"levers": bench_runs.levers(args.quick)}
            else:
                report = measure(args, c)
        report["printed"] = printed.getvalue()
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    cli.run(main)
