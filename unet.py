"""Exercise 2.1: U-Net for semantic segmentation (Ronneberger et al., 2015), Keras 3 functional API.

What this script teaches:
- the encoder (contracting path) halves the resolution and doubles the filters at each level, so
  the network sees context; the decoder (expanding path) up-samples back to the input size;
- skip connections *concatenate* encoder features to the decoder at the same resolution (ResNet
  *adds* them instead), which gives the decoder back the fine localisation that pooling threw away;
- the output is one probability per pixel: (N, H, W, 1) with a sigmoid for a binary mask, or
  (N, H, W, C) with a softmax over C classes.

The same builder makes a 3D U-Net when `input_shape` is (D, H, W, C): `build_unet3d`, which
conv3d.py trains (Çiçek et al. 2016; V-Net, Milletari et al. 2016, is the same idea with residual
blocks). Two of nnU-Net's variants (Isensee et al. 2021, 2024) are options of the same builder:
- `encoder="residual"`: residual blocks in the encoder (nnU-Net's ResEnc, in small form), which
  lets a deeper encoder train as easily as a shallow one;
- `deep_supervision=True`: a 1x1 head at each decoder level too, so that the lower levels get a
  gradient of their own (losses.DeepSupervisionLoss weighs them); `inference_model` drops them.

    python unet.py                                  # the TP's network: 32-64-128-(256)-128-64-32
    python unet.py --input-size 64 --base-filters 8 --depth 3
    python unet.py --upsampling bilinear --batch-norm none --dropout 0.3
    python unet.py --encoder residual --deep-supervision
"""

# First, before anything loads TensorFlow: its start-up notices filtered out by the project's
# tp4/startup.py where the checkout has it; copied on its own, this module runs without it.
import contextlib

with contextlib.suppress(ImportError):
    from tp4 import startup  # noqa: F401

# isort: split
import argparse
from collections.abc import Callable
from typing import Literal, get_args

import keras
from keras import layers

Upsampling = Literal["transpose", "bilinear", "nearest"]
UPSAMPLING = get_args(Upsampling)
Encoder = Literal["plain", "residual"]
ENCODERS = get_args(Encoder)
# Residual blocks per encoder level, bottleneck included (the last value repeats below). nnU-Net's
# ResEnc M has (1, 3, 4, 6, 6, 6): half as many here, for a laptop CPU.
RESIDUAL_BLOCKS = (1, 2, 2, 3)
# The normalization after each convolution: a layer class (or any callable taking `momentum` and
# `name`), None for none. Keras' BatchNormalization by default; the training scripts pass
# TensorFlow's fused kernel (tp4/models/batchnorm.py: same semantics, faster, above all in 16 bits).
NormLayer = Callable[..., layers.Layer]
_CONV = {2: layers.Conv2D, 3: layers.Conv3D}
_CONV_TRANSPOSE = {2: layers.Conv2DTranspose, 3: layers.Conv3DTranspose}
_POOL = {2: layers.MaxPooling2D, 3: layers.MaxPooling3D}
_UPSAMPLE = {2: layers.UpSampling2D, 3: layers.UpSampling3D}


def _conv_norm(x, filters, kernel_size, batch_norm, name, index=""):
    """Conv -> BatchNorm (`{name}_conv{index}`, `{name}_bn{index}`), 2D or 3D from the rank of
    `x`; no activation."""
    # A bias before batch normalization is cancelled by its mean subtraction: leave it out.
    x = _CONV[len(x.shape) - 2](
        filters,
        kernel_size,
        padding="same",
        use_bias=batch_norm is None,
        kernel_initializer="he_normal",
        name=f"{name}_conv{index}",
    )(x)
    if batch_norm is not None:
        # Momentum 0.9, not Keras' 0.99: with ~20 steps per epoch on a small dataset, the running
        # statistics used at validation would otherwise lag the weights for many epochs
        # (validation Dice near 0).
        x = batch_norm(momentum=0.9, name=f"{name}_bn{index}")(x)
    return x


