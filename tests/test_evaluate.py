"""`ipsr evaluate` on real ORL faces with the real FaceNet and SFace, real MLflow (SQLite in a tmp $IPSR_HOME).

Generators are tiny U-Nets (width 8) trained for a few steps in-process with ipsr_model.training on ORL s1–s20,
and evaluated on s21–s40 where a test needs a trained model; registered models are logged in pt2 format exactly as
`ipsr train` does. Nothing of ours is mocked.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipsr_model.errors import UserError

IPSR = str(Path(sys.executable).with_name("ipsr"))
UNSEEN = "s2[1-9],s3[0-9],s40"  # identities the test generator never saw


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(att_faces, cached_weights) -> torch.nn.Module:
    """A width-8 U-Net trained for 40 steps (batch 8) on ORL s1–s20, pixel loss only: these tests need a trained
    model's row, not a good one, and FaceNet's backward pass would be ~90 % of the fixture's two minutes."""
    from ipsr_model.degradation import MultiScaleDegradation
    from ipsr_model.identity import IdentityNet
    from ipsr_model.losses import IdentityPreservingLoss
    from ipsr_model.training import make_optimizer, training_step
    from ipsr_model.unet import UNetGenerator
    from ipsr_platform.cli.smoke import load_faces

    torch.manual_seed(0)
    faces = load_faces([att_faces / f"s{s}" / f"{k}.pgm" for s in range(1, 21) for k in range(1, 11)])
    generator = UNetGenerator(base_channels=8)
    loss_fn = IdentityPreservingLoss(IdentityNet(str(cached_weights[0])), embedding_loss="none")
    optimizer, degradation, rng = (
        make_optimizer(generator, lr=1e-3),
        MultiScaleDegradation(),
        torch.Generator().manual_seed(0),
    )
    for _ in range(40):
        training_step(
            generator, loss_fn, optimizer, faces[torch.randint(len(faces), (8,), generator=rng)], degradation, rng
        )
    return generator.eval()


def register(generator: torch.nn.Module, name: str = "ipsr-unet") -> str:
    """Log ``generator`` like `ipsr train` does (pt2) and register it @candidate; returns the version."""
    import mlflow

    from ipsr_platform import tracking

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = tracking.ensure_experiment("ipsr-train", uri)
    example = torch.rand(2, 3, 128, 128) * 2 - 1
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pytorch.log_model(
            generator.eval(), name="generator", input_example=example.numpy(), serialization_format="pt2",
            pip_requirements=["torch"],
        )  # fmt: skip
    return tracking.register(info.model_uri, name, uri=uri)


def config(**overrides):
    from ipsr_platform.config import EvaluateConfig

    return EvaluateConfig(**({"data": ""} | overrides))


