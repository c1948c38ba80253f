"""Meta-Upscale and MDRN models, their training smoke tests, and the ``arbitrary`` pipeline: exact geometry
at non-integer factors, dciodvfy, refusals, weights errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom import dcmread

from pipelines import arbitrary, weights
from pipelines.base import Refusal, RunContext
from pipelines.dicom.derived import series_description
from pipelines.models import intensity, mdrn, meta_sr, volume_stream
from pipelines.models.interpolation import resize
from pipelines.models.lanczos import centres
from pipelines.models.meta_sr import META_FILE, MetaConfig, MetaSR
from pipelines.training import train_sr2d, volume_data
from tests.dicom_checks import check_derived, new_dciodvfy_errors
from tests.synthetic import ct_series, read_testdata

CONTEXT = RunContext(uid_seed="arbitrary-test", software_version="0.1.0")


def _random_meta(seed: int = 0) -> MetaSR:
    torch.manual_seed(seed)
    model = MetaSR(MetaConfig(channels=8, blocks=2, hidden=16))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _ct_slice(size: int) -> pydicom.Dataset:
    """The real CT_small image resampled to ``size`` px (spacing scaled so the field of view is kept)."""
    ds = read_testdata("CT_small.dcm")
    pixels = resize(ds.pixel_array.astype(np.float32), (size, size), "cubic")
    spacing = [float(v) * ds.Rows / size for v in ds.PixelSpacing]
    ds.set_pixel_data(np.clip(np.rint(pixels), -32768, 32767).astype(np.int16), "MONOCHROME2", 16,
                      generate_instance_uid=False)
    ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
    return ds


# ---- models ------------------------------------------------------------------------------------

def test_untrained_meta_and_mdrn_are_lanczos():
    x = torch.rand(2, 1, 20, 17)
    for rows, cols in ((50, 17), (30, 40), (20, 17)):
        expected = torch.from_numpy(resize(x.numpy(), (rows, cols), "lanczos"))
        assert torch.allclose(MetaSR()(x, rows, cols), expected, atol=1e-5)
    model = mdrn.MDRN(mdrn.MDRNConfig(channels=8, blocks=1))
    assert torch.allclose(model(x, 3), torch.from_numpy(resize(x.numpy(), (60, 51), "lanczos")), atol=1e-5)


@pytest.mark.parametrize("h, out_rows, map_floats", [
    (12, 30, meta_sr.PHASE_MAP_FLOATS),  # x2.5: 5 row phases of 6 rows, convolved on the whole map
    (40, 53, meta_sr.PHASE_MAP_FLOATS),  # x1.33: 32 row phases of 1-2 rows, on their 3-row strips only
    (12, 30, 2 * 13 * 10 * 4),  # bands of 4 LR rows (N * 13 column phases * w floats a row)
    (40, 53, 1),  # one strip at a time
])
def test_meta_filters_per_phase_equal_the_per_pixel_definition(monkeypatch, h, out_rows, map_floats):
    monkeypatch.setattr(meta_sr, "PHASE_MAP_FLOATS", map_floats)
    model = _random_meta()
    x = torch.rand(2, 1, h, 10)
    rows, cols = centres(h, out_rows), centres(10, 13)  # 13 / 10: several column phases too
    with torch.no_grad():
        out = model.sample(x, rows, cols, (h / out_rows, 10 / 13))
    feats = model.trunk(x).detach()
    unfolded = torch.nn.functional.unfold(feats, 3, padding=1).view(2, -1, h, 10)
    base = torch.from_numpy(resize(x.numpy(), (out_rows, 13), "lanczos"))
    for b, i, j in ((0, 0, 0), (1, 7, 3), (0, out_rows // 2, 5), (1, out_rows - 1, 12), (0, 3, 8)):
        near_r, near_c = int(np.floor(rows[i] + 0.5)), int(np.floor(cols[j] + 0.5))
        offsets = [round((c - near) * meta_sr.PHASES) / meta_sr.PHASES for c, near in ((rows[i], near_r), (cols[j], near_c))]
        with torch.no_grad():
            filt = model.upscale.predict(torch.tensor([h / out_rows, 10 / 13, *offsets], dtype=torch.float32))
        expected = base[b, 0, i, j] + (unfolded[b, :, near_r, near_c] * filt).sum()
        assert float(out[b, 0, i, j]) == pytest.approx(float(expected), abs=1e-5)


def test_meta_through_plane_slabs_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, (9, 16, 16)).astype(np.float32)
    model = _random_meta()
    coords = centres(9, 22)
    sampler = arbitrary._meta_through_sampler(model, 9 / 22, intensity.CT_RANGE)
    pad = meta_sr.halo(model.config)
    whole = np.stack(list(volume_stream.resample_stream(iter(vol), 9, coords, sampler, pad, True)))
    monkeypatch.setattr(volume_stream, "SLAB_VOXELS", 16 * 16 * 3)
    slabs = np.stack(list(volume_stream.resample_stream(iter(vol), 9, coords, sampler, pad, True)))
    assert whole.shape == (22, 16, 16)
    np.testing.assert_allclose(slabs, whole, atol=1e-2)



def test_large_images_go_through_in_tiles_with_the_whole_image_result(monkeypatch):
    """A 2048-px radiograph at x2 would not fit one forward: tiles with the network's halo must
    give what one whole-image forward gives (here with tiles of 24 output px)."""
    rng = np.random.default_rng(1)
    images = rng.normal(1000, 300, (2, 40, 33)).astype(np.float32)
    torch.manual_seed(0)
    deep = mdrn.MDRN(mdrn.MDRNConfig(channels=8, blocks=2))
    for p in deep.parameters():
        torch.nn.init.normal_(p, std=0.05)
    runs = {
        "meta": lambda: volume_stream.meta_images(_random_meta(), images, centres(40, 100), centres(33, 71),
                                                  (40 / 100, 33 / 71), (0.0, 2000.0), invert=True),
        "mdrn": lambda: volume_stream.mdrn_images(deep.eval(), images, 3, (0.0, 2000.0)),
    }
    for name, run in runs.items():
        monkeypatch.setattr(volume_stream, "BATCH_VOXELS", 2**22)
        whole = run()
        monkeypatch.setattr(volume_stream, "BATCH_VOXELS", 24 * 24)
        tiled = run()
        assert tiled.shape == whole.shape, name
        np.testing.assert_allclose(tiled, whole, atol=1e-2, err_msg=name)


def test_meta_filter_predictor_trains_slowly_and_tells_phases_apart():
    """The predictor's last layer is the only slow group; its hidden codes differ between phases."""
    model = MetaSR(MetaConfig(channels=8, blocks=1, hidden=16))
    groups = train_sr2d.parameter_groups(model, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [p is q for p, q in zip(groups[1]["params"], model.upscale.predict[-1].parameters())] == [True, True]
    assert groups[1]["lr"] == pytest.approx(1e-3 * train_sr2d.FILTER_LR_SCALE) and "lr" not in groups[0]
    assert len(train_sr2d.parameter_groups(mdrn.MDRN(mdrn.MDRNConfig(channels=8, blocks=1)), 1e-3)) == 1
    codes = model.upscale.predict[0](torch.tensor([[0.5, 0.5, -0.25, -0.25], [0.5, 0.5, 0.25, 0.25]]))
    assert codes.shape == (2, 4 + 4 * MetaConfig().frequencies)
    assert torch.allclose(codes[:, :4], torch.tensor([[0.5, 0.5, -0.25, -0.25], [0.5, 0.5, 0.25, 0.25]]))
    assert torch.cosine_similarity(codes[0], codes[1], dim=0) < 0.5


@pytest.mark.parametrize("kind", ["meta", "mdrn", "fixed"])
def test_training_few_steps_is_reproducible(tmp_path, kind):
    ct = volume_data.VolumeSource("synthetic_ct", "CT", "-", "train", True)
    rng = np.random.default_rng(3)
    vol = intensity.normalise(rng.normal(0, 400, (12, 140, 140)).astype(np.float32), intensity.CT_RANGE)
    first = train_sr2d.train(kind, tmp_path, tmp_path, tmp_path / "a", steps=2, seed=4, volumes=[(ct, vol)])
    again = train_sr2d.train(kind, tmp_path, tmp_path, tmp_path / "b", steps=2, seed=4, volumes=[(ct, vol)])
    a, config = weights.load(first)
    b, _ = weights.load(again)
    assert config["model"] == ("meta" if kind == "meta" else "mdrn") and all(torch.equal(a[k], b[k]) for k in a)
    assert "seed 4" in weights.card_path(first).read_text()
    if kind == "fixed":  # Meta-Upscale's trunk, loadable as an MDRN
        assert (config["channels"], config["blocks"]) == (meta_sr.MetaConfig().channels, meta_sr.MetaConfig().blocks)
        assert mdrn.load_mdrn(first)(torch.rand(1, 1, 8, 8), 3).shape == (1, 1, 24, 24)


@pytest.mark.parametrize("name", [META_FILE, mdrn.MDRN_FILE, mdrn.FIXED_FILE])
def test_shipped_sr2d_weights_match_their_cards(name):
    """The shipped file's digest is the card's, and the steps it records are the ones its recipe states
    (``srnode eval sr2d`` prints them beside "meta - fixed")."""
    path = Path(weights.weights_dir()) / name
    state, config = weights.load(path)
    loaded = meta_sr.load_meta(path) if name == META_FILE else mdrn.load_mdrn(path)
    assert set(loaded.state_dict()) == set(state)
    assert f"; {config['steps']} steps, seed" in weights.card_path(path).read_text()


# ---- pipeline ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"scale": 4.5}, "between 1 and 4"),
    ({"scale": 0.5}, "between 1 and 4"),
    ({"model": "sinc"}, "option 'model'"),
    ({"scale": 2, "target_spacing": [0.3, 0.3]}, "drop option 'scale'"),
    ({"scale": 1, "through_scale": 1}, "no change"),
])
def test_bad_options_are_named(options, words):
    with pytest.raises(ValueError, match=words):
        arbitrary.PIPELINE.validate_options(options)


