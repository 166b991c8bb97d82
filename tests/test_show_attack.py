"""`tsbd show-attack`: residual statistics on hand-made images, the figure files, the CLI."""

import json
import math

import pytest
import torch

from tsbd.attacks import build_attack
from tsbd.attacks.show import pick_images, residual_stats, show_attack
from tsbd.cli import main
from tsbd.errors import TsbdError


def test_residual_stats_hand_made():
    clean = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    poisoned = clean.clone()
    poisoned[0, :, 0, 0] = 255  # 3 of 48 values changed by 1.0
    s = residual_stats(clean, poisoned)
    assert s["linf"] == pytest.approx(0.5)  # mean of 1.0 and 0.0
    assert s["l2"] == pytest.approx(math.sqrt(3) / 2)
    assert s["psnr_db"] == pytest.approx(10 * math.log10(16))  # image 0: mse 3/48; image 1 unchanged (inf, left out)
    assert s["changed_fraction"] == 0.5
    with pytest.raises(TsbdError, match="differ in shape"):
        residual_stats(clean, poisoned[:1])


def test_pick_images_skips_target_and_spreads_classes():
    labels = torch.tensor([0, 1, 2, 1, 2, 0, 3, 3])
    idx = pick_images(labels, target=0, count=3, seed=0)
    assert sorted(labels[idx].tolist()) == [1, 2, 3]
    assert torch.equal(idx, pick_images(labels, 0, 3, 0))


def test_show_attack_writes_png_and_svg(demo, runtime, tmp_path):
    res = show_attack(build_attack("badnets"), demo, runtime, out=tmp_path, images=4)
    assert (tmp_path / "badnets.png").stat().st_size > 1000 and (tmp_path / "badnets.svg").exists()
    assert len(res["images"]) == 4 and all(int(demo.test.y[i]) != 0 for i in res["images"])
    r = res["residual"]
    # the 3x3 white patch: at most 27 of 3072 values change, so a small L2 and a high PSNR
    assert 0 < r["linf"] <= 1 and r["l2"] < 5.2 and r["psnr_db"] > 20
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left


def test_show_attack_cli(tmp_path, capsys):
    code = main(["show-attack", "--attack", "badnets,blended", "--images", "3", "--out", str(tmp_path), "--json",
                 "--quiet", "--precision", "fp32"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["attack"]["name"] for a in out["attacks"]] == ["badnets", "blended"]
    # Blended at ratio 0.2 changes nearly every pixel, BadNets' patch very few
    blended, badnets = out["attacks"][1]["residual"], out["attacks"][0]["residual"]
    assert blended["l2"] > badnets["l2"]
    assert (tmp_path / "blended.png").exists()
    assert main(["show-attack", "--attack", "nope", "--out", str(tmp_path)]) != 0
    assert "unknown attack(s) nope" in capsys.readouterr().err
