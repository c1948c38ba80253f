"""The ``sr3d`` models, streaming inference, training smoke test and pipeline (geometry slice by slice,
dciodvfy, refusals, weights errors, through the node to Orthanc)."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from node import __version__ as srnode_version, audit
from pipelines import sr3d, weights
from pipelines.base import Refusal, RunContext
from pipelines.dicom.series import decode
from pipelines.evaluation import eval_sr3d
from pipelines.models import intensity, volume_stream
from pipelines.models.interpolation import resize
from pipelines.models import parameter_count
from pipelines.models.sr3d_cnn import INPLANE_FILES, SRCNN, THROUGH_FILE, CNNConfig, lanczos_up
from pipelines.training import train_sr3d, volume_data
from tests import series_factory as make
from tests.dicom_checks import check_derived, new_dciodvfy_errors
from tests.paths import shared
from tests.peers import storescu
from tests.synthetic import ct_series, read_testdata

CONTEXT = RunContext(uid_seed="sr3d-test", software_version="0.1.0")


def _random_model(config: CNNConfig, seed: int = 0) -> SRCNN:
    torch.manual_seed(seed)
    model = SRCNN(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _phantom(n: int = 12, size: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth volume with edges, in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, m) for m in (n, size, size)), indexing="ij")
    vol = -1000 + 1040 * ((x ** 2 + y ** 2 + 0.5 * z ** 2) < 0.7) + 600 * ((x - 0.2) ** 2 + y ** 2 < 0.05)
    return (vol + rng.normal(0, 10, vol.shape)).astype(np.float32)


# ---- models ------------------------------------------------------------------------------------

def test_paper_parameter_count_and_untrained_network_is_lanczos():
    model = SRCNN(CNNConfig(scale=2, axes=2))
    assert parameter_count(model) == 57_573  # the paper's x2 in-plane network (sr-models.md)
    x = torch.rand(2, 1, 9, 11)
    out, mid = model(x)
    assert out.shape == (2, 1, 18, 22)
    assert torch.allclose(out, lanczos_up(x, 2, 2)) and torch.allclose(mid, out)
    through = SRCNN(CNNConfig(scale=2, axes=1))
    assert through(x)[0].shape == (2, 1, 18, 11)  # one axis only


def test_nhwc_layout_changes_neither_the_weights_file_nor_the_output(tmp_path):
    """The models run their convs in NHWC (faster on the CPU); re-saving the shipped weights gives the
    same file, and the output equals the plain NCHW network's."""
    shipped = weights.weights_dir() / INPLANE_FILES[2]
    model = sr3d.load_cnn(shipped)
    assert model.before[1].weight.is_contiguous(memory_format=torch.channels_last)
    _, config = weights.load(shipped)
    assert weights.save(tmp_path / shipped.name, model.state_dict(), config, "card") == weights.sha256(shipped)
    x = torch.rand(2, 1, 33, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nhwc = model(x)[0]
        nchw = model.to(memory_format=torch.contiguous_format)(x)[0]
    assert torch.allclose(nhwc, nchw, atol=1e-5)


def test_lanczos_base_is_the_interpolation_baseline():
    x = np.random.default_rng(1).random((3, 10, 14)).astype(np.float32)
    ours = lanczos_up(torch.from_numpy(x)[:, None], 2, 2)[:, 0].numpy()
    assert np.allclose(ours, resize(x, (20, 28), "lanczos"), atol=1e-5)


def test_through_plane_slabs_do_not_change_the_result(monkeypatch):
    vol = _phantom(n=11, size=24)
    window = intensity.CT_RANGE
    up = volume_stream.cnn_upsampler(_random_model(CNNConfig(scale=2, axes=1)), window)
    whole = np.stack(list(volume_stream.through_stream(iter(vol), len(vol), up)))
    monkeypatch.setattr(volume_stream, "SLAB_VOXELS", 24 * 24 * 2 * 2)  # slabs of 2 slices
    slabs = np.stack(list(volume_stream.through_stream(iter(vol), len(vol), up)))
    assert whole.shape == (22, 24, 24)
    np.testing.assert_allclose(slabs, whole, atol=1e-3)  # HU: float32 noise only
    interp_whole = resize(vol, (22, 24, 24), "cubic")
    interp_slabs = np.stack(list(volume_stream.through_stream(iter(vol), len(vol), None, "cubic")))
    np.testing.assert_allclose(interp_slabs, interp_whole, atol=1e-3)


def test_values_outside_the_window_are_kept():
    vol = _phantom(n=2, size=24)
    vol[:, 10:14, 10:14] = 4000  # metal, above the CT window
    vol[:, :3, :] = -2000  # padding below it
    out = volume_stream.cnn_images(_random_model(CNNConfig(scale=2, axes=2)), vol, intensity.CT_RANGE)
    assert out.max() > 3500 and out.min() < -1900  # not clipped to [-1024, 2976]


def test_self_ensemble_is_invariant_for_the_untrained_network():
    vol = _phantom(n=2, size=20)
    model = SRCNN(CNNConfig(scale=2, axes=2)).eval()  # = Lanczos, which commutes with flips/rotations
    plain = volume_stream.cnn_images(model, vol, intensity.CT_RANGE)
    ensemble = volume_stream.cnn_images(model, vol, intensity.CT_RANGE, ensemble=True)
    np.testing.assert_allclose(ensemble, plain, atol=1e-2)


# ---- training and evaluation (smoke) -------------------------------------------------------------

def _synthetic_volumes() -> list:
    ct = volume_data.VolumeSource("synthetic_ct", "CT", "-", "train", True)
    mr = volume_data.VolumeSource("synthetic_mr", "MR", "-", "train", False)
    return [(ct, intensity.normalise(_phantom(16, 64, 1), intensity.CT_RANGE)),
            (mr, intensity.normalise(_phantom(8, 64, 2), (-1000, 700)))]


@pytest.mark.parametrize("kind, scale", [("inplane", 2), ("inplane", 4), ("through", 2)])
def test_training_few_steps_is_reproducible_and_loadable(tmp_path, kind, scale):
    first = train_sr3d.train(kind, scale, tmp_path, tmp_path / "a", steps=3, seed=5, volumes=_synthetic_volumes())
    again = train_sr3d.train(kind, scale, tmp_path, tmp_path / "b", steps=3, seed=5, volumes=_synthetic_volumes())
    model = sr3d.load_cnn(first)
    assert (model.config.scale, model.config.axes) == (scale, 2 if kind == "inplane" else 1)
    a, _ = weights.load(first)
    b, _ = weights.load(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "logs" / f"{first.stem}.csv").read_text().count("\n") >= 2
    card = weights.card_path(first).read_text()
    assert "held out" in card.lower() and "seed 5" in card


def test_paper_recipe_counts_epochs_in_patches_and_names_itself_in_the_card(tmp_path):
    # 14-px HR patches side by side: the isotropic CT (16x64x64) in all three directions
    # 16*4*4 + 64*1*4 + 64*1*4 = 768, the MR (8x64x64) axially 8*4*4 = 128; one epoch = 896 / 128 = 7 steps
    path = train_sr3d.train("inplane", 2, tmp_path, tmp_path, steps=None, seed=1, volumes=_synthetic_volumes(),
                            recipe="paper", epochs=1)
    card = weights.card_path(path).read_text()
    assert "Recipe `paper`: batch 128 patches of 7 px" in card
    assert "Adam 0.0001, 1e-05 for the second half of the steps,\n7 steps" in card
    assert "--recipe paper --steps 7 --seed 1`" in card
    with pytest.raises(SystemExit):
        train_sr3d.main(["inplane", "--epochs", "1"])  # epochs are the paper recipe's budget only
    for kwargs in ({"epochs": 1}, {"recipe": "paper", "epochs": 1, "steps": 5}, {"recipe": "paper", "scale": 3}):
        args = {"kind": "inplane", "scale": 2, "steps": None, "recipe": "cpu", **kwargs}
        with pytest.raises(ValueError, match="epochs|scales"):  # refused before any data is read
            train_sr3d.train(data_dir=tmp_path / "absent", out_dir=tmp_path, seed=1, **args)


def test_paper_schedule_drops_the_rate_tenfold_at_half_time():
    opt, sched = train_sr3d.RECIPES["paper"].optimiser([torch.zeros(1, requires_grad=True)], 1e-4, 10)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1e-4] * 5 + [1e-5] * 5)


