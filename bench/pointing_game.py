"""Are the explanations of `agriclip explain` on the lesions? The pointing game on the embedded leaf images.

The embedded generator knows where it drew each lesion (`training.embedded.downstream_image` redraws a downstream
image from its seed, with the mask of its spots, pustules, dead patches or holes; the redrawn image is checked to
equal the PNG on disk, pixel for pixel). For the test images of `--tasks` (by default leaf-spot and leaf-condition)
of the conditions with localised lesions (`training.embedded.LESION_CONDITIONS`), each map type of the embedding
(`modeling_agriclip.explain.map_types`) is computed for the image's true label (`--target predicted`: the predicted
one), and the mask is mapped into the processed crop by the model's image processor. Per map type it reports the
pointing-game score, the share of images whose map maximum falls inside the drawn lesion (ties among maxima share
the hit), for the drawn map (bilinearly upsampled) and for its grid cell (the map's grid upsampled by nearest
neighbour, so that the maximum is the whole cell: a coarse grid's bilinear maximum lies in the crop's corner region
beyond the outermost cell centres), against the random-map baseline, the same for a uniformly random maximum (the lesion's share of the crop),
averaged over the same images, and a centre baseline (a map peaked at the crop's centre). Per task and condition,
then overall, and the share of maps that are all zeros (Grad-CAM whose ReLU cut everything: their maximal set is the
whole crop, so they score the random baseline).

    python -m bench.pointing_game --model /tmp/demo/agriclip [--data /tmp/demo/data] [--embedding clip]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from agriclip.images import open_image
from agriclip.templates import get_templates
from modeling_agriclip.explain import embedding_of, explain, pointing_hit, processed_mask, random_hit, upsample
from modeling_agriclip.zero_shot import ZeroShotClassifier
from training.embedded import LESION_CONDITIONS, downstream_image


def centre_map(height: int, width: int) -> np.ndarray:
    """A map peaked at the centre of the crop (its four central pixels for even sides)."""
    rows, cols = np.mgrid[:height, :width]
    return -((rows - (height - 1) / 2) ** 2 + (cols - (width - 1) / 2) ** 2)


def task_images(data: Path, task: dict, seed: int, image_size: int, limit: int | None):
    """(path, class folder, image, lesion mask) of the lesion images of a suite task, redrawn and checked."""
    root = data / task["path"]
    for folder in task["class_names"]:
        if folder not in LESION_CONDITIONS or not (root / folder).is_dir():
            continue
        for path in sorted((root / folder).glob("*.png"))[:limit]:
            drawn, mask = downstream_image(task["name"], folder, int(path.stem), seed, image_size)
            image = open_image(path)
            if not np.array_equal(np.asarray(image), drawn):
                raise SystemExit(f"{path} is not the image the generator draws for seed {seed}: was it rebuilt?")
            yield path, folder, image, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="AgriCLIP folder (the demo's: <output_dir>/agriclip).")
    parser.add_argument("--data", type=Path, default=None, help="Embedded data folder (default: <model>/../data).")
    parser.add_argument("--embedding", default=None, help="Image embedding to explain (default: the checkpoint's).")
    parser.add_argument("--tasks", nargs="+", default=["leaf-spot", "leaf-condition"], help="Suite tasks to score.")
    parser.add_argument("--target", choices=("true", "predicted"), default="true", help="Label explained.")
    parser.add_argument("--limit", type=int, default=None, help="At most this many images per class.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers to this JSON file.")
    args = parser.parse_args()
    data = args.data or Path(args.model).parent / "data"
    manifest = json.loads((data / "embedded.json").read_text())
    suite = {task["name"]: task for task in yaml.safe_load((data / "suite.yaml").read_text())["datasets"]}
    classifier = ZeroShotClassifier.from_pretrained(args.model, embedding=args.embedding)
    processor = classifier.processor.image_processor
    torch.manual_seed(0)

    # (task, condition) -> lists of per-image scores: map type -> hits, "random", "centre", "correct"
    scores = defaultdict(lambda: defaultdict(list))
    for name in args.tasks:
        task = suite[name]
        folders = list(task["class_names"])
        names = [task["class_names"][folder] for folder in folders]
        templates = get_templates(task["templates"])
        rows = list(task_images(data, task, manifest["seed"], manifest["image_size"], args.limit))
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            pixel_values = classifier.pixel_values([image for _, _, image, _ in batch])
            truth = [folders.index(folder) for _, folder, _, _ in batch]
            explanation = explain(
                classifier, pixel_values, names, templates, None if args.target == "predicted" else truth
            )
            for index, (_, folder, _, mask) in enumerate(batch):
                crop_mask = processed_mask(mask, processor)
                cell = scores[(name, folder)]
                for map_type, maps in explanation.maps.items():
                    cell[map_type].append(pointing_hit(maps[index].numpy(), crop_mask))
                    cells = upsample(explanation.grids[map_type][index], crop_mask.shape, mode="nearest")
                    cell[f"{map_type} (cell)"].append(pointing_hit(cells.numpy(), crop_mask))
                    cell[f"constant:{map_type}"].append(float(maps[index].max() <= 0))
                cell["random"].append(random_hit(crop_mask))
                cell["centre"].append(pointing_hit(centre_map(*crop_mask.shape), crop_mask))
                cell["correct"].append(float(int(explanation.logits[index].argmax()) == truth[index]))

    keys = list(next(iter(scores.values())))
    map_types = [key for key in keys if key not in ("random", "centre", "correct") and not key.startswith("constant:")]
    embedding = embedding_of(classifier)
    print(f"model {args.model}, embedding {embedding}, label explained: {args.target}; seed {manifest['seed']}")
    header = f"{'task':15s} {'condition':15s} {'images':>6s} {'top-1':>6s}"
    header += "".join(f" {m:>26s}" for m in map_types) + f" {'random map':>11s} {'centre':>7s}"
    print(header)
    totals, report = defaultdict(list), {"model": args.model, "embedding": embedding, "target": args.target}
    report["rows"] = []
    for (task, folder), cell in scores.items():
        line = f"{task:15s} {folder:15s} {len(cell['random']):6d} {np.mean(cell['correct']):6.3f}"
        line += "".join(f" {np.mean(cell[m]):26.3f}" for m in map_types)
        line += f" {np.mean(cell['random']):11.3f} {np.mean(cell['centre']):7.3f}"
        print(line)
        report["rows"].append({"task": task, "condition": folder, **{k: float(np.mean(v)) for k, v in cell.items()}})
        report["rows"][-1]["images"] = len(cell["random"])
        for key, values in cell.items():
            totals[(task, key)] += values
            totals[("all", key)] += values
    for task in [*args.tasks, "all"]:
        if not totals[(task, "random")]:
            continue
        line = f"{task:15s} {'(all)':15s} {len(totals[(task, 'random')]):6d} {np.mean(totals[(task, 'correct')]):6.3f}"
        line += "".join(f" {np.mean(totals[(task, m)]):26.3f}" for m in map_types)
        line += f" {np.mean(totals[(task, 'random')]):11.3f} {np.mean(totals[(task, 'centre')]):7.3f}"
        print(line)
        summary = {key: float(np.mean(values)) for (name, key), values in totals.items() if name == task}
        report["rows"].append({"task": task, "condition": "(all)", "images": len(totals[(task, "random")]), **summary})
    for key in keys:
        if key.startswith("constant:"):
            share = np.mean(totals[("all", key)])
            print(f"{key.removeprefix('constant:')}: {share:.3f} of the maps are all zeros (no location; ties share)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