def conv_block(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int = 3,
    batch_norm: NormLayer | None = layers.BatchNormalization,
    name: str = "block",
) -> keras.KerasTensor:
    """(Conv -> BatchNorm -> ReLU) twice, 2D or 3D from the rank of `x`.

    Args:
        x: features (N, H, W, C) or (N, D, H, W, C).
        filters: output channels of both convolutions.
        kernel_size: k, for k x k (x k) kernels.
        batch_norm: the normalization layer after each convolution (NormLayer), None for none.
        name: prefix of the layer names (`{name}_conv1`, `{name}_bn1`, ...).

    Returns:
        The block's output, same spatial size as `x`, `filters` channels.
    """
    for i in (1, 2):
        x = _conv_norm(x, filters, kernel_size, batch_norm, name, i)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def residual_block(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int = 3,
    batch_norm: NormLayer | None = layers.BatchNormalization,
    name: str = "res",
) -> keras.KerasTensor:
    """A residual block (He et al. 2016; nnU-Net's BasicBlockD): Conv -> BatchNorm -> ReLU ->
    Conv -> BatchNorm, plus the input, then ReLU. Where the channels change, the input goes through
    a 1x1 convolution (and batch norm) to match.

    Args: as `conv_block` (`name`: prefix of `{name}_conv1`, ..., `{name}_add`).

    Returns:
        The block's output, same spatial size as `x`, `filters` channels.
    """
    y = _conv_norm(x, filters, kernel_size, batch_norm, name, 1)
    y = layers.Activation("relu", name=f"{name}_relu1")(y)
    y = _conv_norm(y, filters, kernel_size, batch_norm, name, 2)
    if x.shape[-1] != filters:
        x = _conv_norm(x, filters, 1, batch_norm, f"{name}_shortcut")
    y = layers.Add(name=f"{name}_add")([y, x])
    return layers.Activation("relu", name=f"{name}_relu2")(y)


def _encoder_level(x, level, filters, encoder, kernel_size, batch_norm, name):
    """One encoder level (or the bottleneck): a conv_block, or residual blocks."""
    if encoder == "plain":
        return conv_block(x, filters, kernel_size, batch_norm, name=name)
    blocks = RESIDUAL_BLOCKS[min(level, len(RESIDUAL_BLOCKS) - 1)]
    for b in range(blocks):
        x = residual_block(x, filters, kernel_size, batch_norm, name=f"{name}_res{b + 1}")
    return x


def _up(x: keras.KerasTensor, filters: int, upsampling: Upsampling, name: str) -> keras.KerasTensor:
    spatial_dims = len(x.shape) - 2
    if upsampling == "transpose":
        return _CONV_TRANSPOSE[spatial_dims](filters, 2, strides=2, name=f"{name}_upconv")(x)
    # Keras' 3D up-sampling has no interpolation option: it is nearest-neighbour (check_config).
    options = {"interpolation": upsampling} if spatial_dims == 2 else {}
    return _UPSAMPLE[spatial_dims](2, name=f"{name}_upsample", **options)(x)


