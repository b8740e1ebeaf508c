"""SCAN: neighbour mining, the heads recovering the classes of toy features from their neighbours, the
`ssl cluster --method scan` chain on toy images (neighbours artifact, clusters that `ssl pseudolabel`
reproduces, --assign-data, up to date on a re-run, `ssl run`), and the bad inputs of each step."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from scan_files import intermediates, rotation_checkpoint

from ssl_cli.clustering import scan
from ssl_cli.clustering.metrics import nmi
from ssl_cli.clustering.scan import (
    ClusterHeads,
    assign,
    feature_statistics,
    head_losses,
    mine_neighbours,
    neighbour_agreement,
    scan_step,
)
from ssl_cli.errors import UserError
from ssl_cli.train.distributed import ProcessGroup, row_share

TOY_CLASSES = 4


def blobs(per_class: int = 40, classes: int = TOY_CLASSES, dim: int = 16, seed: int = 0):
    """Unit-norm class blobs around random centres: (classes * per_class, dim) features and their classes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 3
    targets = np.repeat(np.arange(classes), per_class)
    features = centres[targets] + rng.standard_normal((len(targets), dim))
    return torch.tensor(features, dtype=torch.float32), targets


def test_neighbours_are_the_nearest_others_by_cosine():
    angles = torch.tensor([0.0, 0.1, 0.25, 1.5, 1.6, 3.0])
    points = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [5], [2], [1], [3], [1]])
    indices, distances = mine_neighbours(points, 2)
    assert indices.tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 2], [4, 3]]
    assert distances.shape == (6, 2) and (np.diff(distances, axis=1) >= 0).all()
    assert distances[0, 0] == pytest.approx(1 - np.cos(0.1), abs=1e-6)


def test_neighbours_need_more_images_than_k():
    with pytest.raises(UserError, match="--neighbours-k 5 needs more than 5 images"):
        mine_neighbours(torch.randn(5, 3), 5)


def test_agreement_counts_neighbours_of_the_same_class():
    assert neighbour_agreement(np.array([[1], [0], [0]]), np.array([0, 0, 1])) == pytest.approx(2 / 3)
    assert neighbour_agreement(np.array([[1], [0]]), np.array([-1, 0])) is None