def test_eval_of_the_untrained_cnn_equals_lanczos_in_plane():
    models = sr3d.SR3DModels({2: SRCNN(CNNConfig(2, 2)).eval(), 4: SRCNN(CNNConfig(4, 2)).eval()},
                             SRCNN(CNNConfig(2, 1)).eval(), {})
    vol = _phantom(n=4, size=48)
    table = eval_sr3d.eval_2d(vol, intensity.CT_RANGE, models, 2)
    assert table["cnn"]["psnr"] == pytest.approx(table["lanczos"]["psnr"], abs=1e-3)
    assert table["lanczos"]["psnr"] > table["nearest"]["psnr"]
    table3d, seconds = eval_sr3d.eval_3d(_phantom(n=16, size=32), intensity.CT_RANGE, models, 2)
    assert table3d["cnn"]["psnr"] == pytest.approx(table3d["lanczos"]["psnr"], abs=0.5) and seconds["cnn"] > 0
    assert "cnn + self-ensemble" in table3d and seconds["cnn + self-ensemble"] > 0


def test_eval_markdown_gives_each_volume_its_own_gain():
    row = lambda cnn, lanczos: {"cnn": {"psnr": cnn, "ssim": 0.9}, "lanczos": {"psnr": lanczos, "ssim": 0.8}}  # noqa: E731
    volumes = {"brain": {"modality": "MR", "2d x2": row(25.5, 24.3), "3d x2": row(24.3, 23.0)},
               "sag": {"modality": "MR", "2d x2": row(31.0, 28.0)}}
    lines = eval_sr3d.per_volume_gains(volumes)
    assert "| brain (MR) | +1.20 | +1.30 |" in lines and "| sag (MR) | +3.00 | - |" in lines



