"""`ipsr evaluate`: the paper's identification protocols for HR, bicubic and super-resolved probes.

For one protocol (ipsr_platform/protocols.py: AR, SCface, LFW or any identity-folder set) every method row —
``hr`` (the upper bound, synthetic protocols only), ``bicubic`` and each generator given — is scored with every
recognizer: the FaceNet the generator was trained through, and SFace, an independent network, so that a
generator that merely fools its own loss network shows up as a FaceNet-only gain. Per (recognizer, method,
column) the rank of each probe's identity: rank-1 with its 95 % Wilson interval, an exact McNemar test of every
generator against bicubic on the same probes, and the CMC up to ``max_rank`` (or the gallery size).

Outputs (written to a temporary folder, then renamed into place): ``table.md`` (rows = methods, columns =
sizes or distance groups, one table per recognizer, like the paper's), ``results.csv`` (long form with rank-1/5/10),
``cmc.png`` (a panel per recognizer and column), ``samples_<column>.png`` (HR | bicubic | each model) and
``results.json``. Everything is logged to an MLflow run in ``--experiment``; registered versions that were
evaluated get the run id and their mean rank-1 as tags. ``--promote`` moves ``champion`` to ``candidate`` when
the candidate's mean rank-1 over the columns with ``--promote-recognizer`` beats bicubic's and the champion's,
and writes why into the version's description and tags.

No Ray here: evaluation sets are small (ORL 40 probes, AR 100 subjects, SCface 130, LFW ~7.5k probes), the work is
a few thousand forward passes in one process, and streaming the probes in batches keeps memory flat; tasks would
only add start-up cost and copy the models to every worker.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import torch

from ipsr_model.errors import UserError
from ipsr_model.metrics import cmc_from_ranks, mcnemar_exact, wilson_interval
from ipsr_model.paths import evaluations_dir
from ipsr_platform import console, tracking
from ipsr_platform.commands import job_command, run_main
from ipsr_platform.config import EvaluateConfig
from ipsr_platform.protocols import Protocol, scface_protocol, synthetic_protocol
from ipsr_platform.scoring import BICUBIC, HR, Embedder, Method, rank1_table, score
from ipsr_platform.storage import is_s3

log = logging.getLogger(__name__)

RECOGNIZER_TITLES = {"facenet": "FaceNet (training loss network)", "sface": "SFace (independent)"}
_GROUPED = re.compile(r"(?P<group>[A-Za-z0-9_.-]+)=(?P<spec>.+)")


def split_group(spec: str) -> tuple[str | None, str]:
    """'eq2=/runs/a.pt' -> ('eq2', '/runs/a.pt'); a spec without GROUP= (or an existing file named so) -> (None,
    spec)."""
    match = _GROUPED.fullmatch(spec.strip())
    if match is None or Path(spec).expanduser().exists():
        return None, spec
    return match["group"], match["spec"]


@dataclasses.dataclass
class Evaluation:
    """What ``ipsr evaluate`` found: the tables (method → column → …, per recognizer), where it wrote them, and the
    promotion decision. ``table.md``, ``results.json`` and the terminal all render this one object."""

    protocol: str
    note: str
    columns: list[str]
    rank1: dict[str, dict[str, dict[str, float]]]  # recognizer → method → column (and "mean") → rank-1
    statistics: dict[str, dict[str, dict[str, dict]]]  # recognizer → method → column → hits, interval, McNemar
    seed_groups: dict[str, dict[str, dict[str, dict]]]  # recognizer → group → column → mean ± std over seeds
    fidelity: dict[str, dict[str, dict[str, float]]]  # method → column → psnr, ssim (degraded HR probes only)
    methods: dict[str, str]  # row label → the spec it was loaded from
    output: str = ""
    mlflow_run_id: str = ""
    promotion: Promotion | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ building


def build_protocol(config: EvaluateConfig) -> Protocol:
    if config.protocol == "scface" and is_s3(config.data):
        raise UserError("--protocol scface reads a local folder; copy it from S3 first (ar, lfw and folder read s3://)")
    root = config.data if is_s3(config.data) else Path(config.data).expanduser()
    if config.protocol == "scface":
        return scface_protocol(
            root,
            identities=config.identities,
            gallery_pattern=config.gallery_pattern,
            probe_map=config.probe_map,
            gallery_group=config.gallery_group,
        )
    return synthetic_protocol(
        config.protocol,
        root,
        config.probe_sizes,
        identities=config.identities,
        gallery_pattern=config.gallery_pattern,
        probe_pattern=config.probe_pattern,
        split=config.split,
    )


def build_recognizers(config: EvaluateConfig) -> dict[str, Embedder]:
    from ipsr_model.identity import IdentityNet
    from ipsr_model.sface import SFaceNet

    return {
        name: IdentityNet(config.identity_weights) if name == "facenet" else SFaceNet() for name in config.recognizers
    }


def model_specs(config: EvaluateConfig, uri: str) -> list[str]:
    """The models to evaluate; --promote adds ``@candidate`` and (when there is one) ``@champion``."""
    specs = list(config.models)
    if config.promote:
        specs.append(f"models:/{config.register_as}@{tracking.CANDIDATE}")
        if tracking.version_or_none(config.register_as, tracking.CHAMPION, uri) is not None:
            specs.append(f"models:/{config.register_as}@{tracking.CHAMPION}")
    return specs


def load_models(specs: list[str], uri: str | None = None) -> list[tuple[str | None, Any]]:
    """(group, LoadedGenerator) per spec; the members of a group are labelled GROUP.1, GROUP.2, … in order."""
    from ipsr_platform.models import load_generator

    loaded, members = [], {}
    for spec in specs:
        group, model_spec = split_group(spec)
        model = load_generator(model_spec, uri)
        if group is not None:
            members[group] = members.get(group, 0) + 1
            model = dataclasses.replace(model, label=f"{group}.{members[group]}")
        loaded.append((group, model))
    return loaded


def load_methods(protocol: Protocol, loaded: list[tuple[str | None, Any]], back_projection: int) -> list[Method]:
    """Rows: ``hr`` (synthetic protocols), ``bicubic``, then each loaded generator once, followed by
    ``back_projection`` steps."""
    methods = [Method(HR), Method(BICUBIC)] if protocol.synthetic else [Method(BICUBIC)]
    for group, model in loaded:
        if any(m.label == model.label for m in methods):  # e.g. @candidate and @champion on one version
            continue
        methods.append(Method(model.label, model.module, model.spec, model, group, back_projection))
    return methods


# ---------------------------------------------------------------------------------------------- evaluation


def statistics(results: dict, recognizer: str, methods: list[Method], columns: list[str]) -> dict[str, dict[str, dict]]:
    """method → column → {hits, n, ci95 (Wilson), and for generators vs bicubic on the same probes: only_model,
    only_bicubic, p (exact McNemar)}. The mean over columns gets no interval: its columns share the probes."""
    stats: dict[str, dict[str, dict]] = {}
    for method in methods:
        row = stats[method.label] = {}
        for column in columns:
            hits = results[recognizer, method.label, column] == 0
            cell = {"hits": int(hits.sum()), "n": len(hits), "ci95": wilson_interval(int(hits.sum()), len(hits))}
            if method.restore is not None:
                only_model, only_bicubic, p = mcnemar_exact(hits, results[recognizer, BICUBIC, column] == 0)
                cell |= {"only_model": only_model, "only_bicubic": only_bicubic, "p_vs_bicubic": p}
            row[column] = cell
    return stats


def seed_table(stats: dict, methods: list[Method], columns: list[str]) -> dict[str, dict[str, dict]]:
    """group → column → mean ± std of rank-1 over the group's models (seeds), each seed's McNemar test against
    bicubic, and ``verdict``: better/worse when every seed differs from bicubic at p < 0.05 the same way."""
    groups: dict[str, list[str]] = {}
    for method in methods:
        if method.group is not None:
            groups.setdefault(method.group, []).append(method.label)
    table = {}
    for group, labels in groups.items():
        row = table[group] = {}
        for column in columns:
            cells = [stats[label][column] for label in labels]
            rates = [c["hits"] / c["n"] for c in cells]
            significant = [c["p_vs_bicubic"] < 0.05 for c in cells]
            direction = {c["only_model"] > c["only_bicubic"] for c in cells}
            verdict = (
                ("better" if direction == {True} else "worse" if direction == {False} else "")
                if all(significant)
                else ""
            )
            row[column] = {
                "mean": fmean(rates),
                "std": stdev(rates) if len(rates) > 1 else 0.0,
                "seeds": rates,
                "p_vs_bicubic": [c["p_vs_bicubic"] for c in cells],
                "verdict": verdict,
            }
    return table


def format_seed_cell(cell: dict) -> str:
    mark = {"better": "*", "worse": "†"}.get(cell["verdict"], "")
    return f"{cell['mean']:.3f} ±{cell['std']:.3f}{mark}"


def format_cell(rank1: float, cell: dict | None) -> str:
    """'0.744 ±0.09' (half-width of the 95 % interval); '*' better / '†' worse than bicubic at p < 0.05."""
    if cell is None:
        return f"{rank1:.3f}"
    low, high = cell["ci95"]
    text = f"{rank1:.3f} ±{(high - low) / 2:.2f}"
    if cell.get("p_vs_bicubic", 1.0) < 0.05:
        text += "*" if cell["only_model"] > cell["only_bicubic"] else "†"
    return text


SEEDS_NOTE = (
    "mean ± std of rank-1 over the group's models; * / † when every seed is better / worse than bicubic (p < 0.05)."
)
SIGNIFICANCE_NOTE = (
    "Cells: rank-1 ±half-width of its 95 % Wilson interval over the probes; * = better, † = worse "
    "than bicubic on the same probes (exact McNemar test, p < 0.05)."
)


# --------------------------------------------------------------------------------------------------- outputs


def report_tables(summary: Evaluation) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(recognizer, "rank-1", "seed groups" or "fidelity", header, rows) of every table that table.md and the
    terminal show."""
    columns, tables = summary.columns, []
    for rec_name, table in summary.rank1.items():
        cells = summary.statistics[rec_name]
        rows = [
            [label, *(format_cell(row[c], cells[label].get(c)) for c in [*columns, "mean"])]
            for label, row in table.items()
        ]
        tables.append((rec_name, "rank-1", ["method", *columns, "mean"], rows))
        if seeds := summary.seed_groups[rec_name]:
            rows = [
                [group, str(len(row[columns[0]]["seeds"])), *(format_seed_cell(row[c]) for c in columns)]
                for group, row in seeds.items()
            ]
            tables.append((rec_name, "seed groups", ["group", "seeds", *columns], rows))
    if fidelity := summary.fidelity:  # degraded HR probes: how close each restoration is to the original
        rows = [
            [label, *(f"{row[c]['psnr']:.2f} / {row[c]['ssim']:.3f}" for c in columns)]
            for label, row in fidelity.items()
        ]
        tables.append(("", "fidelity", ["method", *columns], rows))
    return tables


