"""What each part of AgriCLIP is worth on the embedded suite, over seeds: the demo run, its equal-compute CLIP
control, and the ablations of stages 2 and 3, in one table.

Per seed, `training.run_all` runs the demo config (every stage seeded with it; the embedded data stays that of
seed 0, built once) with its equal-compute CLIP control. Then, from that run's stage outputs:

- stage 3 by each alignment objective (`image-mse`, the paper's; `text-mse`; `contrastive`), on the demo's stage 2;
- stage 2 by the published DINO recipe (`--recipe published`, no KoLeo), by the demo's without its KoLeo term, and no
  stage 2 (stage 3 on stage 1's output, whose backbone is the untrained one), each at the demo's budget and with the
  demo's stage 3;
- each evaluated with the aligned embedding, the fused one at the weight stage 3 chose on its validation pairs, and
  the fused one at the fixed 0.5 the package used before.

Every choice inside a variant (ridge, fusion weight) is made by stage 3 on the pretraining validation pairs; the
downstream images are only evaluated. Prints per seed and, over the seeds, mean +- sd of mean top-1 and of the
fine-grained mean, with stage 3's score on its validation pairs (what chose the fusion weight), its held-out R² onto
its objective's target (a contrastive head is fitted to directions, not values: its R² means little) and stage 2's
k-NN (trained, untrained control):

    python -m bench.ablate_stages --seeds 0 1 2 --output-dir runs/ablation
"""

import argparse
import json
import statistics
from pathlib import Path

from evaluation.runner import run_suite
from model_card.card import read_training_info
from training import run_all, stage2_dino, stage3_align
from training.options import load_config_file


# Stage 2 set against the demo's, at the demo's epochs and batch size: the variant's folder, whether it drops the
# demo's recipe settings (`RECIPE_KEYS`), and the options it trains with over the rest.
STAGE2_VARIANTS = {
    "stage 2 published recipe": ("stage2-published", True, {"recipe": "published"}),
    "stage 2 without KoLeo": ("stage2-no-koleo", False, {"koleo_weight": 0.0}),
}
RECIPE_KEYS = ("recipe", *stage2_dino.PUBLISHED, "koleo_weight")
# Stage 3's score on its validation pairs of each evaluated embedding (image-to-text recall@1, by its
# --validation-match): what chose the fusion weight, and what may choose between variants.
VALIDATION_SCORES = {
    "aligned": "val/aligned/image_to_text_R@1",
    "fused": "val/fused_chosen/image_to_text_R@1",
    "fused@0.5": "val/fused@0.5/image_to_text_R@1",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="demo", help="The run config ablated (default: the demo's).")
    parser.add_argument("--output-dir", default="runs/ablation")
    return parser.parse_args(argv)


def seeded_config(config: dict, seed: int, data: dict | None) -> dict:
    """`config` with every training section seeded with `seed` and, after the first seed, the first seed's data."""
    seeded = {**config, **({"data": data} if data else {})}
    for section in ("stage1", "stage2", "stage3", "control"):
        if section in config:
            seeded[section] = {**(config[section] or {}), "seed": seed}
    return seeded


def stage3(config: dict, model: Path, train_data: str, output_dir: Path, objective: str, cache: Path) -> Path:
    options = {
        **(config.get("stage3") or {}),
        "objective": objective,
        "model": str(model),
        "train_data": train_data,
        "feature_cache": str(cache),
    }
    return run_all.train_into(f"stage 3 ({output_dir.name})", run_all.STAGES["stage3"], options, output_dir)