def test_degradations_keep_alignment_and_the_area_is_the_block_mean():
    hr = _phantom(n=2, size=48, seed=3).astype(np.float32)
    for kind in volume_data.DEGRADATIONS:
        lr = volume_data.degrade(hr, 2, (1, 2), kind)
        assert lr.shape == (2, 24, 24) and lr.dtype == np.float32
        flat = volume_data.degrade(np.full((1, 16, 12), 7.0, np.float32), 2, (1, 2), kind)
        assert np.allclose(flat, 7.0, atol=1e-4), kind  # rows sum to 1, edges renormalised
        ramp = volume_data.degrade(np.tile(np.arange(32, dtype=np.float32), (1, 4, 1)), 2, (2,), kind)
        assert np.allclose(ramp[0, 0, 4:-4], np.arange(4, 12) * 2 + 0.5, atol=1e-3), kind  # LR i sits at 2i + 0.5
    assert np.allclose(volume_data.degrade(hr, 2, (1, 2), "area"), hr.reshape(2, 24, 2, 24, 2).mean((2, 4)), atol=1e-6)
    assert np.array_equal(volume_data.degrade(hr, 2, (1, 2), "cubic"), volume_data.downscale(hr, 2, (1, 2)))
    wide = volume_data.degrade(hr, 2, (1, 2), "gaussian", sigma=1.5)
    assert wide.std() < volume_data.degrade(hr, 2, (1, 2), "gaussian").std()  # a wider PSF blurs more
    with pytest.raises(ValueError, match="unknown degradation"):
        volume_data.degrade(hr, 2, (1,), "box")
    with pytest.raises(ValueError, match="multiple of 2"):
        volume_data.degrade(hr[:, :47], 2, (1,), "area")
    noisy = volume_data.add_noise(np.zeros((64, 64), np.float32), 0.01, 4000.0, np.random.default_rng(0))
    assert noisy.std() == pytest.approx(40.0, rel=0.05)


def test_mixed_degradation_batches_are_seeded_and_differ_from_cubic():
    batch = lambda degradations: train_sr3d.PatchSampler(_synthetic_volumes(), np.random.default_rng(1)).batch(  # noqa: E731
        16, 2, 12, 2, degradations=degradations)
    (lr_mix, hr_mix), (again, _), (lr_cubic, hr_cubic) = batch("mix"), batch("mix"), batch("cubic")
    assert lr_mix.shape == (16, 1, 12, 12) and hr_mix.shape == (16, 1, 24, 24)
    assert torch.equal(lr_mix, again) and torch.equal(hr_mix, hr_cubic) and not torch.equal(lr_mix, lr_cubic)
    card = train_sr3d.card_text("inplane", CNNConfig(2, 2), train_sr3d.RECIPES["cpu"], 10, 0, 1e-3, 6, 1, "cpu", "mix")
    assert "area averaging" in card and "--degradations mix" in card


