"""Exercise 2.1: U-Net for semantic segmentation (Ronneberger et al., 2015), Keras 3 functional API.

What this script teaches:
- the encoder (contracting path) halves the resolution and doubles the filters at each level, so the
  network sees context; the decoder (expanding path) up-samples back to the input size;
- skip connections *concatenate* encoder features to the decoder at the same resolution (ResNet *adds*
  them instead), which gives the decoder back the fine localisation that pooling threw away;
- the output is one probability per pixel: (N, H, W, 1) with a sigmoid for a binary mask, or
  (N, H, W, C) with a softmax over C classes.

The same builder makes a 3D U-Net when `input_shape` is (D, H, W, C): conv3d.py uses it that way.

    python unet.py                                  # the TP's network: 32-64-128-(256)-128-64-32
    python unet.py --input-size 64 --base-filters 8 --depth 3
    python unet.py --upsampling bilinear --no-batch-norm --dropout 0.3
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
from keras import layers

UPSAMPLING = ("transpose", "bilinear", "nearest")
_CONV = {2: layers.Conv2D, 3: layers.Conv3D}
_CONV_TRANSPOSE = {2: layers.Conv2DTranspose, 3: layers.Conv3DTranspose}
_POOL = {2: layers.MaxPooling2D, 3: layers.MaxPooling3D}


def conv_block(x, filters, kernel_size=3, batch_norm=True, name="block"):
    """(Conv -> BatchNorm -> ReLU) twice. 2D or 3D, from the rank of `x`."""
    conv = _CONV[len(x.shape) - 2]
    for i in (1, 2):
        # A bias before batch normalization is cancelled by its mean subtraction: leave it out.
        x = conv(filters, kernel_size, padding="same", use_bias=not batch_norm, kernel_initializer="he_normal",
                 name=f"{name}_conv{i}")(x)
        if batch_norm:
            # Momentum 0.9, not Keras' 0.99: with ~20 steps per epoch on a small dataset, the running statistics
            # used at validation would otherwise lag the weights for many epochs (validation Dice near 0).
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def _up(x, filters, upsampling, name):
    spatial_dims = len(x.shape) - 2
    if upsampling == "transpose":
        return _CONV_TRANSPOSE[spatial_dims](filters, 2, strides=2, name=f"{name}_upconv")(x)
    if spatial_dims == 2:
        return layers.UpSampling2D(2, interpolation=upsampling, name=f"{name}_upsample")(x)
    return layers.UpSampling3D(2, name=f"{name}_upsample")(x)  # Keras' 3D up-sampling is nearest-neighbour


def check_config(input_shape, base_filters, depth, num_classes=1, upsampling="transpose", kernel_size=3):
    """Raise ValueError with a readable message for a configuration the network cannot take."""
    if len(input_shape) not in (3, 4):
        raise ValueError(f"input_shape must be (H, W, C) or (D, H, W, C), got {tuple(input_shape)}")
    if any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must hold positive integers, got {tuple(input_shape)}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (levels, bottleneck included), got {depth}")
    if not isinstance(base_filters, int) or base_filters < 1:
        raise ValueError(f"base_filters must be a positive integer, got {base_filters}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive integer, got {kernel_size}")
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    if upsampling == "bilinear" and len(input_shape) == 4:
        raise ValueError("bilinear up-sampling is 2D only; use 'transpose' or 'nearest' for volumes")
    factor = 2 ** (depth - 1)
    bad = [s for s in input_shape[:-1] if s % factor]
    if bad:
        raise ValueError(f"spatial size {tuple(input_shape[:-1])} is not divisible by 2**(depth-1) = {factor} "
                         f"(depth {depth} pools {depth - 1} times); use a multiple of {factor} or a smaller depth")


def build_unet(input_shape=(128, 128, 1), base_filters=32, depth=4, num_classes=1, batch_norm=True, dropout=0.0,
               upsampling="transpose", skip_connections=True, kernel_size=3, output_bias=0.0,
               name="UNet") -> keras.Model:
    """U-Net with `depth` levels: filters base, 2*base, ... at each encoder level, 2**(depth-1)*base at the bottleneck.

    num_classes=1 gives a sigmoid (binary) output, num_classes>1 a softmax over classes; the output has the
    input's spatial size. skip_connections=False removes the concatenations (for the ablation in REPORT.md).
    output_bias initializes the output logits: log(f / (1 - f)) makes the untrained network predict the
    foreground fraction f everywhere instead of 0.5, which spares the first epochs on imbalanced data.
    """
    input_shape = tuple(input_shape)
    check_config(input_shape, base_filters, depth, num_classes, upsampling, kernel_size)
    spatial_dims = len(input_shape) - 1
    inputs = keras.Input(shape=input_shape, name="image")

    # Encoder: features at full resolution are kept for the decoder before each pooling.
    x, skips = inputs, []
    for level in range(depth - 1):
        x = conv_block(x, base_filters * 2**level, kernel_size, batch_norm, name=f"enc{level + 1}")
        skips.append(x)
        x = _POOL[spatial_dims](2, name=f"enc{level + 1}_pool")(x)

    x = conv_block(x, base_filters * 2 ** (depth - 1), kernel_size, batch_norm, name="bottleneck")
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    # Decoder: up-sample, concatenate the encoder features of the same size, convolve.
    for level in reversed(range(depth - 1)):
        filters = base_filters * 2**level
        x = _up(x, filters, upsampling, name=f"dec{level + 1}")
        if skip_connections:
            x = layers.Concatenate(name=f"dec{level + 1}_skip")([x, skips[level]])
        x = conv_block(x, filters, kernel_size, batch_norm, name=f"dec{level + 1}")

    # Float32 output even under a mixed-precision policy: probabilities and losses need the range.
    activation = "sigmoid" if num_classes == 1 else "softmax"
    outputs = _CONV[spatial_dims](num_classes, 1, activation=activation, dtype="float32", name="mask",
                                  bias_initializer=keras.initializers.Constant(output_bias))(x)
    return keras.Model(inputs, outputs, name=name)


def count_params(model):
    """(total, trainable) parameter counts."""
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return model.count_params(), trainable


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input-size", type=int, default=128, help="height and width of the input image")
    parser.add_argument("--channels", type=int, default=1, help="input channels (1 for a grey-level scan)")
    parser.add_argument("--base-filters", type=int, default=32, help="filters of the first level")
    parser.add_argument("--depth", type=int, default=4, help="levels, bottleneck included (pools depth-1 times)")
    parser.add_argument("--num-classes", type=int, default=1, help="1: sigmoid binary mask; >1: softmax classes")
    parser.add_argument("--upsampling", choices=UPSAMPLING, default="transpose", help="decoder up-sampling")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout rate at the bottleneck")
    parser.add_argument("--no-batch-norm", action="store_true", help="no batch normalization")
    parser.add_argument("--no-skip", action="store_true", help="no skip connections (ablation)")
    parser.add_argument("--quiet", action="store_true", help="no layer-by-layer summary")
    args = parser.parse_args()

    try:
        model = build_unet((args.input_size, args.input_size, args.channels), args.base_filters, args.depth,
                           args.num_classes, not args.no_batch_norm, args.dropout, args.upsampling,
                           not args.no_skip)
    except ValueError as error:
        parser.error(str(error))
    if not args.quiet:
        model.summary(line_length=100)
    total, trainable = count_params(model)
    print(f"parameters: {total:,} total, {trainable:,} trainable, {total - trainable:,} non-trainable")
    print(f"input  shape: {model.input_shape}  (batch, height, width, channels)")
    kind = "sigmoid, one foreground probability" if args.num_classes == 1 else "softmax over classes"
    print(f"output shape: {model.output_shape}  ({kind} per pixel)")


if __name__ == "__main__":
    main()