def test_factor_2_5_on_204_px_gives_510_px_at_exactly_a_fifth_of_the_spacing(tmp_path):
    src = _ct_slice(204)
    [out] = list(arbitrary.PIPELINE.run([src], {"scale": 2.5}, CONTEXT))
    assert (out.Rows, out.Columns) == (510, 510)
    spacing = [float(v) for v in src.PixelSpacing]
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([s / 2.5 for s in spacing], abs=1e-6)
    assert "Meta-Upscale" in out.SeriesDescription
    check_derived([src], [out])
    src_path, out_path = tmp_path / "src.dcm", tmp_path / "out.dcm"
    src.save_as(src_path, enforce_file_format=True)
    out.save_as(out_path, enforce_file_format=True)
    assert new_dciodvfy_errors(out_path, src_path) == []


def test_a_target_spacing_that_is_not_exact_rounds_the_matrix_and_keeps_the_field_of_view():
    src = _ct_slice(100)
    spacing = float(src.PixelSpacing[0])
    target = spacing / 2.37  # 237 px: the nearest integer
    [out] = list(arbitrary.PIPELINE.run([src], {"target_spacing": [target, target], "model": "lanczos"}, CONTEXT))
    assert out.Rows == arbitrary.output_length(100, 2.37) == 237
    assert float(out.PixelSpacing[0]) * out.Rows == pytest.approx(spacing * 100, abs=1e-4)


