"""profile_step.py: op events summed by type from a hand-made profile, and a tiny profiled epoch
whose op types are the U-Net's."""

import pytest
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from tools import profile_step


def _space(events, line="tf_Compute/0"):
    """A host plane with one line of (name, picoseconds) events."""
    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    thread = plane.lines.add(name=line)
    for key, (name, duration) in enumerate(events, 1):
        plane.event_metadata[key].name = name
        thread.events.add(metadata_id=key, duration_ps=int(duration))
    return space


def test_op_events_are_summed_by_type_and_the_executor_s_own_events_are_not():
    space = _space(
        [
            ("gradient_tape/enc1_conv1/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter", 3e12),
            ("gradient_tape/dec1_conv1/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter", 1e12),
            ("enc1_relu1/Relu:ReluGrad", 2e12),
            ("tensorflow::ExecutorState::Process:x", 9e12),  # the executor, not an op
        ]
    )
    space.MergeFrom(_space([("cast:Cast", 5e12)], line="python thread"))  # not an op thread
    seconds = profile_step.op_seconds(space)
    assert seconds == {"_MklNativeConv2DBackpropFilter": 4.0, "ReluGrad": 2.0}
    assert profile_step.by_group(seconds) == {
        "convolution gradients": 4.0,
        "ReLU and its gradient": 2.0,
    }
    assert profile_step.group_of("AddN") == profile_step.OTHER


def test_a_profiled_epoch_of_a_tiny_unet_names_its_ops(capsys):
    profile_step.main(
        "--image-size 32 --base-filters 8 --depth 2 --batch-size 2 --steps 2 --precision float32 "
        "--top 40".split()
    )
    out = capsys.readouterr().out
    assert "float32, batch norm fused, batch 2: " in out and " img/s in the profiled epoch" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    groups = [row.split(" | ")[0][2:] for row in rows]
    assert {"convolution gradients", "batch norm and its gradient"} <= set(groups)
    assert sum(int(row.rsplit(" | ", 1)[1].rstrip("% |")) for row in rows) == pytest.approx(
        100,
        abs=len(rows),  # each share rounded
    )
    assert "Conv2DBackpropFilter" in out


def test_a_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("must be at least 1, got 0")