def test_thick_slabs_average_the_slices_they_cover():
    hr = _phantom(n=8, size=16, seed=4)
    slab = volume_data.degrade(hr, 2, (0,), "slab")
    assert np.allclose(slab, hr.reshape(4, 2, 16, 16).mean(1), atol=1e-4)  # a box profile: the mean of 2 slices
    tri = volume_data.degradation_weights(8, 2, "slab-triangle").toarray()
    assert np.allclose(tri[1, :6], [0, 0.125, 0.375, 0.375, 0.125, 0])  # FWHM 2 slices, overlapping its neighbours
    gauss = volume_data.degradation_weights(8, 2, "slab-gaussian").toarray()
    assert gauss[1, 2] < 0.5 and gauss[1, 1] > 0.05  # wider than the box


def test_slab_batches_mix_thick_slabs_with_cubic_and_leave_the_cubic_recipe_alone():
    batch = lambda degradations: train_sr3d.PatchSampler(_synthetic_volumes(), np.random.default_rng(1)).batch(  # noqa: E731
        32, 2, 12, 1, degradations=degradations)
    (lr, hr), (again, _), (lr_cubic, hr_cubic) = batch("slab"), batch("slab"), batch("cubic")
    assert lr.shape == (32, 1, 12, 24) and torch.equal(lr, again) and torch.equal(hr, hr_cubic)
    cubic = sum(torch.equal(a, b) for a, b in zip(lr, lr_cubic))
    assert 0 < cubic < 32  # some patches cubic, the others slabs
    card = train_sr3d.card_text("through", CNNConfig(2, 1), train_sr3d.RECIPES["cpu"], 10, 0, 3e-4, 6, 1, "cpu", "slab",
                                "sr3d_through_x2.safetensors (sha256 c2428e5b)")
    assert "thick slabs" in card and "--degradations slab" in card and "fine-tuned from" in card
    with pytest.raises(ValueError, match="through-plane"):
        train_sr3d.check_arguments("inplane", 2, "cpu", 10, None, "slab")


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    start = train_sr3d.train("through", 2, tmp_path, tmp_path / "a", steps=2, seed=5, volumes=_synthetic_volumes())
    tuned = train_sr3d.train("through", 2, tmp_path, tmp_path / "b", steps=1, seed=5, volumes=_synthetic_volumes(),
                             lr=1e-12, degradations="slab", init=start)
    a, _ = weights.load(start)
    b, _ = weights.load(tuned)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # a step of ~0 keeps the initial weights
    assert "fine-tuned from" in weights.card_path(tuned).read_text()


def test_through_table_compares_models_on_cubic_and_slab_input(tmp_path, monkeypatch):
    from pipelines.evaluation import through_table

    source = volume_data.VolumeSource("synthetic_ct", "CT", "-", "test", True)
    monkeypatch.setattr(volume_data, "sources", lambda split: [source])
    monkeypatch.setattr(volume_data, "read_volume", lambda s, d: _phantom(n=12, size=24))
    files = [("shipped", THROUGH_FILE, SRCNN(CNNConfig(2, 1))), ("other", THROUGH_FILE, _random_model(CNNConfig(2, 1)))]
    files += [("shipped", INPLANE_FILES[s], SRCNN(CNNConfig(s, 2))) for s in INPLANE_FILES]
    for folder, name, model in files:
        weights.save(tmp_path / folder / name, model.state_dict(), {"model": "sr3d-cnn", **model.config.to_dict()}, "# t\n")
    report = through_table.evaluate(tmp_path, tmp_path / "shipped", [tmp_path / "other" / THROUGH_FILE])
    shipped, other = report["models"]
    r = report["volumes"]["synthetic_ct"]["results"]
    assert set(r) == {"cubic", "slab"} and shipped.startswith("shipped") and other.startswith("candidate")
    assert r["cubic"][shipped]["psnr"] == pytest.approx(r["cubic"]["lanczos"]["psnr"], abs=0.2)  # untrained = Lanczos
    assert r["slab"]["lanczos"]["psnr"] != r["cubic"]["lanczos"]["psnr"]
    text = through_table.markdown(report)
    assert through_table.HEADING in text and "**CT mean**" in text and "--through-weights" in text
    three = report["volumes"]["synthetic_ct"]["3d"]
    assert three[f"cnn + {shipped}"]["psnr"] == pytest.approx(three["lanczos"]["psnr"], abs=0.5)
    assert f"cnn + {other}" in three and "### 3D x2" in text