def test_slices_at_a_non_integer_factor_have_exact_geometry():
    series = ct_series(4, spacing=5.0)
    outputs = list(arbitrary.PIPELINE.run(series, {"target_spacing": 2.0}, CONTEXT))
    assert len(outputs) == 10  # 4 * 5 / 2
    check_derived(series, outputs, slab_edges=True)
    assert float(outputs[0].SpacingBetweenSlices) == pytest.approx(2.0)
    src = sorted(series, key=lambda ds: int(ds.InstanceNumber))
    first = np.array([float(v) for v in src[0].ImagePositionPatient])
    normal = np.cross(*(np.array([float(v) for v in src[0].ImageOrientationPatient]).reshape(2, 3)))
    by_number = sorted(outputs, key=lambda ds: int(ds.InstanceNumber))
    for j, out in enumerate(by_number):
        expected = first + ((j + 0.5) * 4 / 10 - 0.5) * 5.0 * normal
        assert np.allclose([float(v) for v in out.ImagePositionPatient], expected, atol=1e-3)


def test_monochrome1_radiograph_keeps_its_photometric_and_range():
    cr = read_testdata("RG1_UNCR.dcm")
    cr = _crop(cr, 256)
    [out] = list(arbitrary.PIPELINE.run([cr], {"scale": 1.5}, CONTEXT))
    assert out.PhotometricInterpretation == "MONOCHROME1" and (out.Rows, out.Columns) == (384, 384)
    lo, hi = np.percentile(cr.pixel_array, [1, 99])
    olo, ohi = np.percentile(out.pixel_array, [1, 99])
    assert abs(olo - lo) < 0.05 * (hi - lo) and abs(ohi - hi) < 0.05 * (hi - lo)