def assert_valid_cmc(curve: torch.Tensor, gallery_size: int) -> None:
    assert len(curve) == gallery_size
    assert torch.all(curve[1:] >= curve[:-1]), curve
    assert ((curve >= 0) & (curve <= 1)).all()
    assert curve[-1] == 1.0  # everyone is found by rank = gallery size


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_ar_protocol_on_orl(home_with_weights, att_faces, trained, tmp_path):
    """All 40 ORL people, AR-style: HR ≥ 0.95 with both recognizers, bicubic = the foundation baseline
    (ipsr_platform.scoring.rank1_by_size, as `ipsr smoke` and training's validation report it, on faces read
    by smoke's loader), a trained model's row, valid CMCs, outputs
    on disk and in MLflow."""
    from ipsr_model.identity import IdentityNet
    from ipsr_platform import tracking
    from ipsr_platform.cli.smoke import list_identities, load_faces
    from ipsr_platform.scoring import rank1_by_size
    from jobs.evaluate import run

    checkpoint = tmp_path / "tiny_unet.pt"
    torch.save(trained.state_dict(), checkpoint)
    out = tmp_path / "eval"
    summary = run(config(data=str(att_faces), models=(str(checkpoint),), output=str(out)))

    sizes = ["11x8", "16x12", "16x16", "21x15", "32x32"]
    assert summary.columns == sizes
    for recognizer in ("facenet", "sface"):
        table = summary.rank1[recognizer]
        assert list(table) == ["hr", "bicubic", "tiny_unet"]
        assert table["hr"]["mean"] >= 0.95, (recognizer, table["hr"])
        assert all(0.0 <= v <= 1.0 for v in table["tiny_unet"].values())
        # Rank-1 falls with the probe size for bicubic: 11x8 is much harder than 32x32.
        assert table["bicubic"]["11x8"] < table["bicubic"]["32x32"]

    identities = list_identities(att_faces)
    names = list(identities)
    labels = torch.arange(len(names))
    gallery = load_faces([identities[n][0] for n in names])
    probes = load_faces([identities[n][1] for n in names])
    from ipsr_model.degradation import parse_size

    foundation = rank1_by_size(
        IdentityNet("casia-webface-offline"), gallery, probes, labels, tuple(parse_size(s) for s in sizes)
    )
    for size in sizes:
        assert summary.rank1["facenet"]["bicubic"][size] == pytest.approx(foundation[size], abs=1e-6)
    assert summary.rank1["facenet"]["hr"]["32x32"] == pytest.approx(foundation["HR"], abs=1e-6)

    import json

    cmcs = json.loads((out / "results.json").read_text())["cmc"]
    assert len(cmcs) == 2 * 3 * len(sizes)
    for curve in cmcs.values():
        assert_valid_cmc(torch.tensor(curve), gallery_size=40)

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 3 * len(sizes) and {r["method"] for r in rows} == {"hr", "bicubic", "tiny_unet"}
    for row in rows:  # every cell has its interval; every model row its paired test against bicubic
        assert float(row["rank1_ci95_low"]) <= float(row["rank1"]) <= float(row["rank1_ci95_high"]), row
        assert (row["p_vs_bicubic"] != "") == (row["method"] == "tiny_unet"), row
    cell = summary.statistics["sface"]["tiny_unet"]["11x8"]
    bicubic_hits = summary.statistics["sface"]["bicubic"]["11x8"]["hits"]
    assert cell["hits"] - bicubic_hits == cell["only_model"] - cell["only_bicubic"]  # McNemar's discordant pairs
    assert 0 < cell["p_vs_bicubic"] <= 1 and cell["n"] == 40
    table = (out / "table.md").read_text()
    assert "| bicubic |" in table and " ±0." in table and "McNemar" in table
    assert "back-projected toward its LR input (3 steps" in table
    assert Image.open(out / "cmc.png").size[0] > 0
    # Fidelity against HR: bicubic and the model per size, in results.json and table.md; PSNR grows with the size.
    fidelity = json.loads((out / "results.json").read_text())["fidelity"]
    assert list(fidelity) == ["bicubic", "tiny_unet"] and list(fidelity["bicubic"]) == sizes
    assert 10 < fidelity["bicubic"]["11x8"]["psnr"] < fidelity["bicubic"]["32x32"]["psnr"] < 60
    assert 0 < fidelity["bicubic"]["11x8"]["ssim"] < fidelity["bicubic"]["32x32"]["ssim"] <= 1
    assert "PSNR dB / SSIM against HR" in table and f"{fidelity['tiny_unet']['16x12']['psnr']:.2f} / " in table
    # Sample grids: a title row, then LR input | bicubic | the model | HR for each of the first probes.
    grid = Image.open(out / "samples_11x8.png")
    assert grid.size[0] > 4 * 128 and (grid.size[1] - 20) % 132 == 0 and grid.size[1] > 128

    run_data = tracking.client().get_run(summary.mlflow_run_id)
    assert run_data.info.status == "FINISHED"
    assert run_data.data.metrics["rank1/sface/bicubic/11x8"] == pytest.approx(summary.rank1["sface"]["bicubic"]["11x8"])
    artifacts = {a.path for a in tracking.client().list_artifacts(summary.mlflow_run_id)}
    assert {"table.md", "results.csv", "cmc.png"} <= artifacts