def table_title(rec_name: str, kind: str) -> str:
    if kind == "fidelity":
        return "PSNR dB / SSIM against HR (mean over probes)"
    return f"{kind} — {RECOGNIZER_TITLES[rec_name]}"


def _markdown(summary: Evaluation, config: EvaluateConfig, methods: list[Method]) -> str:
    lines = [f"# ipsr evaluate — {summary.protocol} on {config.data}", "", summary.note, "", SIGNIFICANCE_NOTE, ""]
    for rec_name, kind, header, rows in report_tables(summary):
        title = table_title(rec_name, kind)
        lines += [
            f"{title}: {SEEDS_NOTE}" if kind == "seed groups" else f"## {title}",
            "",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    models = [m for m in methods if m.restore is not None]
    if models:
        lines += ["Models: " + "; ".join(f"`{m.label}` = `{m.spec}`" for m in models), ""]
    if models and config.back_projection:
        lines += [f"Each model's output is back-projected toward its LR input ({config.back_projection} steps;"
                  " `--back-projection 0`: the network alone).", ""]  # fmt: skip
    if config.concat:
        lines += ["Model rows embed bicubic ⊕ SR (concatenated embeddings).", ""]
    return "\n".join(lines)


def _write_csv(path: Path, results: dict, summary: Evaluation) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["protocol", "recognizer", "method", "spec", "column", "rank1", "rank5", "rank10", "probes",
                         "rank1_ci95_low", "rank1_ci95_high", "only_model", "only_bicubic",
                         "p_vs_bicubic"])  # fmt: skip
        for (rec_name, label, column), ranks in results.items():
            at = [float((ranks < k).float().mean()) for k in (1, 5, 10)]
            cell = summary.statistics[rec_name][label][column]
            p = f"{cell['p_vs_bicubic']:.4g}" if "p_vs_bicubic" in cell else ""
            paired = [cell.get("only_model", ""), cell.get("only_bicubic", ""), p]
            writer.writerow(
                [
                    summary.protocol,
                    rec_name,
                    label,
                    summary.methods[label],
                    column,
                    *(f"{v:.4f}" for v in at),
                    len(ranks),
                    *(f"{v:.4f}" for v in cell["ci95"]),
                    *paired,
                ]
            )