def _crop(ds: pydicom.Dataset, size: int) -> pydicom.Dataset:
    arr = ds.pixel_array
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    ds.set_pixel_data(np.ascontiguousarray(arr[y:y + size, x:x + size]), ds.PhotometricInterpretation,
                      int(ds.BitsStored), generate_instance_uid=False)
    return ds


def test_downsampling_and_slice_factors_on_images_are_refused():
    with pytest.raises(Refusal, match="needs a volume"):
        list(arbitrary.PIPELINE.run([read_testdata("RG1_UNCR.dcm")], {"through_scale": 2}, CONTEXT))
    src = _ct_slice(64)
    coarse = float(src.PixelSpacing[0]) * 2
    with pytest.raises(Refusal, match="a factor 0.5; arbitrary does not downsample"):
        list(arbitrary.PIPELINE.run([src], {"target_spacing": [coarse, coarse]}, CONTEXT))
    spacing = float(src.PixelSpacing[0])
    with pytest.raises(Refusal, match="64 -> 257 is a factor 4.016, above arbitrary's largest, 4"):
        list(arbitrary.PIPELINE.run([src], {"target_spacing": [spacing / 4.01] * 2}, CONTEXT))
    cr = read_testdata("RG1_UNCR.dcm")
    cr.PixelSpacing = [0.2, 0.2]
    with pytest.raises(Refusal, match="leave the image unchanged"):
        list(arbitrary.PIPELINE.run([cr], {"target_spacing": [0.2, 0.2]}, CONTEXT))