def test_degradation_table_reports_gains_per_volume_and_keeps_its_own_card_section(tmp_path):
    from pipelines.evaluation import degradation_table

    result = {"cubic": {"psnr": 30.0, "ssim": 0.9}, "lanczos": {"psnr": 30.5, "ssim": 0.91},
              "cnn": {"psnr": 32.0, "ssim": 0.95}}
    results = {f"{k} noise 0": result for k in volume_data.DEGRADATIONS}
    report = {"scale": 2, "psf_sigma_hr_px": 0.6, "noises": [0.0], "degradations": list(volume_data.DEGRADATIONS),
              "weights": "inplane_x2:0000", "trained": "cubic.",
              "volumes": {"chest": {"modality": "CT", "shape": [4, 8, 8], "region": "chest",
                                    "region_in_training": False, "results": results}}}
    text = degradation_table.markdown(report)
    assert "| chest (CT, chest, region not trained on) | +1.50 / +2.00 |" in text
    path = tmp_path / "m.safetensors"
    weights.card_path(path).write_text("# m\n\n## Recipe\nr\n\n## Evaluation on x\nold\n")
    for _ in range(2):
        weights.set_section(path, degradation_table.HEADING, text)
    weights.set_evaluation(path, "## Evaluation on x\nnew\n")
    card = weights.card_path(path).read_text()
    assert card.count(degradation_table.HEADING) == 1 and card.index("## Recipe") < card.index(
        degradation_table.HEADING) < card.index("## Evaluation") and card.endswith("new\n")


# ---- pipeline: options and refusals -------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"inplane_scale": 3}, "one of 1, 2, 4"),
    ({"through_scale": 2.5}, "one of 1, 2, 4"),
    ({"model": "bicubic"}, "option 'model'"),
    ({"model": "mdrn", "self_ensemble": True}, "model 'cnn' only"),
    ({"self_ensemble": "yes"}, "true or false"),
    ({"self_ensemble": True, "model": "lanczos"}, "model 'cnn' only"),
    ({"inplane_scale": 1, "through_scale": 1}, "no change"),
    ({"target_spacing": 1.0, "through_scale": 2}, "drop option 'through_scale'"),
    ({"scale": 2}, "unknown option"),
])
def test_bad_options_are_named(options, words):
    with pytest.raises(ValueError, match=words):
        sr3d.PIPELINE.validate_options(options)


def test_defaults():
    assert sr3d.PIPELINE.validate_options({}) == {
        "inplane_scale": 2, "through_scale": 1, "target_spacing": None, "self_ensemble": False, "model": "cnn"}


def test_projection_images_are_refused_with_the_reason():
    with pytest.raises(Refusal, match="takes volumes"):
        list(sr3d.PIPELINE.run([read_testdata("RG1_UNCR.dcm")], {"inplane_scale": 2}, CONTEXT))


def test_target_spacing_must_be_a_power_of_two_factor():
    series = ct_series(4, spacing=5.0)
    with pytest.raises(Refusal, match="factor 1.67"):
        list(sr3d.PIPELINE.run(series, {"target_spacing": 3.0, "model": "lanczos"}, CONTEXT))
    out = list(sr3d.PIPELINE.run(series, {"target_spacing": 1.25, "model": "lanczos"}, CONTEXT))
    assert len(out) == 16 and float(out[0].SpacingBetweenSlices) == pytest.approx(1.25)


def test_cnn_needs_ct_or_mr():
    series = ct_series(2)
    for ds in series:
        ds.Modality = "PT"
    with pytest.raises(Refusal, match="trained on CT and MR"):
        list(sr3d.PIPELINE.run(series, {"inplane_scale": 2}, CONTEXT))


