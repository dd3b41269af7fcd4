"""tp4/planning and plan.py: the fingerprint of written volumes, nnU-Net's rules on hand-made
fingerprints, resampling that keeps labels labels and goes back to the input's shape."""

import json

import nibabel as nib
import numpy as np
import pytest

import plan as plan_script
from tp4.planning import fingerprint, plan, preprocess


def _write(root, spacings, shape=(16, 16, 8)):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i, spacing in enumerate(spacings):
        image = rng.normal(100, 10, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[4:8, 4:8, 2:4] = 1
        image[label > 0] = 500
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")


def test_fingerprint_of_written_volumes(tmp_path):
    _write(tmp_path, [(1.0, 1.0, 3.0), (1.0, 1.0, 2.0), (0.8, 0.8, 3.0)])
    measured = fingerprint.measure(str(tmp_path))
    assert measured["cases"] == 3 and measured["shapes"] == [[16, 16, 8]] * 3
    np.testing.assert_allclose(
        sorted(measured["spacings"]), [[0.8, 0.8, 3.0], [1.0, 1.0, 2.0], [1.0, 1.0, 3.0]], rtol=1e-6
    )
    assert measured["foreground_percentiles"]["p50"] == pytest.approx(500)
    assert measured["class_shares"]["1"] == pytest.approx(32 / (16 * 16 * 8))


def test_target_spacing_median_or_a_lower_percentile_on_a_very_anisotropic_axis():
    assert plan.target_spacing([[1, 1, 2], [1, 1, 1], [2, 2, 1]]) == [1, 1, 1]
    anisotropic = np.array([[1, 1, 5], [1, 1, 5], [1, 1, 1.5]] * 4, float)
    target = plan.target_spacing(anisotropic)
    assert target[:2] == [1, 1]
    assert target[2] == pytest.approx(np.percentile(anisotropic[:, 2], 10))


def test_depth_ends_at_4_to_8_voxels_and_the_patch_fits_the_budget():
    assert plan.depth_for([32, 64, 64]) == 4  # 32 -> 4 after 3 pools
    assert plan.depth_for([48, 48, 48]) == 4  # 48 -> 6
    big = plan.patch_and_batch([64, 64, 64], 8, 2**40)
    assert big == ([64, 64, 64], plan.MAX_BATCH)
    budget = 40 * 2**20
    patch, batch = plan.patch_and_batch([64, 64, 64], 8, budget)
    assert np.prod(patch) < 64**3 and plan.step_bytes(patch, 8, batch) <= budget


def test_resampling_keeps_labels_and_goes_back_to_the_input_shape():
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[2:6, 2:6, 1:3] = 2
    fine = preprocess.resample(labels, (1, 1, 3), (1, 1, 1), labels=True)
    assert fine.shape == (10, 10, 12) and set(np.unique(fine)) == {0, 2}
    back = preprocess.resample(fine, (1, 1, 1), (1, 1, 3), labels=True, shape=labels.shape)
    np.testing.assert_array_equal(back, labels)
    scheme = {"scheme": "CT", "clip": [-100, 100], "mean": 0, "std": 50}
    ct = preprocess.normalize(np.array([-2000.0, 0, 40, 3000]), scheme)
    np.testing.assert_allclose(ct, [-2, 0, 0.8, 2])


def test_plan_py_prints_and_writes_the_plan(tmp_path, capsys):
    _write(tmp_path / "data", [(1.0, 1.0, 3.0)] * 3)
    output = str(tmp_path / "plan.json")
    plan_script.main([str(tmp_path / "data"), "--modality", "CT", "--output", output])
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["plan"]["target_spacing"] == [1.0, 1.0, 3.0]
    assert written["plan"]["normalization"]["scheme"] == "CT"
    assert "patch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan_script.main([str(tmp_path / "nowhere")])
