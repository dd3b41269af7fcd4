"""unet.py: shapes, parameter counts by hand, refusal of bad configurations, the command line."""

import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import REPO

import unet


def _block_params(c_in, c_out, k=3, spatial_dims=2):
    """Two convolutions without bias (batch norm follows), each with 4 batch-norm parameters per
    filter."""
    kernel = k**spatial_dims
    return kernel * c_in * c_out + 4 * c_out + kernel * c_out * c_out + 4 * c_out


def _unet_params(channels, base, depth, classes=1, spatial_dims=2):
    filters = [base * 2**level for level in range(depth)]
    total, c_in = 0, channels
    for f in filters:  # encoder blocks and bottleneck
        total += _block_params(c_in, f, spatial_dims=spatial_dims)
        c_in = f
    for f in reversed(
        filters[:-1]
    ):  # transposed conv 2x..x2 (with bias) then a block on the concatenation
        total += (
            2**spatial_dims * (2 * f) * f + f + _block_params(2 * f, f, spatial_dims=spatial_dims)
        )
    return total + filters[0] * classes + classes  # 1x1 output convolution


def test_default_is_the_tps_network():
    model = unet.build_unet()
    assert model.input_shape == (None, 128, 128, 1)
    assert model.output_shape == (None, 128, 128, 1)
    assert model.count_params() == _unet_params(1, 32, 4) == 1_929_249
    conv_filters = [
        layer.filters
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
        and not isinstance(layer, keras.layers.Conv2DTranspose)
    ]
    assert conv_filters == [32, 32, 64, 64, 128, 128, 256, 256, 128, 128, 64, 64, 32, 32, 1]
    total, trainable = unet.count_params(model)
    assert total - trainable == 2 * sum(
        2 * f for f in (32, 64, 128, 256, 128, 64, 32)
    )  # BN moving stats


def test_sigmoid_output_is_a_probability_map():
    model = unet.build_unet((32, 32, 1), base_filters=4, depth=3)
    out = model.predict(np.random.default_rng(0).random((2, 32, 32, 1)), verbose=0)
    assert out.shape == (2, 32, 32, 1) and (out >= 0).all() and (out <= 1).all()


def test_softmax_output_sums_to_one_over_classes():
    model = unet.build_unet((32, 48, 2), base_filters=4, depth=3, num_classes=3)
    assert model.count_params() == _unet_params(2, 4, 3, classes=3)
    out = model.predict(np.random.default_rng(0).random((2, 32, 48, 2)), verbose=0)
    assert out.shape == (2, 32, 48, 3)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)


def test_3d_unet_from_a_volume_shape():
    model = unet.build_unet((8, 16, 16, 1), base_filters=4, depth=2)
    assert model.output_shape == (None, 8, 16, 16, 1)
    assert model.count_params() == _unet_params(1, 4, 2, spatial_dims=3)


@pytest.mark.parametrize(
    "options",
    [
        dict(upsampling="bilinear"),
        dict(upsampling="nearest"),
        dict(batch_norm=None),
        dict(batch_norm=keras.layers.BatchNormalization),
        dict(dropout=0.5),
    ],
)
def test_variants_keep_the_output_shape(options):
    model = unet.build_unet((32, 32, 1), base_filters=4, depth=3, **options)
    assert model.output_shape == (None, 32, 32, 1)


def test_without_skips_no_concatenation_and_fewer_parameters():
    with_skips = unet.build_unet((32, 32, 1), base_filters=4, depth=3)
    without = unet.build_unet((32, 32, 1), base_filters=4, depth=3, skip_connections=False)
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in without.layers)
    # Each decoder's first convolution loses the f input channels of the skip: 9*f*f weights.
    assert with_skips.count_params() - without.count_params() == 9 * 4 * 4 + 9 * 8 * 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(100, 100, 1)), "not divisible by 2\\*\\*\\(depth-1\\) = 8"),
        (dict(input_shape=(64, 64, 1), depth=8), "not divisible"),
        (dict(depth=0), "depth"),
        (dict(base_filters=0), "base_filters"),
        (dict(input_shape=(64, 64)), "input_shape"),
        (dict(upsampling="cubic"), "upsampling"),
        (dict(input_shape=(8, 16, 16, 1), upsampling="bilinear"), "2D only"),
    ],
)
def test_bad_configurations_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unet.build_unet(**kwargs)