def test_missing_and_altered_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SRNODE_WEIGHTS", str(tmp_path))
    sr3d.load_models.cache_clear()
    try:
        assert "sr3d_inplane_x2.safetensors is missing" in sr3d.PIPELINE.not_ready()
        assert sr3d.PIPELINE.not_ready({"model": "lanczos"}) is None  # interpolation needs no weights
        with pytest.raises(weights.WeightsError, match="is missing"):
            list(sr3d.PIPELINE.run(ct_series(2), {"inplane_scale": 2}, CONTEXT))
        for name in (*INPLANE_FILES.values(), THROUGH_FILE):
            source = _shipped() / name
            (tmp_path / name).write_bytes(source.read_bytes())
            weights.card_path(tmp_path / name).write_text(weights.card_path(source).read_text())
        assert sr3d.PIPELINE.not_ready() is None
        assert "mdrn.safetensors is missing" in sr3d.PIPELINE.not_ready({"model": "mdrn"})
        assert sr3d.PIPELINE.not_ready({"model": "mdrn", "inplane_scale": 1, "through_scale": 2}) is None  # CNN only
        sr3d.load_models.cache_clear()
        data = bytearray((tmp_path / THROUGH_FILE).read_bytes())
        data[-1] ^= 0xFF
        (tmp_path / THROUGH_FILE).write_bytes(bytes(data))
        assert "does not match its model card" in sr3d.PIPELINE.not_ready()
    finally:
        sr3d.load_models.cache_clear()


def _shipped() -> Path:
    return Path(sr3d.__file__).resolve().parents[1] / "weights"


# ---- pipeline: geometry and conformance with the shipped weights ----------------------------------