def test_seed_groups_aggregate_mean_std_and_per_seed_tests(tmp_path):
    """Models given as GROUP=SPEC are seeds: mean ± std of rank-1, each seed's McNemar p, a verdict only when every
    seed is significant the same way."""
    from ipsr_platform.scoring import BICUBIC, Method
    from jobs.evaluate import format_seed_cell, seed_table, split_group, statistics

    assert split_group("eq2=/runs/a.pt") == ("eq2", "/runs/a.pt")
    assert split_group("models:/ipsr-unet@champion") == (None, "models:/ipsr-unet@champion")
    odd = tmp_path / "a=b.pt"
    odd.write_bytes(b"")
    assert split_group(str(odd)) == (None, str(odd))  # an existing file is a file, whatever its name

    n = 40
    bicubic = torch.tensor([0] * 10 + [1] * 30)  # rank 0 = hit: 10 of 40
    seeds = [torch.tensor([0] * 30 + [1] * 10), torch.tensor([0] * 28 + [1] * 12), torch.tensor([0] * 12 + [1] * 28)]
    ranks = {("sface", BICUBIC, "16x12"): bicubic} | {
        ("sface", f"eq2.{i + 1}", "16x12"): r for i, r in enumerate(seeds)
    }
    ranks |= {("sface", "one.1", "16x12"): seeds[0]}
    dummy = torch.nn.Identity()
    methods = [Method(BICUBIC)] + [Method(f"eq2.{i}", dummy, "x", None, "eq2") for i in (1, 2, 3)]
    methods += [Method("one.1", dummy, "x", None, "one")]
    stats = statistics(ranks, "sface", methods, ["16x12"])
    table = seed_table(stats, methods, ["16x12"])
    cell = table["eq2"]["16x12"]
    assert cell["seeds"] == [30 / n, 28 / n, 12 / n]
    assert cell["mean"] == pytest.approx(70 / 3 / n) and cell["std"] == pytest.approx(
        torch.tensor([30.0, 28, 12]).std().item() / n
    )
    assert cell["p_vs_bicubic"][0] < 1e-4 and cell["p_vs_bicubic"][2] == 0.5  # seed 3: 2 discordant probes: p = 2 · 1/4
    assert cell["verdict"] == "" and format_seed_cell(cell).startswith("0.583 ±0.")
    assert table["one"]["16x12"]["verdict"] == "better" and table["one"]["16x12"]["std"] == 0.0


def test_promotion_decision_needs_bicubic_and_the_champion_beaten():
    from jobs.evaluate import promotion_decision

    metric = "mean rank-1"
    assert promotion_decision(("candidate v2", 0.70), 0.70, None, metric) == (
        False, "mean rank-1: candidate v2 0.7000 does not beat bicubic 0.7000")  # fmt: skip
    promoted, why = promotion_decision(("candidate v2", 0.71), 0.70, None, metric)
    assert promoted and "no champion yet" in why and "beats bicubic" in why
    promoted, why = promotion_decision(("candidate v3", 0.75), 0.70, ("champion v2", 0.75), metric)
    assert not promoted and "does not beat champion v2 0.7500" in why  # a tie keeps the serving model
    promoted, why = promotion_decision(("candidate v3", 0.80), 0.70, ("champion v2", 0.75), metric)
    assert promoted and "beats champion v2" in why
    # Better than a poor champion is not enough when bicubic is better still.
    assert not promotion_decision(("candidate v3", 0.60), 0.70, ("champion v2", 0.50), metric)[0]
    # With per-probe evidence a higher mean must also be a significant paired gain, and the verdict says so.
    evidence = {
        "probes": 90,
        "columns": 2,
        "only_model": 9,
        "only_bicubic": 4,
        "p": 0.27,
        "model_rank1": 0.72,
        "bicubic_rank1": 0.70,
        "model_ci95": (0.65, 0.78),
        "bicubic_ci95": (0.63, 0.76),
    }
    promoted, why = promotion_decision(("candidate v2", 0.72), 0.70, None, metric, evidence)
    assert not promoted and "not significantly better than bicubic" in why and "90 probes × 2 columns" in why
    assert "95 % CI 0.650–0.780" in why and "p = 0.27" in why
    promoted, why = promotion_decision(("candidate v2", 0.72), 0.70, None, metric, evidence | {"p": 0.01})
    assert promoted and "beats bicubic" in why