@pytest.mark.slow
def test_command_line_prints_shapes_and_refuses_bad_sizes():
    ok = subprocess.run(
        [sys.executable, REPO / "unet.py", "--quiet", "--input-size", "64", "--base-filters", "8"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "output shape: (None, 64, 64, 1)" in ok.stdout
    assert f"{_unet_params(1, 8, 4):,} total" in ok.stdout
    bad = subprocess.run(
        [sys.executable, REPO / "unet.py", "--input-size", "100"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("unet.py: error: spatial size (100, 100)")
    assert "Traceback" not in bad.stderr


# ---- nnU-Net's variants: deep supervision and the residual encoder
# ------------------------------------------------------------------------------------------------


def test_deep_supervision_packs_one_head_per_decoder_level_and_inference_keeps_the_first():
    model = unet.build_unet((32, 32, 1), base_filters=8, depth=4, deep_supervision=True)
    assert model.output_shape == (None, 32, 32, 3) and unet.heads(model) == 3
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype("float32")
    packed = model.predict(x, verbose=0)
    # Head i sits at 1/2**i of the input, repeated up to it: each 2**i block holds one value.
    quarter = packed[..., 2]
    np.testing.assert_array_equal(quarter, np.repeat(np.repeat(quarter[:, ::4, ::4], 4, 1), 4, 2))
    inference = unet.inference_model(model)
    assert len(inference.outputs) == 1 and inference.output_shape == (None, 32, 32, 1)
    np.testing.assert_allclose(inference.predict(x, verbose=0), packed[..., :1], atol=1e-6)
    # The heads are 1x1 convolutions of 16 and 32 channels: what the saved model sheds.
    assert model.count_params() - inference.count_params() == (16 + 1) + (32 + 1)
    assert unet.inference_model(inference) is inference


def test_deep_supervision_multiclass_and_3d_heads():
    model = unet.build_unet(
        (32, 32, 1), base_filters=8, depth=3, num_classes=3, deep_supervision=True
    )
    assert model.output_shape == (None, 32, 32, 6) and unet.heads(model) == 2
    volume = unet.build_unet3d((8, 16, 16, 1), base_filters=4, depth=3, deep_supervision=True)
    assert volume.output_shape == (None, 8, 16, 16, 2)
    assert unet.describe(volume)["deep_supervision"] == 2


def test_residual_encoder_blocks_and_parameters():
    plain = unet.build_unet((32, 32, 1), base_filters=8, depth=3)
    residual = unet.build_unet((32, 32, 1), base_filters=8, depth=3, encoder="residual")
    assert residual.output_shape == (None, 32, 32, 1)
    adds = [layer.name for layer in residual.layers if isinstance(layer, keras.layers.Add)]
    # RESIDUAL_BLOCKS = (1, 2, 2, ...): one block at level 1, two at level 2 and at the bottleneck.
    assert adds == ["enc1_res1_add", "enc2_res1_add", "enc2_res2_add"] + [
        "bottleneck_res1_add",
        "bottleneck_res2_add",
    ]
    # Extra over the plain encoder: a second block of 16 and of 32 filters (two 3x3 convolutions
    # and their batch norms each), and the 1x1 shortcuts where the channels change (1->8, 8->16,
    # 16->32), each with its batch norm.
    extra = sum(_block_params(f, f) for f in (16, 32)) + sum(
        c_in * c_out + 4 * c_out for c_in, c_out in ((1, 8), (8, 16), (16, 32))
    )
    assert residual.count_params() - plain.count_params() == extra
    described = unet.describe(residual)
    assert described["encoder"] == "residual" and described["kernel_size"] == 3
    assert unet.describe(plain)["encoder"] == "plain"
    with pytest.raises(ValueError, match="encoder"):
        unet.build_unet((32, 32, 1), encoder="dense")