def ablate_seed(config: dict, root: Path, seed: int, data: dict | None) -> tuple[dict, dict]:
    """Runs the demo and the variants of one seed; returns {variant: row} and the run's data section."""
    seed_config = seeded_config(config, seed, data)
    run_dir = root / f"seed{seed}"
    run_all.run(seed_config, run_dir)
    data = run_all.prepare_data(seed_config, run_dir)
    train_data = data["train_data"]
    demo_objective = (config.get("stage3") or {}).get("objective", "image-mse")
    variants = {}
    for objective in stage3_align.OBJECTIVES:
        variants[f"stage 3 {objective}"] = stage3(
            seed_config,
            run_dir / "stage2" / "final",
            train_data,
            run_dir / "ablation" / f"stage3-{objective}",
            objective,
            run_dir / "ablation" / "features-stage2",
        )
    stage2_dirs = {}
    for name, (folder, own_recipe, variant_options) in STAGE2_VARIANTS.items():
        stage2_dirs[name] = run_dir / "ablation" / folder
        options = {
            key: value
            for key, value in (seed_config.get("stage2") or {}).items()
            if not (own_recipe and key in RECIPE_KEYS)
        }
        options |= {
            **variant_options,
            "model": str(run_dir / "stage1" / "final"),
            "train_data": train_data,
            "knn_data": data.get("knn_data"),
        }
        run_all.train_into(f"stage 2 ({folder})", run_all.STAGES["stage2"], options, stage2_dirs[name])
        variants[name] = stage3(
            seed_config,
            stage2_dirs[name] / "final",
            train_data,
            run_dir / "ablation" / f"stage3-after-{folder}",
            demo_objective,
            run_dir / "ablation" / f"features-{folder}",
        )
    variants["no stage 2 (untrained backbone)"] = stage3(
        seed_config,
        run_dir / "stage1" / "final",
        train_data,
        run_dir / "ablation" / "stage3-no-stage2",
        demo_objective,
        run_dir / "ablation" / "features-stage1",
    )
    models = {
        "clip tower": f"{run_dir / 'stage1' / 'final'}:clip",
        "clip-control": f"{run_dir / 'control' / 'final'}:clip",
    }
    models |= {name: f"{path}:aligned,fused,fused@0.5" for name, path in variants.items()}
    results = run_suite(data["suite"], models, run_dir / "ablation" / "evaluation", batch_size=64)
    rows = {}
    for name, spec in models.items():
        for embedding in spec.rsplit(":", 1)[1].split(","):
            entry = f"{name} ({embedding})"
            rows[entry] = {
                "mean": results["mean"][entry]["top1"] * 100,
                "fine-grained": results["mean_fine_grained"][entry]["top1"] * 100,
            }
            if name in variants:
                stage3_metrics = read_training_info(variants[name].parent)["final_metrics"]["stage3_align"]
                rows[entry] |= {
                    "held-out R²": stage3_metrics["val/r2"],
                    "validation R@1": stage3_metrics[VALIDATION_SCORES[embedding]],
                }
                if embedding == "fused":
                    rows[entry]["fusion weight"] = stage3_metrics["fusion_weight"]
    reports = {
        name: json.loads((folder / "final" / "stage2_report.json").read_text())
        for name, folder in {"demo": run_dir / "stage2", **stage2_dirs}.items()
    }
    for entry, row in rows.items():
        variant = entry.rsplit(" (", 1)[0]
        if variant in reports or variant.startswith("stage 3"):
            report = reports.get(variant, reports["demo"])
            row |= {"k-NN trained": report["knn_top1_trained"], "k-NN untrained": report["knn_top1_untrained"]}
        elif variant.startswith("no stage 2"):
            row["k-NN untrained"] = reports["demo"]["knn_top1_start"]  # this variant's backbone: stage 2's start
    rows["chance"] = {
        "mean": results["chance"]["mean"]["top1"] * 100,
        "fine-grained": results["chance"]["mean_fine_grained"]["top1"] * 100,
    }
    return rows, data


def summarise(per_seed: list[dict]) -> str:
    columns = [
        "mean",
        "fine-grained",
        "validation R@1",
        "held-out R²",
        "fusion weight",
        "k-NN trained",
        "k-NN untrained",
    ]
    lines = ["| variant | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for entry in per_seed[0]:
        cells = []
        for column in columns:
            values = [rows[entry][column] for rows in per_seed if rows[entry].get(column) is not None]
            if not values:
                cells.append("")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 1 if column in ("mean", "fine-grained") else 3
            cells.append(f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {entry} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = load_config_file(run_all.CONFIGS.get(args.config, args.config))
    root = Path(args.output_dir)
    per_seed, data = [], None
    for seed in args.seeds:
        rows, data = ablate_seed(config, root, seed, data)
        per_seed.append(rows)
        print(f"\nseed {seed}:\n" + summarise([rows]))
    print(f"\nover seeds {args.seeds} (mean ± sd; top-1 %):\n" + summarise(per_seed))


if __name__ == "__main__":
    main()