def test_promotion_never_serves_a_model_worse_than_bicubic(home_with_weights, att_faces, trained, tmp_path):
    """Registry round trip (pt2), real evaluation: a candidate below bicubic is refused whether or not there is a
    champion, and says why; the champion stays where it was."""
    from ipsr_model.unet import UNetGenerator
    from ipsr_platform import tracking
    from jobs.evaluate import run

    torch.manual_seed(1)
    untrained = UNetGenerator(base_channels=8).eval()  # random weights: garbage faces
    # The network alone: back-projection would pull even garbage back to about bicubic (level, so refused anyway).
    common = dict(data=str(att_faces), identities=UNSEEN, sizes="16x12,21x15", recognizers=("sface",), promote=True,
                  back_projection=0)  # fmt: skip

    assert register(untrained) == "1"
    first = run(config(**common, output=str(tmp_path / "eval1")))
    decision = first.promotion
    assert not decision.promoted and "does not beat bicubic" in decision.why, decision
    assert decision.candidate_score < decision.bicubic_score
    assert tracking.version_or_none("ipsr-unet", "champion") is None
    assert tracking.client().get_model_version("ipsr-unet", "1").tags["promotion"].startswith("not promoted")
    # The summary a registered model's evaluation returns is the whole one (the terminal report reads it).
    assert first.protocol == "ar" and set(first.rank1) == {"sface"}, first

    assert register(trained) == "2"
    tracking.set_alias("ipsr-unet", "champion", "2")  # an earlier promotion
    assert register(untrained) == "3"
    second = run(config(**common, output=str(tmp_path / "eval2")))
    decision = second.promotion
    assert not decision.promoted and decision.champion == "2" and "does not beat bicubic" in decision.why
    assert str(tracking.version_for_alias("ipsr-unet", "champion").version) == "2"


def test_promotion_fails_closed(home_with_weights, att_faces, monkeypatch):
    """A registry that can't be read is not 'no champion', and a champion that moved during the evaluation
    stops the alias move."""
    from ipsr_model.unet import UNetGenerator
    from ipsr_platform import tracking
    from ipsr_platform.models import load_generator
    from ipsr_platform.scoring import BICUBIC, Method
    from jobs.evaluate import build_protocol, promote

    torch.manual_seed(0)
    for _ in range(3):
        register(UNetGenerator(base_channels=4).eval())
    tracking.set_alias("ipsr-unet", "champion", "1")
    loaded = [load_generator(f"models:/ipsr-unet@{alias}") for alias in ("candidate", "champion")]
    methods = [Method(BICUBIC)] + [Method(m.label, m.module, m.spec, m) for m in loaded]
    tables = {"sface": {BICUBIC: {"mean": 0.5}, "ipsr-unet-v3": {"mean": 0.9}, "ipsr-unet-v1": {"mean": 0.6}}}
    versions = {m.spec: m.version for m in loaded}
    protocol = build_protocol(config(data=str(att_faces), protocol="folder", identities="s1,s2", sizes="16x12"))
    probes = len(protocol.columns[0].labels)  # the candidate gets every probe right, bicubic none: significant
    results = {("sface", BICUBIC, "16x12"): torch.ones(probes), ("sface", "ipsr-unet-v3", "16x12"): torch.zeros(probes)}
    tracking.set_alias("ipsr-unet", "champion", "2")  # someone promoted v2 meanwhile
    with pytest.raises(UserError, match="moved to v2 while this evaluation compared against v1"):
        promote(
            config(data="x", promote=True), protocol, results, tables, methods, versions, "run", tracking.tracking_uri()
        )
    assert str(tracking.version_for_alias("ipsr-unet", "champion").version) == "2"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(UserError, match="cannot read ipsr-unet@champion from the registry at http://127.0.0.1:9"):
        tracking.version_or_none("ipsr-unet", "champion", "http://127.0.0.1:9")  # nothing listens on port 9