def test_anisotropic_factors_are_named_and_the_aspect_ratio_follows():
    src = _ct_slice(64)
    src.PixelAspectRatio = [1, 1]
    spacing = float(src.PixelSpacing[0])
    [out] = arbitrary.PIPELINE.run([src], {"target_spacing": [spacing / 1.5, spacing / 3], "model": "lanczos"},
                                   CONTEXT)
    assert (out.Rows, out.Columns) == (96, 192)
    assert out.PixelAspectRatio == [2, 1]  # pixels now twice as tall as wide, as PixelSpacing says
    assert out.SeriesDescription == "super-res rows... lanczos (interpolation) - research use"  # cut at a word
    assert "rows x1.5 cols x3 (64x64 -> 96x192)" in out.DerivationDescription
    [out] = arbitrary.PIPELINE.run([src], {"target_spacing": [spacing / 2.5] * 2, "model": "lanczos"}, CONTEXT)
    assert "super-res x2.5 lanczos" in out.SeriesDescription
    # A long label is cut, not the method's name, even on a rerun (64-character LO)
    long = arbitrary.PIPELINE._series({"model": "lanczos"}, None, "rows x1.334 cols x2.666, slices x2.5", "")
    described = series_description(long.description, version=2)
    assert len(described) <= 64 and described.endswith("... lanczos (interpolation) - research use v2")


def test_missing_and_altered_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SRNODE_WEIGHTS", str(tmp_path))
    arbitrary.load_models.cache_clear()
    try:
        assert f"{META_FILE} is missing" in arbitrary.PIPELINE.not_ready()
        shipped = Path(arbitrary.__file__).resolve().parents[1] / "weights" / META_FILE
        (tmp_path / META_FILE).write_bytes(shipped.read_bytes()[:-1] + b"\0")
        weights.card_path(tmp_path / META_FILE).write_text(weights.card_path(shipped).read_text())
        assert "does not match its model card" in arbitrary.PIPELINE.not_ready()
    finally:
        arbitrary.load_models.cache_clear()


def test_meta_beats_lanczos_on_a_real_ct_at_2_5x():
    """The shipped Meta-Upscale on the real CT_small image (not a training image) at a non-integer factor."""
    hr = intensity.normalise(_ct_slice(200).pixel_array.astype(np.float32) - 1024, intensity.CT_RANGE)
    lr = resize(hr, (80, 80), "cubic")
    model = arbitrary.load_models(weights.weights_dir()).module
    with torch.no_grad():
        out = model(torch.from_numpy(lr)[None, None], 200, 200)[0, 0].numpy()
    lanczos = resize(lr, (200, 200), "lanczos")
    assert np.mean((out - hr) ** 2) < np.mean((lanczos - hr) ** 2)


def test_a_ct_volume_offline_every_slice_valid(tmp_path):
    series = ct_series(3, spacing=5.0, size=64)
    src_path = tmp_path / "src.dcm"
    series[0].save_as(src_path, enforce_file_format=True)
    outputs = list(arbitrary.PIPELINE.run(series, {"scale": 1.5, "through_scale": 2.5}, CONTEXT))
    assert len(outputs) == 8 and outputs[0].Rows == 96  # round(3 * 2.5) = 8 (7.5, halves up)
    check_derived(series, outputs, slab_edges=True)
    for i, ds in enumerate(outputs):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert new_dciodvfy_errors(path, src_path) == []
    assert dcmread(tmp_path / "0.dcm").SeriesInstanceUID == outputs[-1].SeriesInstanceUID


def test_mdrn_does_integer_in_plane_factors_only(tmp_path):
    src = _ct_slice(64)
    [out] = list(arbitrary.PIPELINE.run([src], {"scale": 3, "model": "mdrn"}, CONTEXT))
    assert (out.Rows, out.Columns) == (192, 192) and "MDRN" in out.SeriesDescription
    check_derived([src], [out])
    src_path, out_path = tmp_path / "src.dcm", tmp_path / "out.dcm"
    src.save_as(src_path, enforce_file_format=True)
    out.save_as(out_path, enforce_file_format=True)
    assert new_dciodvfy_errors(out_path, src_path) == []
    with pytest.raises(Refusal, match="factors 2, 3 and 4"):
        list(arbitrary.PIPELINE.run([src], {"scale": 2.5, "model": "mdrn"}, CONTEXT))
    with pytest.raises(Refusal, match="two-dimensional"):
        list(arbitrary.PIPELINE.run(ct_series(3), {"through_scale": 2, "model": "mdrn"}, CONTEXT))
