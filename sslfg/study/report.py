"""The study report: one folder with report.md and its figures, rebuilt from the finished arms.

    python -m sslfg.study.report runs/study_sample

Numbers are mean ± sample std over the seeds that finished (n in the table); each table names its
protocol, and the commands section gives the command line of every arm. Comparisons are verdicts with
95 % confidence (sslfg.verdicts): better, worse, or not distinguishable at this number of seeds.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sslfg.cli import command_parser, run_cli  # noqa: E402
from sslfg.config import ConfigError, load_config  # noqa: E402
from sslfg.files import write_text  # noqa: E402
from sslfg.schema import StudyConfig  # noqa: E402
from sslfg.study.layout import (  # noqa: E402
    KNN_KEY,
    STUDY_FILE,
    SUPERVISED,
    arm_id,
    best_pretrain_arm,
    done_dir,
    done_path,
    eval_dir,
    finetune_dir,
    pretrain_dir,
    read_json,
    read_metrics_log,
    split_spec,
)
from sslfg.verdicts import Interval, correct_path, paired_bootstrap, paired_t, read_correct  # noqa: E402

KNN, MAP, LINEAR = KNN_KEY, "retrieval.mAP", "linear.top1"
ONLINE_KEEP = "online_loc.keep_precision"
LOCALISATION = {"loc.keep_precision": "keep precision", "loc.keep_chance": "chance", "loc.keep_lift": "lift",
                "loc.gls_iou": "GLS IoU", "loc.gls_coverage": "GLS coverage"}
FLOOR_NOTES = {"random": "random init, same architecture", "pixels": "raw pixels (normalised), no network",
               SUPERVISED: "supervised reference: same architecture trained from scratch with labels"}
METRICS = {"knn": KNN, "linear": LINEAR, "finetune": "test.top1"}  # what a verdict compares, per evaluation
PHRASES = {"better": "beats {}", "worse": "loses to {}", "not distinguishable": "not distinguishable from {}"}
VERDICT_RULE = ("95 % interval of the paired difference (arm − other, points of %): Student t over the seeds "
                "(n ≥ 2), or with one seed a paired bootstrap over the test images. **better** / **worse**: the "
                "interval excludes 0; otherwise **not distinguishable** at this number of seeds, with the seeds the "
                "observed margin would need (the smallest n with t(0.975, n − 1) · s / √n < |mean| at the observed "
                "spread s).")


def stats(values: Sequence[float | None], scale: float = 100.0) -> str:
    """'72.13 ± 0.41' over the present values (in %), the value alone for one, '–' for none."""
    v = [x * scale for x in values if x is not None]
    if not v:
        return "–"
    return f"{v[0]:.2f}" if len(v) == 1 else f"{mean(v):.2f} ± {stdev(v):.2f}"


def _get(record: dict | None, key: str) -> float | None:
    return None if record is None else record.get(key)


def _verdict_cells(interval: Interval | None) -> str:
    """'Δ [low, high] | verdict in words' for a table, or dashes when there is nothing to compare."""
    return "– | –" if interval is None else f"{interval.cell()} | {interval.words()}"


def _settings(name: str, spec: Any, section: str) -> str:
    """An arm's spec in a table cell: its recipe's file name and its overrides (not its other own keys)."""
    own, settings = split_spec(name, spec, section)
    recipe = [Path(own["config"]).name + (":" if settings else "")] if "config" in own else []
    return " ".join([*recipe, *(f"`{k}={json.dumps(v)}`" for k, v in settings.items())]) or "the recipe as is"


def data_note(data: dict[str, Any]) -> str:
    """The study's `data` keys, which every arm and evaluation ran with, after the dataset recipe's name."""
    return f" with {', '.join(f'`data.{k}={json.dumps(v)}`' for k, v in data.items())}" if data else ""


class Report:
    """Reads a study folder; `write()` produces report/report.md and the PNGs beside it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not (self.root / STUDY_FILE).is_file():
            raise ConfigError(f"{self.root}: no {STUDY_FILE}; is it a study folder (python -m sslfg.study)?")
        self.cfg = load_config(self.root / STUDY_FILE, [], StudyConfig)
        self.out = self.root / "report"
        self.seeds = list(dict.fromkeys(self.cfg.seeds))  # each once, also from a study.yaml that repeated one
        self.arms = list(self.cfg.pretrain.arms)

    def evals(self, arm: str, name: str) -> list[dict | None]:
        return [read_json(eval_dir(self.root, s, arm) / f"{name}.json") for s in self.seeds]

    def summaries(self, arm: str) -> list[dict | None]:
        return [read_json(pretrain_dir(self.root, s, arm) / "summary.json") for s in self.seeds]

    def finetunes(self, arm: str) -> list[dict | None]:
        return [read_json(finetune_dir(self.root, s, arm) / "metrics.json") for s in self.seeds]

    def wall_minutes(self, arm: str, kinds: Sequence[str]) -> list[float | None]:
        """Per seed: the study's wall time for this arm's runs of `kinds` (with start-up), None if unfinished."""
        per_seed = []
        for seed in self.seeds:
            done = [read_json(done_path(self.root, arm_id(seed, kind, arm))) for kind in kinds]
            present = [d for d in done if d]
            per_seed.append(sum(d["seconds"] for d in present) / 60 if present else None)
        return per_seed

    def floors(self) -> list[str]:
        """The floors this study has results for: random init, raw pixels, the supervised reference."""
        return [f for f in FLOOR_NOTES if any(self.evals(f, "knn"))]

    def runs(self, arm: str, name: str) -> list[tuple[dict | None, Path]]:
        """Per seed: the result of evaluation `name` (knn, linear, finetune) and the folder of its per-image record."""
        if name != "finetune":
            return [(read_json(eval_dir(self.root, s, arm) / f"{name}.json"), eval_dir(self.root, s, arm))
                    for s in self.seeds]
        folders = [pretrain_dir(self.root, s, arm) if arm == SUPERVISED else finetune_dir(self.root, s, arm)
                   for s in self.seeds]
        return [(read_json(f / "metrics.json"), f) for f in folders]

    def interval(self, arm: str, other: str, name: str) -> Interval | None:
        """arm − other on evaluation `name`: a t interval over the seeds both finished, a paired bootstrap over
        the test images with one such seed (when both recorded them), else None."""
        key = METRICS[name]
        pairs = [(a, b) for a, b in zip(self.runs(arm, name), self.runs(other, name), strict=True)
                 if a[0] and b[0] and key in a[0] and key in b[0]]
        if len(pairs) >= 2:
            return paired_t([a[key] - b[key] for (a, _), (b, _) in pairs])
        if not pairs:
            return None
        hits = [read_correct(correct_path(folder, "test" if name == "finetune" else name), key)
                for _, folder in pairs[0]]
        return None if any(h is None for h in hits) or len(hits[0]) != len(hits[1]) else paired_bootstrap(*hits)

    def against_floors(self, arm: str) -> str:
        """In words, per protocol: does the arm beat each floor (verdicts at 95 %)?"""
        parts = []
        for name, label in (("knn", "kNN"), ("linear", "linear")):
            by_verdict: dict[str, list[str]] = {}
            for floor in self.floors():
                if floor != arm and (i := self.interval(arm, floor, name)) is not None:
                    by_verdict.setdefault(i.verdict, []).append(floor)
            said = [PHRASES[v].format(", ".join(floors)) for v, floors in by_verdict.items()]
            parts += [f"{label}: {'; '.join(said)}"] if said else []
        return " · ".join(parts) or "–"

    # ---- tables ------------------------------------------------------------------------------

    def frozen_table(self) -> list[str]:
        lines = ["| arm | what | n | kNN k20 top-1 | retrieval mAP | linear top-1 | against the floors (95 %) | "
                 "steps × batch | train min | images/s | wall min |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm in [*self.floors(), *self.arms]:
            knn, lin = self.evals(arm, "knn"), self.evals(arm, "linear")
            n = sum(r is not None for r in knn)
            what = FLOOR_NOTES.get(arm) or _settings(arm, self.cfg.pretrain.arms[arm], "pretrain")
            runs = [s for s in self.summaries(arm) if s] if arm in self.arms else []
            steps = f"{runs[0]['step']} × {runs[0]['global_batch']}" if runs else "–"
            minutes = stats([_get(r, "seconds") for r in runs], scale=1 / 60) if runs else "–"
            speed = stats([_get(r, "images_per_second") for r in runs], scale=1) if runs else "–"
            floors = self.against_floors(arm) if arm in (SUPERVISED, *self.arms) else "–"
            kinds = ("pretrain", "knn", "linear", "localise", *(["finetune"] if arm == SUPERVISED else []))
            lines.append(f"| {arm} | {what} | {n} | {stats([_get(r, KNN) for r in knn])} | "
                         f"{stats([_get(r, MAP) for r in knn])} | {stats([_get(r, LINEAR) for r in lin])} | "
                         f"{floors} | {steps} | {minutes} | {speed} | "
                         f"{stats(self.wall_minutes(arm, kinds), scale=1)} |")
        return lines

    def online_keep(self, arm: str) -> list[float | None]:
        """Per seed: the attention encoder's keep precision (the teacher's, or the encoder's own for a method without
        one) at the last step it was logged in pretraining."""
        values = []
        for seed in self.seeds:
            path = pretrain_dir(self.root, seed, arm) / "metrics.jsonl"
            records = read_metrics_log(path)
            values.append(next((r[ONLINE_KEEP] for r in reversed(records) if ONLINE_KEEP in r), None))
        return values

    def localisation_table(self) -> list[str]:
        """eval.localise of each pretraining arm and the random floor, and the last online keep precision."""
        arms = [a for a in ("random", *self.arms) if any(self.evals(a, "localise"))]
        if not arms:
            return []
        lines = ["| arm | n | keep ratio | " + " | ".join(LOCALISATION.values()) + " | keep precision in pretraining "
                 "(teacher or own encoder, last log) |", "|---|---|---|" + "---|" * (len(LOCALISATION) + 1)]
        for arm in arms:
            records = self.evals(arm, "localise")
            ratio = next((r["protocol.keep_ratio"] for r in records if r), "–")
            cells = [stats([_get(r, k) for r in records], scale=1 if k.endswith("lift") else 100.0)
                     for k in LOCALISATION]
            online = stats(self.online_keep(arm)) if arm in self.arms else "–"
            lines.append(f"| {arm} | {sum(r is not None for r in records)} | {ratio} | {' | '.join(cells)} | "
                         f"{online} |")
        return lines

    def difference_table(self) -> list[str]:
        reference = self.arms[0]
        lines = [f"{VERDICT_RULE} Each arm against the floors, the reference arm **{reference}**, and for an arm with "
                 "`vs:` also that arm.", "",
                 "| arm | vs | Δ kNN k20 [95 %] | kNN verdict | Δ linear [95 %] | linear verdict |",
                 "|---|---|---|---|---|---|"]
        for arm in self.arms:
            vs = split_spec(arm, self.cfg.pretrain.arms[arm], "pretrain")[0].get("vs")  # the arm it is a variant of
            for other in dict.fromkeys([*self.floors(), *([reference] if arm != reference else []),
                                        *([vs] if vs else [])]):
                cells = [_verdict_cells(self.interval(arm, other, name)) for name in ("knn", "linear")]
                lines.append(f"| {arm} | {other} | {' | '.join(cells)} |")
        return lines

    def finetune_table(self) -> list[str]:
        lines = ["| arm | init | recipe | n | test top-1 | mean per-class | trainable / total params | steps | "
                 "train min | train images/s | inference images/s (batch 64) | wall min |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, spec in self.cfg.finetune.arms.items():
            runs = self.finetunes(arm)
            done = [r for r in runs if r]
            if not done:
                continue
            first = done[0]
            init = Path(first["init"]).parent.name if first.get("init") else "scratch"  # the pretraining arm
            recipe = _settings(arm, spec, "finetune")
            lines.append(
                f"| {arm} | {init} | {recipe} | {len(done)} | {stats([_get(r, 'test.top1') for r in runs])} |"
                f" {stats([_get(r, 'test.mean_per_class') for r in runs])} | {first['params.trainable']:,} / "
                f"{first['params.total']:,} | {first['step']} | "
                f"{stats([_get(r, 'train.seconds') for r in runs], scale=1 / 60)} | "
                f"{stats([_get(r, 'train.images_per_second') for r in runs], scale=1)} | "
                f"{stats([_get(r, 'images_per_second.batch64') for r in runs], scale=1)} | "
                f"{stats(self.wall_minutes(arm, ('finetune',)), scale=1)} |")
        return lines

    def finetune_localisation(self) -> list[str]:
        """GLS box IoU and object coverage of the fine-tuned GLSim arms, when the test split has boxes."""
        rows = [(arm, self.finetunes(arm)) for arm in self.cfg.finetune.arms]
        rows = [(arm, runs) for arm, runs in rows if any(r and "test.gls_iou" in r for r in runs)]
        if not rows:
            return []
        lines = ["| arm | n | GLS IoU | GLS coverage |", "|---|---|---|---|"]
        for arm, runs in rows:
            lines.append(f"| {arm} | {sum(bool(r) for r in runs)} | {stats([_get(r, 'test.gls_iou') for r in runs])} | "
                         f"{stats([_get(r, 'test.gls_coverage') for r in runs])} |")
        return ["GLSim's box on the test images against the object box (IoU, and the fraction of the object "
                "inside the crop), in %:", "", *lines, ""]

    def finetune_differences(self) -> list[str]:
        """Each fine-tuning arm against the first (the plain ViT in the bundled studies), paired by seed."""
        arms = list(self.cfg.finetune.arms)
        lines = ["| arm | vs | Δ test top-1 [95 %] | verdict |", "|---|---|---|---|"]
        for arm in arms[1:]:
            lines.append(f"| {arm} | {arms[0]} | {_verdict_cells(self.interval(arm, arms[0], 'finetune'))} |")
        return lines

    def supervised_section(self) -> list[str]:
        """The supervised reference's own test top-1 and its budget against the pretraining arms'."""
        runs = [r for r, _ in self.runs(SUPERVISED, "finetune")]
        done = [r for r in runs if r]
        if not done:
            return []
        first, pretrained = done[0], next((s for s in self.summaries(self.arms[0]) if s), None)
        budget = (f"{first['step']} steps × {first['global_batch']} images" +
                  (f"; each pretraining arm: {pretrained['step']} steps × {pretrained['global_batch']}"
                   if pretrained else ""))
        return ["## Supervised reference", "",
                f"The first pretraining arm's architecture (`{first['backbone']}`), plain ViT head, trained from "
                f"random init with labels by eval.finetune for the pretraining arms' {first['epochs']} epochs "
                f"({budget}). Its test top-1 says whether this architecture learns the task at this budget at all; "
                f"its frozen backbone is the `{SUPERVISED}` row of the frozen-feature table.", "",
                "| n | test top-1 | mean per-class | steps × batch | train min |", "|---|---|---|---|---|",
                f"| {len(done)} | {stats([_get(r, 'test.top1') for r in runs])} | "
                f"{stats([_get(r, 'test.mean_per_class') for r in runs])} | {first['step']} × "
                f"{first['global_batch']} | {stats([_get(r, 'train.seconds') for r in runs], scale=1 / 60)} |",
                ""]

    def selections(self) -> list[str]:
        """Which split chose what, and the probes whose lr is at the edge of its grid."""
        knn = next((r for arm in self.arms for r in self.evals(arm, "knn") if r and "protocol.val_query_split" in r),
                   None)
        lin = next((r for arm in self.arms for r in self.evals(arm, "linear") if r), None)
        lines = []
        if knn:
            lines.append("- **fine-tuning init**: mean kNN k20 top-1 over the seeds on "
                         f"`{knn['protocol.val_query_split']}` (bank `{knn['protocol.val_bank_split']}`)")
        if lin and "protocol.selection_train_split" in lin:
            lines.append(f"- **linear-probe lr**: best top-1 on `{lin['protocol.selection_split']}` of a head trained "
                         f"on `{lin['protocol.selection_train_split']}`, then retrained on "
                         f"`{lin['protocol.train_split']}`")
        test = (knn or lin or {}).get("protocol.query_split") or (lin or {}).get("protocol.test_split")
        if test:
            lines.append(f"- **test split** `{test}`: read only for the reported numbers")
        for arm in (*self.floors(), *self.arms):
            for seed, record in zip(self.seeds, self.evals(arm, "linear"), strict=True):
                if record and record.get("protocol.lr_warning"):
                    lines.append(f"- warning, {arm} seed {seed}: {record['protocol.lr_warning']}")
        return lines

    def protocols(self) -> list[str]:
        lines = []
        for arm in self.arms:
            for name in ("knn", "linear", "localise"):
                record = next((r for r in self.evals(arm, name) if r), None)
                if record and not any(line.startswith(f"- **{name}**") for line in lines):
                    keys = ", ".join(f"{k.removeprefix('protocol.')}={v}" for k, v in record.items()
                                     if k.startswith("protocol.") and k != "protocol.name")
                    lines.append(f"- **{name}** ({record['feature']} features, {record['image_size']} px): {keys}")
        return lines

    def commands(self) -> list[str]:
        seed = self.seeds[0]
        order = ("pretrain", "knn", "linear", "localise", "finetune")  # the order the study runs them in
        found = sorted(done_dir(self.root).glob(f"seed{seed}.*.json"),
                       key=lambda p: (order.index(p.stem.split(".")[1]), p.stem))
        lines = [f"Seed {seed}; the other seeds differ only in `seed=` and the `seed<N>` folder.", "", "```"]
        lines += [f"# {p.stem}\n{read_json(p).get('command', '(not recorded)')}" for p in found]
        return [*lines, "```"]

    # ---- figures -----------------------------------------------------------------------------

    def curves(self) -> str | None:
        """Global and local loss and online kNN of every pretraining arm (first seed), the online evaluations with
        their floors as dashed lines: the raw-pixel kNN of the same images and the keep precision's chance."""
        panels = [("loss_global", "global loss"), ("loss_local", "local loss"), ("online_knn.k20.top1", "online kNN"),
                  (ONLINE_KEEP, "keep precision (attention encoder)")]
        floors = {"online_knn.k20.top1": ("online_knn.pixels.k20.top1", "raw pixels"),
                  ONLINE_KEEP: ("online_loc.keep_chance", "chance")}
        series = {}
        for arm in self.arms:
            path = pretrain_dir(self.root, self.seeds[0], arm) / "metrics.jsonl"
            if path.is_file():
                series[arm] = read_metrics_log(path)
        panels = [p for p in panels if any(key in r for records in series.values() for r in records
                                            for key in [p[0]])]
        if not panels:
            return None
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            for i, (arm, records) in enumerate(series.items()):
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:  # one colour per arm in every panel, also where an arm has no such curve
                    ax.plot(*zip(*points, strict=True), label=arm, color=f"C{i}",
                            marker="o" if len(points) < 15 else None)
            floor_key, floor_name = floors.get(key, ("", ""))
            # the same images in every arm: one line, from the first record that has it
            level = next((r[floor_key] for records in series.values() for r in records if floor_key in r), None)
            if level is not None:
                ax.axhline(level, color="grey", linestyle="--", label=floor_name)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=110)
        plt.close(fig)
        return "curves.png"

    def copy_figure(self, source: Path, name: str) -> str | None:
        if not source.is_file():
            return None
        shutil.copyfile(source, self.out / name)
        return name

    def figures(self, best: str | None) -> list[str]:
        seed = self.seeds[0]
        lines = []
        if curves := self.curves():
            lines += ["### Training curves", "", f"![curves]({curves})", ""]
        for arm in self.arms:
            if fig := self.copy_figure(pretrain_dir(self.root, seed, arm) / "figures" / "masks_end.png",
                                       f"masks_{arm}.png"):
                lines += [f"### Kept patches at the end of pretraining: {arm}", "", f"![masks]({fig})", ""]
        for arm in ("random", *self.arms):
            if fig := self.copy_figure(eval_dir(self.root, seed, arm) / "figures" / "localise.png",
                                       f"localise_{arm}.png"):
                lines += [f"### Object box, kept patches and GLS box: {arm}", "", f"![localise]({fig})", ""]
        for arm in self.cfg.finetune.arms:
            if fig := self.copy_figure(finetune_dir(self.root, seed, arm) / "figures" / "gls_crops.png",
                                       f"crops_{arm}.png"):
                lines += [f"### GLSim crops: {arm}", "", f"![crops]({fig})", ""]
        if best is not None:
            figures = eval_dir(self.root, seed, best) / "figures"
            if fig := self.copy_figure(figures / "knn_neighbours.png", "knn_neighbours.png"):
                lines += [f"### Nearest training images of test queries: {best}", "", f"![neighbours]({fig})", ""]
            if fig := self.copy_figure(figures / "tsne_test.png", "embedding_map.png"):
                lines += [f"### t-SNE of the test features: {best}", "", f"![embedding]({fig})", ""]
        return lines

    def write(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        machine = read_json(self.root / "machine.json") or {}
        best = best_pretrain_arm(self.root, self.seeds, self.arms)
        budget = read_json(self.root / "budget.json")
        text = [
            f"# Study: {Path(self.cfg.output_dir).name}, {len(self.seeds)} seed(s)", "",
            f"Dataset recipe `{self.cfg.dataset}`{data_note(self.cfg.data)}; seeds {self.seeds}; machine: "
            f"{machine.get('platform', '?')}, "
            f"{machine.get('cpu_count', '?')} CPU cores, GPU {machine.get('gpu', '?')}, "
            f"{machine.get('processes', 1)} process(es), torch {machine.get('torch', '?')}; run on "
            f"{machine.get('date', '?')}.", "",
            f"Budget: every pretraining arm {self.cfg.pretrain.epochs or 'the recipe'} epochs"
            + (f" ({budget['minutes']} minutes per seed, timed: {budget['epochs']} epochs)" if budget else "")
            + (f" (lr warm-up {warmup:g} epochs)" if (warmup := self.cfg.pretrain.warmup_epochs) >= 0 else "")
            + f" of `{self.cfg.pretrain.config}`; every fine-tuning arm "
              f"{self.cfg.finetune.epochs or 'its recipe'} epochs. Same batch and steps within each group."
            + (" The supervised reference trains as many epochs as a pretraining arm, from scratch (its steps "
               "under Supervised reference)." if self.cfg.supervised.enabled else ""), "",
            "## Frozen features", "",
            "kNN: k 20, cosine, exp(sim/T) votes (DINO), bank = train split, queries = test split; retrieval: "
            "leave-one-out mAP over the test split; linear: the fast probe (lr chosen on validation data, "
            "retrained, reported on test). Values in %; train min and images/s are the "
            "pretraining loop's; wall min is the study's time for the arm's pretraining and evaluations, start-up "
            "included. The floors every arm must clear: random init, raw pixels, and the supervised reference "
            "(below); the column against them gives the 95 % verdicts of the Differences.", "",
            *self.frozen_table(), "",
            "### Differences", "", *self.difference_table(), "",
            *self.supervised_section(),
        ]
        if localisation := self.localisation_table():
            text += ["## Localisation", "", "Where each backbone looks on the test images (eval.localise, values in "
                     "%, lift a ratio): keep precision = the fraction of the patches LoDisc would keep (its "
                     "location score from the backbone's own CLS attention, at the keep ratio the arm trained with, "
                     "the floor at the first arm's) whose centre lies in the object box; chance = the fraction of "
                     "all patches inside it; lift = precision / chance (1: no better than chance); GLS IoU and "
                     "coverage = the box around the top-k patches most similar to CLS against the object box. The "
                     "last column is the keep precision logged during pretraining, from the encoder that picks "
                     "LoDisc's patches: the teacher (momentum) encoder, or for a method without a teacher (SimCLR, "
                     "Barlow Twins, VICReg) the encoder itself (every method, local branch on or off, at the same "
                     "keep ratio).", "", *localisation, ""]
        if self.cfg.finetune.arms:
            text += ["## Fine-tuning", "", f"From the best pretraining arm by mean kNN k20 on the validation split: "
                     f"**{best}** (the test split takes no part in the choice; see Protocols).", "",
                     *self.finetune_table(), "", *self.finetune_localisation(), *self.finetune_differences(), ""]
        text += ["## Protocols", "", *self.protocols(), "", "### Which split chose what", "", *self.selections(), "",
                 "## Figures", "", *self.figures(best),
                 "## Commands", "", *self.commands(), ""]
        write_text(self.out / "report.md", "\n".join(text))
        return self.out


def build_report(root: Path) -> Path:
    """Writes <root>/report/ from whatever arms have finished; returns the folder."""
    return Report(root).write()


def main(argv: Sequence[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("study_dir", metavar="STUDY_DIR", help="the study's output_dir")
    print(f"report: {build_report(Path(parser.parse_args(argv).study_dir)) / 'report.md'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