def test_sample_grid_shows_one_probe_of_each_person(home_with_weights, att_faces, trained):
    """The folder protocol has nine probes per person: the grid's rows are different people, each with its LR input,
    bicubic, the model and HR."""
    from ipsr_model.sface import SFaceNet
    from ipsr_platform.scoring import BICUBIC, Method, score
    from jobs.evaluate import build_protocol

    protocol = build_protocol(config(data=str(att_faces), protocol="folder", identities="s31,s32,s33", sizes="11x8"))
    methods = [Method(BICUBIC), Method("tiny", trained, "tiny")]
    grid = score(protocol, methods, {"sface": SFaceNet()}, grid_faces=3, progress=False).samples["11x8"]
    assert sorted(grid.rows) == ["s31", "s32", "s33"]
    assert [title for title, _ in grid.columns] == ["LR 11x8", BICUBIC, "tiny", "HR"]
    assert all(images.shape == (3, 3, 128, 128) for _, images in grid.columns)


def test_models_are_back_projected_toward_the_lr_probe(home_with_weights, att_faces, trained):
    """A model row with back-projection: its faces, shrunk to the probe size, are the LR probes; fidelity is measured
    on what the recognizer sees."""
    from ipsr_model.degradation import resize
    from ipsr_model.sface import SFaceNet
    from ipsr_platform.scoring import Method, score
    from jobs.evaluate import build_protocol

    protocol = build_protocol(config(data=str(att_faces), protocol="folder", identities="s31,s32,s33", sizes="11x8"))
    methods = [Method("net", trained, "net"), Method("net_bp", trained, "net_bp", back_projection=3)]
    scores = score(protocol, methods, {"sface": SFaceNet()}, grid_faces=3, progress=False)
    grid = dict(scores.samples["11x8"].columns)
    low = resize(grid["HR"], (11, 8))
    net, projected = ((resize(grid[label], (11, 8)) - low).abs().mean() for label in ("net", "net_bp"))
    assert projected < net / 5, (net, projected)
    psnr = {label: float(scores.fidelity[label, "11x8"][0].mean()) for label in ("net", "net_bp")}
    assert psnr["net_bp"] > psnr["net"], psnr


