"""The Hydra models, their metrics, training, weights and evaluation (few-step smoke runs)."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
from scipy import ndimage
import pytest
import torch
from PIL import Image

from pipelines import progress, weights
from pipelines.evaluation import eval_cxr, eval_metrics
from pipelines.evaluation.image_metrics import ms_ssim, psnr, ssim
from pipelines.models import hydra, parameter_count
from pipelines.training import cxr_data, train_cxr


def test_trunk_has_the_papers_topology_and_starts_as_the_identity():
    trunk = hydra.HydraTrunk()
    assert parameter_count(trunk) == 395_715  # the paper's 395,717 counts BatchNorm's running stats too
    assert [c.dilation[0] for c in trunk.convs] == [1, 1, 1, 2, 2, 2]
    assert [c.out_channels for c in trunk.convs] == [8, 16, 32, 64, 128, 256]
    x = torch.rand(2, 1, 48, 40)
    out, feats = trunk.eval()(x)
    assert torch.equal(out, x) and feats.shape == (2, 256, 48, 40)


def test_heads_take_the_sixth_conv_and_the_lung_head_keeps_the_grid():
    lungs = hydra.LungHead(64, grid=32)
    assert [m.out_channels for m in lungs.decoder if isinstance(m, torch.nn.Conv2d)] == [128, 64, 32, 16, 8, 1]
    feats = torch.rand(1, 64, 200, 100)
    pooled = hydra.pool_features(feats, 32)
    assert pooled.shape == (1, 64, 32, 16) and lungs(pooled).shape == (1, 1, 32, 16)
    probs = hydra.abnormal_probability(hydra.AbnormalityHead(64).eval()(pooled.mean(dim=(2, 3))))
    assert probs.shape == (1,) and 0 <= probs.item() <= 1


def test_heads_standardise_with_stored_statistics_and_the_lung_head_gets_position():
    feats = torch.rand(4, 8, 16, 12) * 0.03
    feats[:, 3] = 0.0  # a dead channel stays at zero, not amplified noise
    lungs = hydra.LungHead(8, grid=16)
    lungs.standardise.fit(feats, dims=(0, 2, 3))
    z = lungs.standardise(feats)
    live = [0, 1, 2, 4, 5, 6, 7]
    assert torch.allclose(z[:, live].mean(dim=(0, 2, 3)), torch.zeros(7), atol=1e-5)
    assert torch.allclose(z[:, live].std(dim=(0, 2, 3)), torch.ones(7), atol=1e-4)
    assert torch.all(z[:, 3] == 0)
    restored = hydra.LungHead(8, grid=16)
    restored.load_state_dict(lungs.state_dict())  # the statistics travel with the weights
    assert torch.equal(restored(feats), lungs(feats))
    assert lungs.decoder[0].in_channels == 8 + 2
    pos = hydra.position_channels(1, 16, 12)
    assert pos[0, 0, 0, 0] == -1 and pos[0, 0, -1, 0] == 1 and pos[0, 1, 0, 0] == -1 and pos[0, 1, 0, -1] == 1
    gap = feats.mean(dim=(2, 3))
    abnormality = hydra.AbnormalityHead(8).eval()
    abnormality.standardise.fit(gap, dims=(0,))
    assert set(abnormality.state_dict()) >= {"standardise.feature_mean", "standardise.feature_std"}


def test_metrics_on_known_cases():
    x = torch.rand(1, 1, 192, 192)
    assert ssim(x, x).item() == pytest.approx(1.0) and ms_ssim(x, x).item() == pytest.approx(1.0)
    assert psnr(x, (x + 0.1)).item() == pytest.approx(20.0, abs=1e-4)
    assert ssim(x, torch.rand_like(x)).item() < 0.1
    with pytest.raises(ValueError, match="176 px"):
        ms_ssim(x[..., :100, :100], x[..., :100, :100])
    assert eval_metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert eval_metrics.youden_threshold(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1])) == 0.7
    seg = eval_metrics.segmentation(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [0, 0]]))
    assert seg == {"iou": 0.5, "dice": pytest.approx(2 / 3), "pixel_accuracy": 0.75}


def test_degradation_keeps_a_constant_and_wants_a_multiple_of_the_scale():
    flat = np.full((48, 48), 0.25, np.float32)
    assert np.allclose(cxr_data.degrade(flat, 3), 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        cxr_data.degrade(flat[:47], 2)


def synthetic_cxr(folder, n_train=8, n_val=4):
    """Smooth 'chests' with two dark 'lungs' (the mask) and a bright blob on the abnormal ones."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    rows = []
    for i in range(n_train + n_val):
        abnormal = i % 2 == 1
        lungs = (((xx - 0.32) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1) | (((xx - 0.68) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
        img = 0.7 - 0.4 * lungs + 0.05 * rng.standard_normal((256, 256))
        if abnormal:
            img += 0.3 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.002))
        name = f"case{i:02d}"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{name}.png")
        Image.fromarray((lungs * 255).astype(np.uint8)).save(folder / f"{name}_mask.png")
        rows.append({"file": f"{name}.png", "mask": f"{name}_mask.png", "source": "synthetic",
                     "label": "abnormal" if abnormal else "normal", "split": "train" if i < n_train else "val"})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def every_update(original):
    """:class:`pipelines.progress.Progress` printing a line at every update off a terminal (train and eval
    print one every 10 s): a run of a few seconds then shows the lines a long one prints periodically."""
    return lambda *args, **kwargs: original(*args, **{**kwargs, "every_s": 0})


@contextlib.contextmanager
def progress_off_a_terminal():
    """stderr as a file (not a terminal), with :func:`every_update`; yields what was printed there."""
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()) as stderr:
        patch.setattr(progress, "Progress", every_update(progress.Progress))
        yield stderr