def _check_geometry(sources, outputs, r_in: int, r_t: int) -> None:
    """Every output slice where the geometry rule (sr3d module docstring) puts it."""
    src = sorted(sources, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], _normal(ds))))
    normal = _normal(src[0])
    iop = np.array([float(v) for v in src[0].ImageOrientationPatient])
    origin = np.array([float(v) for v in src[0].ImagePositionPatient])
    spacing = np.array([float(v) for v in src[0].PixelSpacing])
    s = float(np.dot(np.array([float(v) for v in src[1].ImagePositionPatient]) - origin, normal)) if len(src) > 1 else 0
    outputs = sorted(outputs, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    assert len(outputs) == len(src) * r_t
    ascending = int(src[0].InstanceNumber) < int(src[-1].InstanceNumber)
    for j, out in enumerate(outputs):
        k = (j + 0.5) / r_t - 0.5
        new = spacing / r_in
        expected = origin + k * s * normal + 0.5 * (new[1] - spacing[1]) * iop[:3] + 0.5 * (new[0] - spacing[0]) * iop[3:]
        assert np.allclose([float(v) for v in out.ImagePositionPatient], expected, atol=1e-3), f"slice {j}"
        assert np.allclose([float(v) for v in out.ImageOrientationPatient], iop, atol=1e-6)
        assert np.allclose([float(v) for v in out.PixelSpacing], new, atol=1e-5)
        assert (out.Rows, out.Columns) == (src[0].Rows * r_in, src[0].Columns * r_in)
        assert out.FrameOfReferenceUID == src[0].FrameOfReferenceUID
        assert int(out.InstanceNumber) == (j + 1 if ascending else len(outputs) - j)
        if r_t > 1:
            assert float(out.SpacingBetweenSlices) == pytest.approx(s / r_t, abs=1e-4)
        assert out.SliceThickness == src[0].SliceThickness


def _normal(ds) -> np.ndarray:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


@pytest.mark.parametrize("options, r_in, r_t, description", [
    ({"inplane_scale": 2, "through_scale": 2}, 2, 2, "Head 5mm super-res x2, slices x2 CNN - research use"),
    ({"inplane_scale": 2, "through_scale": 2, "model": "mdrn"}, 2, 2,
     "Head 5mm super-res x2, slices x2 MDRN - research use"),
    ({"through_scale": 4}, 1, 4, "Head 5mm super-res slices x4 CNN - research use"),
    ({"inplane_scale": 4}, 4, 1, "Head 5mm super-res x4 CNN - research use"),
    # no in-plane stage: MDRN does not run, nor is named
    ({"through_scale": 2, "model": "mdrn"}, 1, 2, "Head 5mm super-res slices x2 CNN - research use"),
])
def test_cnn_output_geometry_slice_by_slice_and_dciodvfy(tmp_path, options, r_in, r_t, description):
    paths = make.ct_volume(tmp_path / "in", f"sr3d-{r_in}-{r_t}", 3, size=64)
    sources = [dcmread(p) for p in paths]
    for ds in sources:
        ds.SeriesDescription = "Head 5mm"
    outputs = list(sr3d.PIPELINE.run(sources, options, CONTEXT))
    assert {ds.SeriesDescription for ds in outputs} == {description}
    _check_geometry(sources, outputs, r_in, r_t)
    check_derived(sources, outputs, slab_edges=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for i, ds in enumerate(outputs[:2] + outputs[-1:]):
        path = out_dir / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert new_dciodvfy_errors(path, paths[0]) == []
    named = "MDRN" if options.get("model") == "mdrn" and r_in > 1 else "CNN"
    assert named in outputs[0].SeriesDescription and named in outputs[0].DerivationDescription
    assert ("MDRN" in outputs[0].SeriesDescription) == (named == "MDRN")
    assert any("inplane" in v or "through" in v for v in outputs[0].ContributingEquipmentSequence[-1].SoftwareVersions)


def test_cnn_sharpens_a_real_ct_compared_with_lanczos():
    """On the real CT_small image: the shipped in-plane CNN is closer to the HR image than Lanczos."""
    hr = decode(read_testdata("CT_small.dcm"))[None]
    models = sr3d.load_models(weights.weights_dir())
    table = eval_sr3d.eval_2d(hr, intensity.CT_RANGE, models, 2)
    assert table["cnn"]["psnr"] > table["lanczos"]["psnr"]


@pytest.mark.shared_data
def test_real_mr_series_offline_every_slice_valid(tmp_path):
    """24 consecutive slices of the real JPEG-lossless MR (all 96: 15 s of the suite's time)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted(shared("mr", "phantom_t1_jpegll").iterdir())[36:60]:
        shutil.copy(path, folder / path.name)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "node.cli", "process", str(folder), "--pipeline", "sr3d",
                             "--set", "inplane_scale=2", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    sources = [dcmread(p) for p in sorted(folder.iterdir())]
    paths = sorted(out.rglob("*.dcm"))
    outputs = [dcmread(p) for p in paths]
    _check_geometry(sources, outputs, 2, 1)
    check_derived(sources, outputs)
    errors = [e for p in paths for e in new_dciodvfy_errors(p, folder / sorted(f.name for f in folder.iterdir())[0])]
    assert errors == []


@pytest.mark.integration
def test_a_ct_volume_through_the_node_reaches_orthanc(make_node, orthanc, tmp_path):
    paths = make.ct_volume(tmp_path / "ct", "sr3d-node", 3, size=64)
    node = make_node(
        routes=[{"name": "ct", "match": {"Modality": ["CT", "MR"]}, "pipeline": "sr3d",
                 "options": {"inplane_scale": 2, "through_scale": 2}, "send_to": ["pacs"]}],
        destinations={"pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
    )
    assert storescu(paths, node.port).returncode == 0
    [job] = node.wait_jobs(lambda jobs: len(jobs) == 1 and jobs[0]["state"] == "delivered", timeout=300,
                           what="the sr3d job delivered")
    assert job["deliveries"] == {"sent": 6}
    # The audit names the weight files that made the result, by their sha256, and the worker's version.
    [finished] = [e for e in audit.read(node.spool / "audit") if e["event"] == "job.finished"]
    assert {m["file"] for m in finished["models"]} == {"sr3d_inplane_x2.safetensors", "sr3d_through_x2.safetensors"}
    for model in finished["models"]:
        assert model["sha256"] == weights.sha256(weights.weights_dir() / model["file"])
    assert finished["software_version"] == srnode_version and finished["pipeline"] == "sr3d"
    src = dcmread(paths[0], stop_before_pixels=True)
    [series] = [s for s in orthanc.series_of_study(src.StudyInstanceUID)
                if s["0020000E"]["Value"][0] != src.SeriesInstanceUID]
    instances = orthanc.instances_of_series(src.StudyInstanceUID, series["0020000E"]["Value"][0])
    assert len(instances) == 6
    received = [dcmread(io.BytesIO(orthanc.get_instance_file(i["00080018"]["Value"][0]))) for i in instances]
    _check_geometry([dcmread(p) for p in paths], received, 2, 2)