def test_scface_and_lfw_layouts(home_with_weights, att_faces, trained, tmp_path):
    """SCface-style folders built from ORL (mugshot gallery, two 'distance' groups of small natural probes),
    protocols 1 and 2 with concatenated bicubic ⊕ SR embeddings; the LFW adapter's gallery/probe split."""
    from ipsr_model.degradation import resize
    from ipsr_model.metrics import cmc_from_ranks
    from ipsr_model.sface import SFaceNet
    from ipsr_platform.scoring import BICUBIC, Method, rank1_table, score
    from jobs.evaluate import build_protocol

    root = tmp_path / "scface"
    people = [f"s{s}" for s in range(21, 31)]
    for person in people:
        (root / "gallery" / person).mkdir(parents=True)
        Image.open(att_faces / person / "1.pgm").save(root / "gallery" / person / "mugshot.png")
        for group, image, size in (("d1", 2, (23, 28)), ("d2", 3, (46, 56))):
            (root / "probes" / group / person).mkdir(parents=True, exist_ok=True)
            Image.open(att_faces / person / f"{image}.pgm").resize(size, Image.BICUBIC).save(
                root / "probes" / group / person / f"{image}.png"
            )
    methods = [Method(BICUBIC), Method("tiny", trained, "tiny", back_projection=3)]
    recognizers = {"sface": SFaceNet()}

    cfg = config(data=str(root), protocol="scface")
    assert cfg.concat  # the paper's SCface setting
    protocol = build_protocol(cfg)
    assert [c.name for c in protocol.columns] == ["d1", "d2"] and not protocol.synthetic
    lr = protocol.columns[0].lr  # natural probes keep their 64×64 images: the model's output is made to agree
    assert lr is not None and lr.shape == (10, 3, 64, 64)
    raw = [*methods, Method("raw", trained, "raw")]  # the network alone
    grid = dict(score(protocol, raw, recognizers, grid_faces=3, progress=False).samples["d1"].columns)
    agree = {label: float((resize(grid[label], (64, 64)) - lr[:3]).abs().mean()) for label in ("tiny", "raw")}
    assert agree["tiny"] < agree["raw"] / 3, agree
    results = score(protocol, methods, recognizers, concat_bicubic=True).ranks
    for ranks in results.values():
        assert_valid_cmc(cmc_from_ranks(ranks, 10), gallery_size=10)
    table = rank1_table(results, "sface", methods, ["d1", "d2"])
    assert table[BICUBIC]["d1"] <= table[BICUBIC]["d2"]  # closer camera, bigger faces, easier

    protocol2 = build_protocol(config(data=str(root), protocol="scface", gallery_group="d2"))
    assert protocol2.gallery_lr and [c.name for c in protocol2.columns] == ["d1"]
    results2 = score(protocol2, methods, recognizers, concat_bicubic=True).ranks
    for ranks in results2.values():
        assert_valid_cmc(cmc_from_ranks(ranks, 10), gallery_size=10)

    lfw = build_protocol(config(data=str(att_faces), protocol="lfw", identities="s1,s2,s3"))
    assert [c.name for c in lfw.columns] == ["7x6", "14x12", "16x14", "18x16"]
    assert len(lfw.gallery) == 3 and len(lfw.columns[0].labels) == 27  # 9 probes per identity

    # An `ipsr preprocess` output (aligned 128² PNGs in Parquet, committed with _SUCCESS) is read as such.
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    aligned = tmp_path / "aligned"
    (aligned / "data").mkdir(parents=True)
    rows = {"image": [], "identity": [], "source": [], "split": []}
    for person, split in (("s1", "train"), ("s2", "train"), ("s3", "train"), ("s4", "test"), ("s5", "test")):
        for k in (10, 2, 1):  # stored out of order: the adapter sorts by source in natural order
            buf = io.BytesIO()
            Image.open(att_faces / person / f"{k}.pgm").convert("RGB").resize((128, 128)).save(buf, "PNG")
            rows["image"].append(buf.getvalue())
            rows["identity"].append(person)
            rows["source"].append(f"{person}/{k}.pgm")
            rows["split"].append(split)
    pq.write_table(pa.table(rows), aligned / "data" / "part-00000.parquet")
    (aligned / "_SUCCESS").write_text("")
    default = build_protocol(config(data=str(aligned), protocol="ar", sizes="16x12"))
    assert default.identities == ["s4", "s5"]  # by default only the held-out identities: a model never saw them
    assert "'test' split (held-out identities; --split all for every split)" in default.note
    every = build_protocol(config(data=str(aligned), protocol="ar", sizes="16x12", split="all"))
    assert every.identities == ["s1", "s2", "s3", "s4", "s5"] and "split" not in every.note
    unseen = build_protocol(config(data=str(aligned), protocol="ar", sizes="16x12", split="test"))
    assert unseen.identities == ["s4", "s5"]  # --split: only the held-out identities
    with pytest.raises(UserError, match="'val' split is empty"):
        build_protocol(config(data=str(aligned), protocol="ar", split="val"))
    ar = build_protocol(config(data=str(aligned), protocol="ar", sizes="16x12", split="train"))
    assert ar.identities == ["s1", "s2", "s3"] and len(ar.columns[0].labels) == 3
    first = Image.open(att_faces / "s2" / "1.pgm").convert("RGB").resize((128, 128))
    from ipsr_model.images import to_tensor

    assert torch.allclose(ar.gallery[1], to_tensor(first)[0], atol=1e-6)  # gallery = s2's image 1, not 10