def test_heads_recover_the_classes_of_toy_features_from_their_neighbours():
    features, targets = blobs()
    neighbours, _ = mine_neighbours(features, 5)
    assert neighbour_agreement(neighbours, targets) > 0.95
    torch.manual_seed(0)
    model = ClusterHeads(features.shape[1], TOY_CLASSES, 3, *feature_statistics(features))
    optimizer = torch.optim.Adam(model.heads.parameters(), lr=0.05)
    step = scan_step(entropy_weight=5.0)
    rng = np.random.default_rng(0)
    for _ in range(150):
        batch = rng.choice(len(features), 64, replace=False)
        partner = neighbours[batch, rng.integers(5, size=64)]
        loss, _ = step(model, [features[batch], features[partner]], None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses = head_losses(model, features, neighbours, 5.0)
    with torch.no_grad():
        assignments = model(features)[int(np.argmin(losses))].argmax(1).numpy()
    assert nmi(targets, assignments) > 0.95
    assert len(np.unique(assignments)) == TOY_CLASSES  # the entropy term keeps every cluster in use


def reference_head_losses(model: ClusterHeads, features: torch.Tensor, neighbours: np.ndarray,
                          entropy_weight: float) -> list[float]:
    """The whole-set SCAN loss of each head as written first: (N, K, k) neighbour predictions at once."""
    index = torch.from_numpy(neighbours)
    losses = []
    with torch.no_grad():
        for logits in model(features):
            probs = logits.float().softmax(1)
            agreement = (probs[:, None, :] * probs[index]).sum(2).clamp_min(1e-7)
            mean = probs.mean(0)
            entropy = -(mean * mean.clamp_min(1e-8).log()).sum()
            losses.append(float(-agreement.log().mean() - entropy_weight * entropy))
    return losses


@pytest.mark.parametrize("block_elements", [1, 97, 1 << 22])  # one row a block, uneven blocks, one block
def test_head_losses_in_row_blocks_equal_the_whole_set_reference(block_elements, monkeypatch):
    features, _ = blobs(per_class=15, dim=8)  # 60 rows
    neighbours, _ = mine_neighbours(features, 6)
    torch.manual_seed(1)
    model = ClusterHeads(8, 5, 3, *feature_statistics(features))
    monkeypatch.setattr(scan, "BLOCK_ELEMENTS", block_elements)
    got = head_losses(model, features, neighbours, 5.0)
    assert got == pytest.approx(reference_head_losses(model, features, neighbours, 5.0), abs=1e-5)


@pytest.mark.parametrize("block_elements", [1, 50, 1 << 22])
def test_the_assignment_pass_in_row_blocks_is_the_heads_argmax(block_elements, monkeypatch):
    features, _ = blobs(per_class=15, dim=8)
    torch.manual_seed(2)
    model = ClusterHeads(8, 5, 2, *feature_statistics(features))
    monkeypatch.setattr(scan, "BLOCK_ELEMENTS", block_elements)
    assignments, confidence, shares = assign(model, features, head=1)
    with torch.no_grad():
        probs = model(features)[1].softmax(1)
    assert assignments.dtype == np.int64 and confidence.dtype == np.float32 and shares == [60]
    assert np.array_equal(assignments, probs.argmax(1).numpy())
    assert np.allclose(confidence, probs.max(1).values.numpy(), atol=1e-6)


def test_agreement_in_blocks_counts_what_the_whole_comparison_counts(monkeypatch):
    rng = np.random.default_rng(0)
    targets, indices = rng.integers(3, size=50), rng.integers(50, size=(50, 4))
    monkeypatch.setattr(scan, "AGREEMENT_BLOCK", 7)
    assert neighbour_agreement(indices, targets) == pytest.approx((targets[indices] == targets[:, None]).mean())


@pytest.mark.parametrize("n, world", [(96, 2), (7, 3), (2, 4), (0, 2)])
def test_row_shares_cover_the_rows_once_in_order(n, world):
    shares = [row_share(n, ProcessGroup(rank, world)) for rank in range(world)]
    assert [row for share in shares for row in share] == list(range(n))
    assert max(len(share) for share in shares) == -(-n // world)


# --- the stage on toy images -------------------------------------------------------------------------

# the frozen variant (heads on cached features); tests/clustering/test_scan_backbone.py trains the network
COMMON = ["--k", str(TOY_CLASSES), "--scan-epochs", "12", "--self-label-epochs", "2", "--batch-size", "32", "--lr",
          "0.01", "--heads", "3", "--neighbours-k", "5", "--workers", "0", "--device", "cpu", "--no-progress",
          "--scan-backbone", "frozen"]


@pytest.fixture(scope="module")
def pretext_pt(toy_dir, tmp_path_factory, cli):
    return rotation_checkpoint(cli, toy_dir, tmp_path_factory.mktemp("scan") / "rotation.pt")




@pytest.fixture(scope="module")
def scan_run(pretext_pt, toy_dir, cli):
    out = pretext_pt.parent / "clusters.h5"
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *COMMON, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_scan_writes_neighbours_and_clusters_of_the_kmeans_kind(scan_run, toy_dir):
    out, output = scan_run
    files = intermediates(out)
    assert set(files) == {"features", "neighbours", "scan", "selflabel"}
    assert all(path.parent == out.parent / "scan-cache" and path.exists() for path in files.values())
    assert out.with_name("clusters.features.h5").resolve() == files["features"].resolve()  # what pseudolabel takes
    with h5py.File(files["neighbours"]) as handle:
        assert handle["indices"].shape == (96, 5) and handle["distances"].shape == (96, 5)
        assert handle["sample_ids"].shape == (96,)
        assert 0 <= float(handle.attrs["agreement"]) <= 1
    with h5py.File(out) as handle:
        assert handle.attrs["schema"] == "ssl-cli/clusters@1.1" and handle.attrs["method"] == "scan"
        assignments, confidence = handle["assignments"][...], handle["confidence"][...]
        assert assignments.shape == confidence.shape == (96,) and assignments.max() < TOY_CLASSES
        assert ((confidence >= 1 / TOY_CLASSES - 1e-6) & (confidence <= 1)).all()
        assert handle["head_weight"].shape[0] == TOY_CLASSES
        assert {"nmi", "ari", "acc_hungarian"} <= set(json.loads(handle.attrs["metrics"]))
    assert "neighbour_agreement" in output and "nmi=" in output


def test_pseudolabel_reproduces_the_scan_clusters(scan_run, cli, tmp_path):
    out, _ = scan_run
    labels = tmp_path / "labels.h5"
    result = cli("pseudolabel", "--clusters", out, "--features", out.with_name("clusters.features.h5"), "--out", labels,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    with h5py.File(out) as clusters, h5py.File(labels) as labelled:
        assert np.array_equal(clusters["assignments"][...], labelled["labels"][...])
        assert np.allclose(clusters["confidence"][...], labelled["confidence"][...], atol=1e-5)


def test_a_rerun_is_up_to_date_and_assign_data_clusters_other_images(scan_run, toy_dir, cli, tmp_path, copy_to):
    out, _ = scan_run
    result = cli("cluster", "--method", "scan", "--model", out.with_name("rotation.pt"), "--data", toy_dir, *COMMON,
                 "--out", out)
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    other = copy_to(toy_dir, tmp_path)  # the same images under another path: a source of its own
    assigned = out.with_name("assigned.h5")
    neighbours = intermediates(out)["neighbours"]
    result = cli("cluster", "--method", "scan", "--model", out.with_name("rotation.pt"), "--data", toy_dir, *COMMON,
                 "--assign-data", other, "--neighbours", neighbours, "--out", assigned)
    assert result.exit_code == 0, result.output
    assert f"{neighbours} is up to date" in result.output  # mined once, reused
    with h5py.File(assigned) as handle:
        assert handle["assignments"].shape == (96,)


@pytest.mark.parametrize("extra, message", [
    (["--k", "500"], "--k 500 is larger than the 96 images"),
    (["--neighbours-k", "96"], "--neighbours-k 96 needs more than 96 images"),
    (["--layer", "nosuch"], "nosuch"),
    (["--features", "x.h5"], "drop --features"),
])
def test_bad_scan_inputs_exit_2_with_one_line(extra, message, pretext_pt, toy_dir, cli, tmp_path):
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *COMMON, *extra,
                 "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c.h5").exists()


def test_a_checkpoint_that_is_not_a_model_exits_2(scan_run, toy_dir, cli, tmp_path):
    out, _ = scan_run
    result = cli("cluster", "--method", "scan", "--model", intermediates(out)["scan"], "--data", toy_dir,
                 *COMMON, "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and "not a model checkpoint" in result.output, result.output


def test_a_neighbours_file_of_other_images_exits_2(scan_run, pretext_pt, cli, tmp_path, copy_to):
    out, _ = scan_run
    from ssl_cli.data.toy import write_toy_folder

    images = tmp_path / "other"
    write_toy_folder(images, n=48, classes=TOY_CLASSES, size=32, seed=1)
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", images, *COMMON,
                 "--neighbours", intermediates(out)["neighbours"], "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and "neighbours of other images" in result.output, result.output


def test_kmeans_flags_and_scan_flags_do_not_mix(features_h5, cli, tmp_path):
    result = cli("cluster", "--features", features_h5, "--k", "4", "--model", "m.pt", "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and "--model belongs to --method scan" in result.output, result.output
    result = cli("cluster", "--method", "scan", "--k", "4", "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and "needs --model" in result.output, result.output


def test_ssl_run_chains_a_scan_stage(pretext_pt, toy_dir, cli, tmp_path):
    stages = tmp_path / "stages.yaml"
    stages.write_text(f"""stages:
  cluster:
    cmd: cluster
    params: {{method: scan, scan_backbone: frozen, model: {pretext_pt}, data: {toy_dir}, k: 4, scan_epochs: 2, self_label: false,
              heads: 2, neighbours_k: 5, batch_size: 32, workers: 0, device: cpu, out: {tmp_path}/c.h5}}
  pseudolabel:
    cmd: pseudolabel
    params: {{clusters: {tmp_path}/c.h5, features: {tmp_path}/c.features.h5, out: {tmp_path}/labels.h5}}
""")
    result = cli("run", stages)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "labels.h5").exists()
    result = cli("run", stages)
    assert result.exit_code == 0 and "skip" in result.output and " run " not in result.output, result.output


def test_self_label_loss_in_the_metrics_is_the_confident_fraction(scan_run):
    out, _ = scan_run
    checkpoint = intermediates(out)["selflabel"]
    rows = checkpoint.with_name(checkpoint.stem + ".metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    first = json.loads(rows[0])
    assert 0 <= first["accuracy"] <= 1


def test_another_out_from_the_same_model_and_data_reuses_every_step(scan_run, pretext_pt, toy_dir, cli):
    """The intermediates are keyed by what they depend on, not by --out: a second output neither re-extracts
    nor re-mines nor retrains, and holds the same clusters."""
    out, _ = scan_run
    files = intermediates(out)
    written = {name: path.stat().st_mtime_ns for name, path in files.items()}
    other = out.with_name("other.h5")
    result = cli("cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *COMMON, "--out", other)
    assert result.exit_code == 0, result.output
    assert intermediates(other) == files
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == written
    assert all(f"{path} is up to date" in result.output for path in files.values()), result.output
    assert other.with_name("other.features.h5").resolve() == files["features"].resolve()
    with h5py.File(out) as first, h5py.File(other) as second:
        assert np.array_equal(first["assignments"][...], second["assignments"][...])
        assert np.array_equal(first["head_weight"][...], second["head_weight"][...])


def test_user_error_on_missing_model(toy_dir, cli, tmp_path):
    result = cli("cluster", "--method", "scan", "--model", tmp_path / "none.pt", "--data", toy_dir, *COMMON,
                 "--out", tmp_path / "c.h5")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert isinstance(UserError("x"), Exception)


def test_force_replaces_stale_intermediates_and_keeps_up_to_date_ones(pretext_pt, toy_dir, cli, tmp_path):
    """With --force (as `ssl run` passes after an upstream change) the stage's own files beside the output
    are replaced when they hold other settings and reused when they do not."""
    out = tmp_path / "c.h5"
    base = ["cluster", "--method", "scan", "--model", pretext_pt, "--data", toy_dir, *COMMON, "--out", out]
    assert cli(*base).exit_code == 0
    result = cli(*base, "--threshold", "0.9", "--force")  # only self-labelling changes
    assert result.exit_code == 0, result.output
    files = intermediates(out)
    assert f"{files['features']} is up to date" in result.output and f"{files['scan']} is up to date" in result.output
    result = cli(*base, "--pool-size", "2", "--force")  # other features: every step is redone, no refusal
    assert result.exit_code == 0, result.output
    assert "up to date" not in result.output.replace(f"{out.name} is up to date", "")
    with h5py.File(out) as handle:
        assert handle["head_weight"].shape[1] == 64 * 4  # the 2 x 2 pooled map