def _plot_cmc(path: Path, summary: Evaluation, curves: dict, methods: list[Method]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns, recognizers = summary.columns, list(summary.rank1)
    fig, axes = plt.subplots(
        len(recognizers),
        len(columns),
        figsize=(3.2 * len(columns), 2.8 * len(recognizers)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for i, rec_name in enumerate(recognizers):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            for method in methods:
                curve = curves[rec_name, method.label, column].numpy()
                ax.plot(
                    range(1, len(curve) + 1), curve, label=method.label, linestyle="--" if method.label == HR else "-"
                )
            ax.set_title(f"{rec_name} · {column}", fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if i == len(recognizers) - 1:
                ax.set_xlabel("rank")
            if j == 0:
                ax.set_ylabel("identification rate")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"CMC — {summary.protocol}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_grid(path: Path, grid) -> None:
    """A labelled sample grid (``scoring.SampleGrid``): a header row of column titles, a face per row, its identity
    at the left."""
    from PIL import Image, ImageDraw, ImageFont

    from ipsr_model.images import to_pil

    side, pad, header = 128, 4, 20
    font = ImageFont.load_default(size=11)
    label_width = max(60, *(int(font.getlength(name)) + 2 * pad for name in grid.rows))
    canvas = Image.new(
        "RGB", (label_width + len(grid.columns) * (side + pad), header + len(grid.rows) * (side + pad)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for j, (title, images) in enumerate(grid.columns):
        x = label_width + j * (side + pad)
        draw.text((x + side / 2, header / 2), title[:22], fill="black", font=font, anchor="mm")
        for i, face in enumerate(to_pil(images)):
            canvas.paste(face, (x, header + i * (side + pad)))
    for i, name in enumerate(grid.rows):
        draw.text((pad, header + i * (side + pad) + side / 2), name, fill="black", font=font, anchor="lm")
    canvas.save(path)


def write_outputs(
    out: Path,
    protocol: Protocol,
    config: EvaluateConfig,
    methods: list[Method],
    results: dict,
    samples: dict,
    summary: Evaluation,
) -> None:
    max_rank = min(config.max_rank, len(protocol.gallery_labels.unique()))
    curves = {key: cmc_from_ranks(ranks, max_rank) for key, ranks in results.items()}
    (out / "table.md").write_text(_markdown(summary, config, methods))
    _write_csv(out / "results.csv", results, summary)
    _plot_cmc(out / "cmc.png", summary, curves, methods)
    for column, grid in samples.items():
        _save_grid(out / f"samples_{column}.png", grid)
    cmc = {"/".join(key): curve.tolist() for key, curve in curves.items()}
    payload = {
        "protocol": protocol.name,
        "note": protocol.note,
        "config": config.model_dump(mode="json"),
        "methods": summary.methods,
        "rank1": summary.rank1,
        "statistics": summary.statistics,
        "seed_groups": summary.seed_groups,
        "fidelity": summary.fidelity,
        "cmc": cmc,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))


def _default_output(protocol: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return evaluations_dir() / f"{protocol}-{stamp}"


# ------------------------------------------------------------------------------------------------- registry


def paired_evidence(results: dict, recognizer: str, label: str, columns: list[str]) -> dict:
    """``label`` against bicubic on every (probe, column) pair of the evaluation: pooled rank-1 with its 95 % Wilson
    interval for both, and the exact McNemar test — what says whether a difference of means is more than noise."""
    model = torch.cat([results[recognizer, label, c] == 0 for c in columns])
    bicubic = torch.cat([results[recognizer, BICUBIC, c] == 0 for c in columns])
    only_model, only_bicubic, p = mcnemar_exact(model, bicubic)
    probes = len(results[recognizer, BICUBIC, columns[0]])
    return {
        "pairs": len(model),
        "probes": probes,
        "columns": len(columns),
        "only_model": only_model,
        "only_bicubic": only_bicubic,
        "p": p,
        "model_rank1": float(model.float().mean()),
        "bicubic_rank1": float(bicubic.float().mean()),
        "model_ci95": wilson_interval(int(model.sum()), len(model)),
        "bicubic_ci95": wilson_interval(int(bicubic.sum()), len(bicubic)),
    }


def _evidence_text(e: dict) -> str:
    (ml, mh), (bl, bh) = e["model_ci95"], e["bicubic_ci95"]
    return (
        f"{e['probes']} probes × {e['columns']} columns: pooled rank-1 {e['model_rank1']:.3f} (95 % CI "
        f"{ml:.3f}–{mh:.3f}) vs bicubic {e['bicubic_rank1']:.3f} ({bl:.3f}–{bh:.3f}), exact McNemar p = {e['p']:.2g}"
    )


def promotion_decision(
    candidate: tuple[str, float],
    bicubic: float,
    champion: tuple[str, float] | None,
    metric: str,
    evidence: dict | None = None,
) -> tuple[bool, str]:
    """Whether the candidate ``(name, score)`` may become champion, and why: it must beat bicubic on the same
    evaluation (a model worse than its own input is never served as the best one) — significantly, when the
    per-probe ``evidence`` (``paired_evidence``) is given — and the current champion ``(name, score)``, if any;
    ties keep what is there."""
    (name, score) = candidate
    detail = f" ({_evidence_text(evidence)})" if evidence else ""
    if score <= bicubic:
        return False, f"{metric}: {name} {score:.4f} does not beat bicubic {bicubic:.4f}{detail}"
    if evidence and not (evidence["p"] < 0.05 and evidence["only_model"] > evidence["only_bicubic"]):
        return False, f"{metric}: {name} {score:.4f} is not significantly better than bicubic {bicubic:.4f}{detail}"
    if champion is None:
        return True, f"no champion yet; {metric}: {name} {score:.4f} beats bicubic {bicubic:.4f}{detail}"
    verdict = "beats" if score > champion[1] else "does not beat"
    return score > champion[1], (
        f"{metric}: {name} {score:.4f} {verdict} {champion[0]} {champion[1]:.4f} (bicubic {bicubic:.4f}){detail}"
    )


@dataclasses.dataclass
class Promotion:
    """``--promote``'s decision about the candidate version, as tagged on it and on the evaluation run."""

    promoted: bool
    why: str
    metric: str
    candidate: str  # version
    candidate_score: float
    bicubic_score: float
    evidence: dict  # paired_evidence: the candidate against bicubic, probe by probe
    champion: str | None = None
    champion_score: float | None = None


def promote(
    config: EvaluateConfig,
    protocol: Protocol,
    results: dict,
    tables: dict,
    methods: list[Method],
    versions: dict[str, str],
    run_id: str,
    uri: str,
) -> Promotion:
    """Move ``champion`` to ``candidate`` when ``promotion_decision`` allows it (``--promote-recognizer``'s mean
    rank-1). ``versions``: spec → registered version of every model loaded. Fails closed: a registry error, or a
    champion that moved while this evaluation ran, stops it."""
    name, rec_name = config.register_as, config.promote_recognizer
    label = {m.model.version: m.label for m in methods if m.model is not None and m.model.name == name}
    # The versions compared are the ones this evaluation loaded (model_specs), not whatever the aliases say now.
    cand_v = versions[f"models:/{name}@{tracking.CANDIDATE}"]
    champ_v = versions.get(f"models:/{name}@{tracking.CHAMPION}")
    metric = f"mean rank-1 over {protocol.name} {', '.join(c.name for c in protocol.columns)} with {rec_name}"
    table = tables[rec_name]
    score, bicubic = table[label[cand_v]]["mean"], table[BICUBIC]["mean"]
    evidence = paired_evidence(results, rec_name, label[cand_v], [c.name for c in protocol.columns])
    decision = Promotion(
        False, f"candidate v{cand_v} already is the champion", metric, cand_v, score, bicubic, evidence
    )
    if champ_v != cand_v:
        rival = (f"champion v{champ_v}", table[label[champ_v]]["mean"]) if champ_v else None
        decision.promoted, decision.why = promotion_decision(
            (f"candidate v{cand_v}", score), bicubic, rival, metric, evidence
        )
        decision.champion, decision.champion_score = (champ_v, rival[1]) if rival else (None, None)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if decision.promoted:
        now = tracking.version_or_none(name, tracking.CHAMPION, uri)
        if (str(now.version) if now is not None else None) != champ_v:
            raise UserError(
                f"{name}@{tracking.CHAMPION} moved to v{now.version if now else '-'} while this evaluation "
                f"compared against v{champ_v or '-'}; not promoting — evaluate again"
            )
        tracking.set_alias(name, tracking.CHAMPION, cand_v, uri)
        tracking.client(uri).update_model_version(name, cand_v, description=f"Promoted to champion {stamp} "
                                                  f"(evaluation run {run_id}): {decision.why}.")  # fmt: skip
    verdict = ("promoted: " if decision.promoted else "not promoted: ") + decision.why
    tracking.tag_version(name, cand_v, {tracking.TAG_PROMOTION: verdict, tracking.TAG_PROMOTION_RUN: run_id}, uri)
    return decision


# ------------------------------------------------------------------------------------------------------ job


def run(config: EvaluateConfig) -> Evaluation:
    """Evaluate, write the outputs, log to MLflow, optionally promote."""
    started = time.perf_counter()
    uri = tracking.tracking_uri()
    out = Path(config.output).expanduser() if config.output else _default_output(config.protocol)
    if out.exists():
        raise UserError(f"--output {out} already exists; pick a new folder")
    loaded = load_models(model_specs(config, uri), uri)  # a bad --model fails first
    protocol = build_protocol(config)
    methods = load_methods(protocol, loaded, config.back_projection)
    recognizers = build_recognizers(config)
    results, samples, quality = score(
        protocol,
        methods,
        recognizers,
        batch_size=config.batch_size,
        concat_bicubic=config.concat,
        grid_faces=config.grid_faces,
    )
    columns = [c.name for c in protocol.columns]
    stats = {r: statistics(results, r, methods, columns) for r in recognizers}
    evaluation = Evaluation(
        protocol.name, protocol.note, columns, {r: rank1_table(results, r, methods, columns) for r in recognizers},
        stats, {r: seed_table(stats[r], methods, columns) for r in recognizers}, _fidelity(quality),
        {m.label: m.spec for m in methods}, output=str(out))  # fmt: skip
    _write_atomically(
        out, lambda staging: write_outputs(staging, protocol, config, methods, results, samples, evaluation)
    )
    evaluation.mlflow_run_id, evaluation.promotion = _log_and_promote(
        config, protocol, methods, loaded, results, evaluation, uri
    )
    evaluation.seconds = time.perf_counter() - started
    return evaluation


def _fidelity(quality: dict) -> dict[str, dict[str, dict[str, float]]]:
    """method → column → mean PSNR and SSIM against HR."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (label, column), (psnr, ssim) in quality.items():
        out.setdefault(label, {})[column] = {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
    return out


def _write_atomically(out: Path, write) -> None:
    """``write(folder)`` into a staging folder beside ``out``, then rename: the folder appears whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _log_and_promote(
    config: EvaluateConfig,
    protocol: Protocol,
    methods: list[Method],
    loaded: list,
    results: dict,
    evaluation: Evaluation,
    uri: str,
) -> tuple[str, Promotion | None]:
    """An MLflow run with the rank-1 metrics and the output folder; the scored versions tagged; the promotion."""
    from mlflow.entities import Metric

    experiment_id = tracking.ensure_experiment(config.experiment, uri)
    models = {m.label: m.model for m in methods if m.model is not None}
    tags = {tracking.TAG_GIT_COMMIT: tracking.git_commit(), tracking.TAG_PROTOCOL: protocol.name} | {
        tracking.TAG_MODEL.format(label=label): (f"models:/{m.name}/{m.version}" if m.version else m.spec)
        for label, m in models.items()
    }  # fmt: skip
    run_name = f"evaluate-{protocol.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    params = config.model_dump(mode="json") | {"identities_evaluated": len(protocol.identities)}
    run_id = tracking.create_run(experiment_id, run_name, params, tags, uri)
    try:
        client, now = tracking.client(uri), int(time.time() * 1000)
        metrics = [Metric(tracking.METRIC_RANK1.format(recognizer=rec, method=label, column=column), value, now, 0)
                   for rec, table in evaluation.rank1.items() for label, row in table.items()
                   for column, value in row.items()]  # fmt: skip
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.log_artifacts(run_id, evaluation.output)
        for label, model in models.items():
            if model.version:  # link the version to this evaluation (DESIGN: versions carry an eval summary)
                evals = {tracking.TAG_EVAL_MEAN_RANK1.format(protocol=protocol.name, recognizer=r):
                         f"{evaluation.rank1[r][label]['mean']:.4f}" for r in evaluation.rank1}  # fmt: skip
                tracking.tag_version(
                    model.name,
                    model.version,
                    evals | {tracking.TAG_EVAL_RUN.format(protocol=protocol.name): run_id},
                    uri,
                )
        versions = {g.spec: g.version for _, g in loaded}
        decision = (
            promote(config, protocol, results, evaluation.rank1, methods, versions, run_id, uri)
            if config.promote
            else None
        )
        if decision:
            client.set_tag(run_id, tracking.TAG_PROMOTION_DECISION, json.dumps(dataclasses.asdict(decision)))
    except BaseException:
        tracking.set_run_status(run_id, "FAILED", uri)
        raise
    tracking.set_run_status(run_id, "FINISHED", uri)
    return run_id, decision


def print_summary(summary: Evaluation) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    screen = Console(file=console.out())
    screen.print(f"[bold]{summary.protocol}[/]: {summary.note}")
    for rec_name, kind, header, rows in report_tables(summary):
        right = [Column(c, justify="right") for c in header[1:]]
        view = Table(header[0], *right, title=table_title(rec_name, kind))
        for row in rows:
            view.add_row(*row)
        screen.print(view)
        if kind == "seed groups":
            screen.print(SEEDS_NOTE)
    screen.print(SIGNIFICANCE_NOTE)
    screen.print(f"outputs: {summary.output}  (MLflow run {summary.mlflow_run_id})")
    console.announce()
    if p := summary.promotion:
        screen.print(f"{'promoted' if p.promoted else 'not promoted'}: {p.why}")


def run_and_report(config: EvaluateConfig) -> Evaluation:
    """``ipsr evaluate``: evaluate, then print the tables."""
    summary = run(config)
    print_summary(summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.evaluate [flags]``: the same command as ``ipsr evaluate`` (generated from its config model)."""
    run_main(job_command("evaluate", run_and_report), argv)


if __name__ == "__main__":
    main()
