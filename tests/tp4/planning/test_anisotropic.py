"""tp4/planning/anisotropic.py through plan.py --write: the MNI volume at 1 x 1 x 3 mm as an MSD
folder of cases that --data-dir reads, never written over an existing folder."""

import json

import nibabel as nib
import numpy as np
import pytest

import plan as plan_script
from tp4.images import datasets, mni


@pytest.mark.slow
def test_plan_py_writes_mni_wm_at_thick_slices_as_cases_and_plans_them(tmp_path, capsys):
    folder = tmp_path / "mni113"
    plan_script.main(["mni-wm", "--write", str(folder), "--output", str(tmp_path / "p.json")])
    assert "written: 8 cases" in capsys.readouterr().out
    _, pairs = datasets.find_pairs(str(folder))
    images = [nib.load(image) for image, _ in pairs]
    assert len(pairs) == 8 and all(i.header.get_zooms() == (1.0, 1.0, 3.0) for i in images)
    t1, mask, _ = mni.mni_wm_volume()
    assert sum(i.shape[0] * i.shape[1] for i in images[:4]) == t1.shape[1] * images[0].shape[0]
    assert images[0].shape[2] == round(t1.shape[2] / 3)
    labels = np.concatenate([np.asarray(nib.load(m).dataobj).ravel() for _, m in pairs])
    assert set(np.unique(labels)) == {0, 1}
    assert labels.mean() == pytest.approx(mask.mean(), rel=0.05)  # the same white matter share
    assert json.loads((folder / "dataset.json").read_text())["modality"] == {"0": "MRI"}
    written = json.loads((tmp_path / "p.json").read_text())["plan"]
    assert written["target_spacing"] == [1.0, 1.0, 3.0]
    with pytest.raises(SystemExit):  # never over a dataset
        plan_script.main(["mni-wm", "--write", str(folder), "--output", str(tmp_path / "q.json")])
    assert "is not empty" in capsys.readouterr().err