def test_protocols_read_s3(att_faces, s3, tmp_path):
    """`--data s3://…`: an `ipsr preprocess` output and plain identity folders, read through the S3 API (moto)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.evaluate import build_protocol

    s3.create_bucket(Bucket="eval")
    rows = {"image": [], "identity": [], "source": [], "split": []}
    for person, split in (("s1", "train"), ("s2", "test"), ("s3", "test")):
        for k in (1, 2):
            buf = io.BytesIO()
            Image.open(att_faces / person / f"{k}.pgm").convert("RGB").resize((128, 128)).save(buf, "PNG")
            rows["image"].append(buf.getvalue()), rows["identity"].append(person)
            rows["source"].append(f"{person}/{k}.pgm"), rows["split"].append(split)
            s3.put_object(
                Bucket="eval", Key=f"folders/{person}/{k}.pgm", Body=(att_faces / person / f"{k}.pgm").read_bytes()
            )
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    s3.put_object(Bucket="eval", Key="aligned/data/part-00000.parquet", Body=buf.getvalue())
    s3.put_object(Bucket="eval", Key="aligned/_SUCCESS", Body=b"")

    aligned = build_protocol(config(data="s3://eval/aligned", protocol="ar", sizes="16x12"))
    assert aligned.identities == ["s2", "s3"] and aligned.gallery.shape == (2, 3, 128, 128)
    folders = build_protocol(config(data="s3://eval/folders", protocol="ar", sizes="16x12"))
    assert folders.identities == ["s1", "s2", "s3"] and len(folders.columns[0].labels) == 3
    with pytest.raises(UserError, match="no such prefix"):
        build_protocol(config(data="s3://eval/nothing", protocol="ar"))
    with pytest.raises(UserError, match="scface reads a local folder"):
        build_protocol(config(data="s3://eval/folders", protocol="scface"))


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors(home_with_weights, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([IPSR, "evaluate", *args], capture_output=True, text=True, timeout=300)

    for args, fragment in (
        (("--data", str(tmp_path / "nope")), "no such directory"),
        (("--data", str(tmp_path), "--protocol", "scface", "--sizes", "16x12"), "--sizes does not apply"),
        (("--data", str(tmp_path), "--model", str(tmp_path / "missing.pt")), "missing.pt"),
        (("--data", str(tmp_path), "--sizes", "16by12"), "HxW"),
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, result.stderr)

    with pytest.raises(UserError, match="no registered model version"):
        from ipsr_platform.models import load_generator

        load_generator("models:/ipsr-unet@champion")


def test_config_precedence(tmp_path, monkeypatch):
    """YAML < IPSR_EVALUATE_* env < flags, lists from comma strings, per-protocol defaults, clear errors."""
    from ipsr_platform.config import EvaluateConfig, build_config

    yaml_file = tmp_path / "evaluate.yaml"
    yaml_file.write_text("data: /faces\nprotocol: lfw\nmodels: [models:/ipsr-unet@champion]\nmax_rank: 20\n")
    monkeypatch.setenv("IPSR_EVALUATE_MAX_RANK", "10")
    monkeypatch.setenv("IPSR_EVALUATE_RECOGNIZERS", "sface")
    cfg = build_config(EvaluateConfig, env_prefix="IPSR_EVALUATE_", yaml_file=yaml_file, models=("a.pt", "b.pt"))
    assert (cfg.protocol, cfg.max_rank, cfg.recognizers, cfg.models) == ("lfw", 10, ("sface",), ("a.pt", "b.pt"))
    assert cfg.probe_sizes == ("7x6", "14x12", "16x14", "18x16") and not cfg.concat
    assert EvaluateConfig(data="x", protocol="scface").concat
    with pytest.raises(UserError, match="promote"):
        build_config(EvaluateConfig, env_prefix="IPSR_EVALUATE_", data="x", promote=True, recognizers="facenet",
                     promote_recognizer="sface")  # fmt: skip