def check_config(
    input_shape: tuple[int, ...],
    base_filters: int,
    depth: int,
    num_classes: int = 1,
    upsampling: Upsampling = "transpose",
    kernel_size: int = 3,
    batch_norm: NormLayer | None = layers.BatchNormalization,
    encoder: Encoder = "plain",
) -> None:
    """Raise ValueError with a readable message for a configuration the network cannot take.

    Args: as `build_unet`.

    Raises:
        ValueError: naming the argument and what would work instead.
    """
    if len(input_shape) not in (3, 4):
        raise ValueError(f"input_shape must be (H, W, C) or (D, H, W, C), got {tuple(input_shape)}")
    if any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must hold positive integers, got {tuple(input_shape)}")
    for name, value in (
        ("depth", depth),
        ("base_filters", base_filters),
        ("num_classes", num_classes),
        ("kernel_size", kernel_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    if batch_norm is not None and not callable(batch_norm):
        raise ValueError(f"batch_norm must be a layer class or None, got {batch_norm!r}")
    if upsampling == "bilinear" and len(input_shape) == 4:
        raise ValueError(
            "bilinear up-sampling is 2D only; use 'transpose' or 'nearest' for volumes"
        )
    factor = 2 ** (depth - 1)
    if any(s % factor for s in input_shape[:-1]):
        raise ValueError(
            f"spatial size {tuple(input_shape[:-1])} is not divisible by 2**(depth-1) = {factor} "
            f"(depth {depth} pools {depth - 1} times); "
            f"use a multiple of {factor} or a smaller depth"
        )


def build_unet(
    input_shape: tuple[int, ...] = (128, 128, 1),
    base_filters: int = 32,
    depth: int = 4,
    num_classes: int = 1,
    batch_norm: NormLayer | None = layers.BatchNormalization,
    dropout: float = 0.0,
    upsampling: Upsampling = "transpose",
    skip_connections: bool = True,
    kernel_size: int = 3,
    output_bias: float | list[float] = 0.0,
    name: str = "UNet",
    encoder: Encoder = "plain",
    deep_supervision: bool = False,
) -> keras.Model:
    """U-Net with `depth` levels: base, 2*base, ... filters down, 2**(depth-1)*base at the
    bottleneck.

    Args:
        input_shape: (H, W, C) for a 2D network, (D, H, W, C) for a 3D one; every spatial size
            must be divisible by 2**(depth-1).
        base_filters: filters of the first level, doubled at each level down.
        depth: levels, bottleneck included (the network pools depth-1 times).
        num_classes: 1 gives a sigmoid (binary) output, more a softmax over classes.
        batch_norm: the normalization after every convolution: a layer class called as
            `batch_norm(momentum=..., name=...)` (keras.layers.BatchNormalization, or the fused
            kernel of tp4/models/batchnorm.py), or None for none.
        dropout: dropout rate at the bottleneck (0: none).
        upsampling: decoder up-sampling: transposed convolution, or bilinear/nearest resizing.
        skip_connections: False removes the concatenations (the ablation in REPORT.md).
        kernel_size: k, for k x k (x k) convolutions.
        output_bias: initial output logit: log(f / (1 - f)) makes the untrained network predict
            the foreground fraction f everywhere instead of 0.5, which spares the first epochs
            on imbalanced data. A softmax output takes one value per class (log f_c: the
            network starts at the class fractions).
        name: the model's name (logged as its architecture).
        encoder: "plain" (a conv_block per level) or "residual" (RESIDUAL_BLOCKS residual blocks
            per level, bottleneck included: nnU-Net's ResEnc); the decoder is the same.
        deep_supervision: also a 1x1 head at every decoder level below the full resolution, for
            training with losses.DeepSupervisionLoss.

    Returns:
        A keras.Model whose output has the input's spatial size and `num_classes` channels,
        float32 even under a mixed-precision policy. With deep supervision, the heads are packed
        along the channels, the full-resolution one first: head i (at 1/2**i of the input size)
        is up-sampled to the input size by repetition, so that `[:, ::2**i, ::2**i]` gives it
        back exactly. `inference_model` keeps the first.

    Raises:
        ValueError: for a configuration the network cannot take (check_config).
    """
    input_shape = tuple(input_shape)
    check_config(
        input_shape, base_filters, depth, num_classes, upsampling, kernel_size, batch_norm, encoder
    )
    spatial_dims = len(input_shape) - 1
    inputs = keras.Input(shape=input_shape, name="image")

    # Encoder: features at full resolution are kept for the decoder before each pooling.
    x, skips = inputs, []
    for level in range(depth - 1):
        filters, level_name = base_filters * 2**level, f"enc{level + 1}"
        x = _encoder_level(x, level, filters, encoder, kernel_size, batch_norm, level_name)
        skips.append(x)
        x = _POOL[spatial_dims](2, name=f"enc{level + 1}_pool")(x)

    bottleneck_filters = base_filters * 2 ** (depth - 1)
    x = _encoder_level(
        x, depth - 1, bottleneck_filters, encoder, kernel_size, batch_norm, "bottleneck"
    )
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    # Decoder: up-sample, concatenate the encoder features of the same size, convolve.
    heads = []  # deep supervision: the decoder levels below the full resolution, deepest first
    for level in reversed(range(depth - 1)):
        filters = base_filters * 2**level
        x = _up(x, filters, upsampling, name=f"dec{level + 1}")
        if skip_connections:
            x = layers.Concatenate(name=f"dec{level + 1}_skip")([x, skips[level]])
        x = conv_block(x, filters, kernel_size, batch_norm, name=f"dec{level + 1}")
        if deep_supervision and level > 0:
            head = _head(x, num_classes, output_bias, name=f"dec{level + 1}_head")
            heads.append(_UPSAMPLE[spatial_dims](2**level, name=f"dec{level + 1}_head_up")(head))

    outputs = _head(x, num_classes, output_bias, name="mask")
    if heads:
        outputs = layers.Concatenate(name="deep_supervision", dtype="float32")(
            [outputs, *reversed(heads)]
        )
    return keras.Model(inputs, outputs, name=name)


def _head(x, num_classes, output_bias, name):
    """The 1x1 convolution to class probabilities; float32 even under a mixed-precision policy:
    probabilities and losses need the range."""
    return _CONV[len(x.shape) - 2](
        num_classes,
        1,
        activation="sigmoid" if num_classes == 1 else "softmax",
        dtype="float32",
        name=name,
        bias_initializer=keras.initializers.Constant(output_bias),
    )(x)


def heads(model: keras.Model) -> int:
    """How many outputs `model` packs along its channels: 1, or with deep supervision the
    full-resolution one and one per decoder level below it."""
    return model.output_shape[-1] // model.get_layer("mask").output.shape[-1]


def inference_model(model: keras.Model) -> keras.Model:
    """`model` with its full-resolution output only (deep supervision's heads dropped), the same
    layers and weights; `model` itself if it has no other head."""
    if heads(model) == 1:
        return model
    return keras.Model(model.input, model.get_layer("mask").output, name=model.name)


def build_unet3d(
    input_shape: tuple[int, int, int, int] = (32, 64, 64, 1),
    base_filters: int = 8,
    depth: int = 3,
    kernel_size: int = 3,
    output_bias: float = 0.0,
    name: str = "UNet3D",
    batch_norm: NormLayer | None = layers.BatchNormalization,
    encoder: Encoder = "plain",
    deep_supervision: bool = False,
) -> keras.Model:
    """Small 3D U-Net: `build_unet` with Conv3D blocks, 2x2x2 pooling and transposed Conv3D.

    Args:
        input_shape: (D, H, W, C).
        base_filters, depth, kernel_size, output_bias, name, batch_norm, encoder,
        deep_supervision: as `build_unet`.

    Returns:
        A keras.Model with a (N, D, H, W, 1) sigmoid output (one channel per head with deep
        supervision).

    Raises:
        ValueError: if `input_shape` is not (D, H, W, C), or for what `build_unet` refuses.
    """
    if len(input_shape) != 4:
        raise ValueError(f"a volume input must be (D, H, W, C), got {tuple(input_shape)}")
    return build_unet(
        tuple(input_shape),
        base_filters,
        depth,
        batch_norm=batch_norm,
        kernel_size=kernel_size,
        output_bias=output_bias,
        name=name,
        encoder=encoder,
        deep_supervision=deep_supervision,
    )


def describe(model: keras.Model) -> dict[str, object]:
    """What a U-Net built here is, read from its layers: flat MLflow params.

    Args:
        model: a model from `build_unet` or `build_unet3d`.

    Returns:
        architecture (the model's name), depth, base_filters, kernel_size, upsampling,
        batch_norm (fused, keras, synchronized or none), skip_connections, encoder (plain or
        residual), deep_supervision (the heads it trains, 1 without) and n_params.
    """
    first = next(layer for layer in model.layers if isinstance(layer, tuple(_CONV.values())))
    kinds = {type(layer) for layer in model.layers}
    if kinds & set(_CONV_TRANSPOSE.values()):
        upsampling = "transpose"
    else:
        resizers = [
            layer
            for layer in model.layers
            if isinstance(layer, tuple(_UPSAMPLE.values())) and not layer.name.endswith("head_up")
        ]
        upsampling = getattr(resizers[0], "interpolation", "nearest") if resizers else "none"
    return {
        "architecture": model.name,
        "depth": sum(isinstance(layer, tuple(_POOL.values())) for layer in model.layers) + 1,
        "base_filters": first.filters,
        "kernel_size": first.kernel_size[0],
        "upsampling": upsampling,
        "batch_norm": _batch_norm_kind(model),
        "skip_connections": any(layer.name.endswith("_skip") for layer in model.layers),
        "encoder": "residual" if layers.Add in kinds else "plain",
        "deep_supervision": heads(model),
        "n_params": model.count_params(),
    }


def _batch_norm_kind(model):
    """keras, synchronized (Keras' layer across replicas), the prefix of another normalization
    class (FusedBatchNormalization: fused), or none."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            return "synchronized" if layer.synchronized else "keras"
        if type(layer).__name__.endswith("BatchNormalization"):
            return type(layer).__name__.removesuffix("BatchNormalization").lower()
    return "none"


def add_arguments(parser: argparse.ArgumentParser, base_filters: int, depth: int) -> None:
    """The U-Net's size on unet.py's command line (the training scripts have theirs in their
    configuration)."""
    add = parser.add_argument
    add("--base-filters", type=int, default=base_filters, help="filters at the first level")
    add(
        "--depth", type=int, default=depth, help="levels, bottleneck included (pools depth-1 times)"
    )


def add_classes_argument(parser: argparse.ArgumentParser) -> None:
    """--num-classes, counting the background (unet.py and train.py)."""
    parser.add_argument(
        "--num-classes",
        type=int,
        default=2,
        help="classes, background included: 2 is a binary mask (one sigmoid output), C >= 3 a "
        "softmax over C classes (train.py's synthetic data: C-1 kinds of lesion; real masks: "
        "labels 0..C-1)",
    )


def count_params(model: keras.Model) -> tuple[int, int]:
    """(total, trainable) parameter counts of `model`."""
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return model.count_params(), trainable


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="unet.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--input-size", type=int, default=128, help="height and width of the input image")
    add("--channels", type=int, default=1, help="input channels (1 for a grey-level scan)")
    add_arguments(parser, base_filters=32, depth=4)
    add_classes_argument(parser)
    add("--upsampling", choices=UPSAMPLING, default="transpose", help="decoder up-sampling")
    add("--dropout", type=float, default=0.0, help="dropout rate at the bottleneck")
    add("--no-batch-norm", action="store_true", help="no batch normalization")
    add("--no-skip", action="store_true", help="no skip connections (ablation)")
    add("--encoder", choices=ENCODERS, default="plain", help="encoder blocks (residual: ResEnc)")
    add("--deep-supervision", action="store_true", help="a head at each decoder level too")
    add("--quiet", action="store_true", help="no layer-by-layer summary")
    args = parser.parse_args()
    if args.num_classes < 2:
        parser.error("--num-classes must be at least 2 (background included)")
    binary = args.num_classes == 2

    try:
        model = build_unet(
            (args.input_size, args.input_size, args.channels),
            args.base_filters,
            args.depth,
            1 if binary else args.num_classes,
            None if args.no_batch_norm else layers.BatchNormalization,
            args.dropout,
            args.upsampling,
            not args.no_skip,
            encoder=args.encoder,
            deep_supervision=args.deep_supervision,
        )
    except ValueError as error:
        parser.error(str(error))
    if not args.quiet:
        model.summary(line_length=100)
    total, trainable = count_params(model)
    print(
        f"parameters: {total:,} total, {trainable:,} trainable, {total - trainable:,} non-trainable"
    )
    print(f"input  shape: {model.input_shape}  (batch, height, width, channels)")
    kind = "sigmoid, one foreground probability" if binary else "softmax over classes"
    print(f"output shape: {model.output_shape}  ({kind} per pixel)")


if __name__ == "__main__":
    main()