def numbered(text: str, what: str) -> list[tuple[int, int]]:
    """(done, total) of each ``what: done/total ...`` progress line."""
    return [tuple(map(int, line.split(": ", 1)[1].split(" ", 1)[0].split("/")))
            for line in text.splitlines() if line.startswith(f"{what}: ")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of every training on synthetic data: the whole recipe runs end to end (what it printed
    on stderr, off a terminal, comes third)."""
    data = synthetic_cxr(tmp_path_factory.mktemp("cxr"))
    out = tmp_path_factory.mktemp("weights")
    with progress_off_a_terminal() as stderr:
        assert train_cxr.main(["trunk", "--data", str(data), "--out", str(out), "--steps", "3", "--seed", "1"]) == 0
        assert train_cxr.main(["heads", "--data", str(data), "--out", str(out), "--steps", "3", "--epochs", "2"]) == 0
    return data, out, stderr.getvalue()


def test_training_off_a_terminal_prints_progress_lines_without_a_bar(trained):
    printed = trained[2]
    assert "\r" not in printed and "|" not in printed, printed  # no tqdm bar
    assert numbered(printed, "trunk") == [(3, 3)] and numbered(printed, "lungs") == [(3, 3)]
    assert numbered(printed, "abnormality") == [(2, 2)]
    assert any(" steps  loss " in line for line in printed.splitlines() if line.startswith("trunk: "))
    features = numbered(printed, "features")  # the heads' feature pass over each split, image by image
    splits = list(dict.fromkeys(total for _, total in features))
    assert len(splits) == 2 and features == [(k, n) for n in splits for k in range(1, n + 1)]


def test_training_writes_weights_cards_and_loss_logs(trained):
    _, out, _ = trained
    for name in (train_cxr.TRUNK_FILE, train_cxr.LUNGS_FILE, train_cxr.ABNORMALITY_FILE):
        header = weights.read_card_header(out / name)
        assert header["sha256"] == weights.sha256(out / name)
        config = json.loads(header["config"])
        assert config["recipe"]["seed"] in (0, 1)
        assert "Research use only" in weights.card_path(out / name).read_text()
    log = list(csv.DictReader((out / "logs" / "cxr_hydra_trunk.csv").open()))
    assert [row["step"] for row in log] == ["3"] and float(log[0]["loss"]) > 0
    assert 0 <= json.loads(weights.read_card_header(out / train_cxr.ABNORMALITY_FILE)["config"])["threshold"] <= 1


def test_trunk_training_is_reproducible_with_a_seed(trained, tmp_path):
    data, out, _ = trained
    assert train_cxr.main(["trunk", "--data", str(data), "--out", str(tmp_path), "--steps", "3", "--seed", "1"]) == 0
    again, _ = weights.load(tmp_path / train_cxr.TRUNK_FILE)
    first, _ = weights.load(out / train_cxr.TRUNK_FILE)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_eval_reports_every_table(trained, tmp_path):
    data, out, _ = trained
    with progress_off_a_terminal() as stderr:
        assert eval_cxr.main(["--data", str(data), "--weights", str(out), "--out", str(tmp_path), "--head-scales", "2",
                              "--update-cards", "--cost-size", "64"]) == 0
    printed = stderr.getvalue()
    assert "\r" not in printed and "|" not in printed, printed  # lines, no tqdm bar
    [total] = {total for _, total in numbered(printed, "eval cxr SR")}
    assert [done for done, _ in numbered(printed, "eval cxr SR")] == list(range(total + 1))  # each image, then done
    report = json.loads((tmp_path / "cxr_eval.json").read_text())
    assert set(report["sr"]) == {"x2", "x3", "x4", "x8"}
    assert set(report["sr"]["x2"]) == {"model", "pipeline", "hydra", "cubic", "lanczos"}
    assert report["sr"]["x2"]["model"] == "mdrn" and report["sr"]["x8"]["model"] == "hydra"
    assert report["lungs"]["x2"]["n"] == 4 and 0 <= report["lungs"]["x2"]["iou"] <= 1
    assert report["abnormality"]["x2"]["n"] == 4
    assert report["cost"]["params"]["trunk"] == 71_139 and report["cost"]["input"] == "64x64 x2"
    assert "pipeline - Lanczos" in (tmp_path / "cxr_eval.md").read_text()
    for name in (train_cxr.TRUNK_FILE, train_cxr.LUNGS_FILE, train_cxr.ABNORMALITY_FILE):
        card = weights.card_path(out / name).read_text()
        assert "## Data and split" in card and card.count("## Evaluation") == 1 and "pipeline - Lanczos" in card
        weights.load(out / name)  # the card's header matches its weights
    point = weights.load(out / train_cxr.ABNORMALITY_FILE)[1]["operating_point"]  # what the nodule report states
    assert point["threshold"] == report["abnormality"]["x2"]["threshold"]
    assert point["sensitivity"] == round(report["abnormality"]["x2"]["sensitivity"], 4)
    assert "held-out JSRT films" in point["held_out"]
    assert "lung_bounds" in weights.load(out / train_cxr.LUNGS_FILE)[1]  # `train cxr heads` stores them


def test_the_guided_filter_moves_a_blurred_lung_border_onto_the_films_edge():
    film = np.full((64, 64), 0.8, np.float32)
    film[:, 20:44] = 0.2  # a dark 'lung' from column 20 to 43
    prob = np.zeros((64, 64), np.float32)
    prob[:, 23:41] = 1.0  # the head's mask, 3 px short on each side, and blurred like an upsampled grid
    prob = ndimage.uniform_filter(prob, 7)
    before = (prob >= 0.5)[0]
    after = (hydra.guided_filter(film, prob, hydra.EDGE_RADIUS, hydra.EDGE_EPS) >= 0.5)[0]
    truth = film[0] < 0.5
    assert (after != truth).sum() < (before != truth).sum()
    flat = np.full((32, 32), 0.5, np.float32)  # no edges in the film: a smooth probability stays as it is
    smooth = np.linspace(0, 1, 32, dtype=np.float32)[None].repeat(32, 0)
    assert np.allclose(hydra.guided_filter(flat, smooth, 4, 1e-3)[:, 8:-8], smooth[:, 8:-8], atol=1e-4)


def test_lung_masks_come_on_the_source_matrix_for_films_of_any_size():
    head = hydra.LungHead(8, grid=16, film=True).eval()
    for shape in ((300, 200), (1024, 900), (512, 512)):
        film = np.random.default_rng(0).random(shape).astype(np.float32)
        pooled = torch.rand(1, 8, *hydra.analysis_grid(*shape, 16))
        assert hydra.lung_probability(head, pooled, shape, film).shape == shape
        assert hydra.lung_mask(head, pooled, shape, film).shape == shape
    assert hydra.film_at(np.ones((1024, 900)), (512, 450)).shape == (512, 450)


def test_missing_or_altered_weights_are_refused_with_the_reason(trained, tmp_path):
    _, out, _ = trained
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.load(tmp_path / "nothing.safetensors")
    copy = tmp_path / train_cxr.TRUNK_FILE
    copy.write_bytes((out / train_cxr.TRUNK_FILE).read_bytes())
    with pytest.raises(weights.WeightsError, match="no model card"):
        weights.load(copy)
    weights.card_path(copy).write_text(weights.card_path(out / train_cxr.TRUNK_FILE).read_text())
    weights.load(copy)
    copy.write_bytes(copy.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(weights.WeightsError, match="does not match its model card"):
        weights.load(copy)


def test_a_head_file_of_an_earlier_version_is_refused_with_the_reason(tmp_path):
    # the lung head before it standardised its input and took position channels: 64 decoder inputs, no statistics
    old = {k: v for k, v in hydra.LungHead(64).state_dict().items() if not k.startswith("standardise.")}
    old["decoder.0.weight"] = old["decoder.0.weight"][:, :64].clone()
    path = tmp_path / hydra.LUNGS_FILE
    weights.save(path, old, {"model": "hydra-lungs", "channels": 64, "grid": 128}, "# old lung head")
    state, config = weights.load(path, "hydra-lungs")
    with pytest.raises(weights.WeightsError, match=f"{hydra.LUNGS_FILE} does not fit this version.*retrain"):
        weights.restore(hydra.LungHead(config["channels"], config["grid"]), state, path)


def test_lung_augmentation_moves_features_and_mask_together():
    from pipelines.training.train_cxr import shifted

    feats = torch.arange(2 * 3 * 20 * 24, dtype=torch.float32).view(2, 3, 20, 24)
    masks = (feats[:, :1] % 7 == 0).float()
    seen = set()
    for seed in range(20):
        x, m = shifted(feats, masks, torch.Generator().manual_seed(seed), limit=3)
        assert x.shape == feats.shape and m.shape == masks.shape
        # locate the shift from the features' interior and check the mask moved by the same amount
        dy, dx = [(a, b) for a in range(-3, 4) for b in range(-3, 4)
                  if torch.equal(x[..., 3:-3, 3:-3], feats[..., 3 + a:17 + a, 3 + b:21 + b])][0]
        assert torch.equal(m[..., 3:-3, 3:-3], masks[..., 3 + dy:17 + dy, 3 + dx:21 + dx])
        seen.add((dy, dx))
    assert len(seen) > 5


def test_lung_masks_keep_the_two_lungs_without_specks_or_holes():
    import numpy as np

    mask = np.zeros((100, 100), bool)
    mask[20:80, 10:40] = True  # right lung, with a hole
    mask[50:55, 20:25] = False
    mask[20:70, 60:90] = True  # left lung
    mask[5:8, 5:8] = True  # speck
    mask[90:95, 45:50] = True  # another speck
    clean = hydra.clean_lung_mask(mask)
    assert clean[52, 22] and not clean[6, 6] and not clean[92, 47]
    assert clean.sum() == 60 * 30 + 50 * 30
    one = np.zeros((50, 50), bool)
    one[10:40, 5:20] = True
    one[10:12, 30:32] = True  # 4 px: under MIN_LUNG_PART of the piece
    assert hydra.clean_lung_mask(one).sum() == 30 * 15
    assert not hydra.clean_lung_mask(np.zeros((8, 8), bool)).any()


@pytest.mark.shared_data
def test_a_leaking_lung_mask_keeps_nothing_outside_the_thorax():
    """A held-out JSRT film and its reference mask, leaked into the air beside the patient, up
    past one apex into the neck and down past the other lung's base into the abdomen:
    ``within_thorax`` (with the shipped lung bounds) removes what lies outside the body and the rows
    the training films never show, and keeps the lungs."""
    from tests.paths import shared

    folder = shared("cxr")
    film = cxr_data.read_image(folder / "jsrt_JPCLN015_abnormal.png")
    lungs = cxr_data.read_mask(folder / "jsrt_JPCLN015_mask.png") > 0.5
    bounds = weights.load(weights.weights_dir() / hydra.LUNGS_FILE)[1]["lung_bounds"]
    labels, _ = ndimage.label(lungs)
    (top_l, bot_l), (top_r, bot_r) = hydra.vertical_extent(labels, hydra.two_lungs(labels))
    assert hydra.within_thorax(lungs, film, bounds).sum() == lungs.sum()  # a clean mask stays as it is
    h, w = film.shape
    right = labels == hydra.two_lungs(labels)[1]
    cols = np.nonzero(right.any(axis=0))[0]
    air = hydra.outside_body(film, lungs)
    row = int(np.argmax(air[:, 0] & lungs.any(axis=1)))  # a row of the lungs where the film's left edge is air
    assert air[row, 0]
    leaky = lungs.copy()
    leaky[row:row + 6, :np.nonzero(lungs[row])[0].min() + 1] = True  # out to the air at the film's edge
    centre = int(cols.mean())
    leaky[:int(top_r * h) + 2, centre - 10:centre + 10] = True  # from the image-right apex to the top edge
    leaky[int(bot_r * h) - 2:, cols.min() + 20:cols.max() - 5] = True  # below its base, to the bottom edge
    clean = hydra.within_thorax(leaky, film, bounds)
    apex, base = bounds["extent"]["apex"], bounds["extent"]["base"]
    above, below = int((top_l - apex[1]) * h) - 1, int((bot_l - base[0]) * h) + 2
    assert (leaky & air).any() and leaky[:above].any() and leaky[below:].any()
    assert not (clean & air).any()
    assert not clean[:above].any()
    assert not clean[below:].any()
    assert (clean & lungs).sum() == lungs.sum()  # the lungs themselves are kept
