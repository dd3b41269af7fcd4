"""Registry aliases: --register marks a version @candidate, report.py --promote moves an alias, and
predict.py follows it."""

import numpy as np
import pytest
from helpers import log_tiny_model, run_predict
from PIL import Image

import report


def _promote(argv, capsys):
    try:
        report.main(["--promote", *argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.mark.slow
def test_an_alias_moves_and_predict_follows_it(store, tmp_path, capsys):
    _, everything, _ = log_tiny_model("tiny", output_bias=20.0)  # every pixel foreground
    _, nothing, _ = log_tiny_model("tiny", output_bias=-20.0)  # none
    assert store.get_model_version_by_alias("tiny", "candidate").version == 2  # the newest
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) % 256).save(
        tmp_path / "x.png"
    )

    def champion_mask():
        output = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        code, out, err = run_predict(
            ["models:/tiny@champion", str(tmp_path / "x.png"), "--output", str(output)], capsys
        )
        assert code == 0, err
        return np.asarray(Image.open(output / "x_mask.png"))

    capsys.readouterr()
    assert _promote([everything, "tiny@champion"], capsys)[1] == [
        f"models:/tiny@champion: version 1, from run {everything}"
    ]
    assert (champion_mask() == 255).all()
    assert _promote([nothing, "tiny@champion"], capsys)[0] == 0
    assert store.get_model_version_by_alias("tiny", "champion").version == 2
    assert (champion_mask() == 0).all()
    assert store.get_model_version_by_alias("tiny", "candidate").version == 2  # unmoved


@pytest.mark.parametrize(
    "target, message",
    [
        ("tiny", "give the registered model and its alias as NAME@ALIAS"),
        ("other@champion", "no version"),
    ],
)
def test_a_promotion_that_names_no_version_is_one_line(store, capsys, target, message):
    _, run_id, _ = log_tiny_model("tiny")
    capsys.readouterr()
    code, out, err = _promote([run_id, target], capsys)
    assert code == 2 and out == [] and len(err) == 1
    assert err[0].startswith("report.py: error: ") and message in err[0]
