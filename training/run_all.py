"""The end-to-end AgriCLIP run: stages 1, 2 and 3 from one config file into one Hub-ready folder.

    python -m training.run_all                              # the demo: training/configs/demo.yaml
    python -m training.run_all --config smoke               # checks an install end to end in seconds
    python -m training.run_all --config my_run.yaml         # your data and settings

Each stage writes `<output_dir>/stageN/final`; a stage whose output exists is skipped, and an interrupted
stage resumes from its newest checkpoint, so running the same command again continues where it stopped.
The result, `<output_dir>/agriclip` (model, processor, custom-code files, evaluation results, model card), is
evaluated zero-shot with each image embedding side by side, and classifies one photo through the transformers
pipeline. `agriclip publish <output_dir>/agriclip --repo-id org/name` puts it on the Hub.
Under `accelerate launch` the training stages use every process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from agriclip.atomic import replace_folder, write_json_atomically, write_text_atomically
from agriclip.errors import SCRIPT_EXIT_CODES, run_command
from training import stage1_contrastive, stage2_dino, stage3_align
from training.options import load_config_file

# Packaged run configs, by name: the README demo, and a smoke run that checks an install end to end in seconds.
CONFIGS = {name: Path(__file__).parent / "configs" / f"{name}.yaml" for name in ("demo", "smoke")}
STAGES = (("stage1", stage1_contrastive), ("stage2", stage2_dino), ("stage3", stage3_align))
# How to continue a stopped end-to-end run: the stages' messages say this instead of their own `--resume` advice.
RESUME_HINT = "run the same command again to continue (finished stages are skipped, an interrupted one resumes)"


def as_flags(options: dict) -> list[str]:
    """`{"batch_size": 64, "freeze_text": True}` -> `["--batch-size", "64", "--freeze-text"]`."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


def prepare_data(config: dict, output_dir: Path) -> dict:
    """Training and validation sources and the evaluation suite: given, or the embedded dataset built once."""
    data = dict(config.get("data") or {})
    embedded = data.pop("embedded", None)
    if embedded is not None:
        from training.embedded import build_embedded_dataset

        root = output_dir / "data"
        if not (root / "suite.yaml").is_file():
            with timed("embedded dataset"):
                build_embedded_dataset(root, progress=True, **embedded)
        data = {"train_data": str(root / "pretrain"), "suite": str(root / "suite.yaml"), "name": "ALive-mini (embedded)",
                "knn_data": str(root / "downstream" / "cattle-breed"), **data}
    if "train_data" not in data:
        raise ValueError("the run config's `data` section needs `embedded` or `train_data`")
    return data


@contextmanager
def timed(what: str):
    """Prints how long `what` took: wall-clock seconds and CPU-seconds (this process's threads, and its finished
    worker processes), so that a slow run says where its time goes."""
    def cpu() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    wall, started = time.perf_counter(), cpu()
    yield
    print(f"{what}: {time.perf_counter() - wall:.1f} s, {cpu() - started:.1f} CPU-s")


def run_stages(config: dict, data: dict, output_dir: Path) -> Path:
    model = config.get("model", "tiny")
    source = {"train_data": data["train_data"], **({"val_data": data["val_data"]} if data.get("val_data") else {})}
    for name, script in STAGES:
        stage_dir = output_dir / name
        final = stage_dir / "final"
        if final.is_dir():
            print(f"{name}: done already ({final}), skipped")
        else:
            options = {**source, **(config.get(name) or {}), "model": model, "output_dir": str(stage_dir)}
            if name == "stage2" and data.get("knn_data"):
                options.setdefault("knn_data", data["knn_data"])
            if name != "stage3":
                options["resume"] = True  # continues an interrupted run; starts fresh when there is no checkpoint
            with timed(name):
                script.main(as_flags(options), resume_hint=RESUME_HINT)
        model = str(final)
    return Path(model)


def describe_progress(output_dir: Path) -> str:
    """What a stop of the end-to-end run outside a stage leaves: the stages finished, and how to continue."""
    finished = [name for name, _ in STAGES if (output_dir / name / "final").is_dir()]
    done = f"the stages finished so far ({', '.join(finished)}) are in {output_dir}" if finished else "no stage finished yet"
    return f"{done}; {RESUME_HINT}"


def classify_demo_photo(checkpoint: Path, suite_path: Path) -> None:
    """One photo of the first downstream task through `pipeline("zero-shot-image-classification")`."""
    from transformers import pipeline

    from evaluation.suite import load_suite_config

    task = load_suite_config(suite_path).datasets[0]
    classes = sorted(p.name for p in task.path.iterdir() if p.is_dir())
    labels = [task.class_names.get(c, c.replace("_", " ")) for c in classes]
    photo = sorted((task.path / classes[0]).iterdir())[0]
    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=False)
    results = classifier(str(photo), candidate_labels=labels, hypothesis_template=task.templates[0])
    print(f"\nclassified {photo} (true class: {labels[0]}) with {task.templates[0]!r}:")
    for row in results[:3]:
        print(f"  {row['score']:.3f}  {row['label']}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__, epilog=SCRIPT_EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="demo",
        help="Run config: a YAML or JSON file, or a packaged one by name: demo (the README demo, the default) or smoke "
             "(the whole pipeline on a few images in seconds, to check an install; its numbers mean nothing).",
    )
    parser.add_argument("--output-dir", default=None, help="Overrides the config's output_dir.")
    args = parser.parse_args(argv)
    try:
        config = load_config_file(CONFIGS.get(args.config, args.config))
    except (OSError, ValueError) as error:
        parser.error(str(error))
    output_dir = Path(args.output_dir or config.get("output_dir", "runs/agriclip"))
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.runtime import RunLock, exit_on_sigterm

    with RunLock(output_dir), exit_on_sigterm(lambda: describe_progress(output_dir)):
        return run(config, output_dir)


def run(config: dict, output_dir: Path) -> Path:
    from model_card.card import describe_caption_data, read_training_info, write_model_card

    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "run_config.yaml", yaml.safe_dump(config))

    data = prepare_data(config, output_dir)
    trained = run_stages(config, data, output_dir)
    checkpoint = output_dir / "agriclip"
    staging = output_dir / ".staging-agriclip"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trained, staging)

    results = None
    if data.get("suite"):
        from evaluation.report import render_markdown_table
        from evaluation.runner import run_suite

        evaluation = config.get("evaluation") or {}
        embeddings = ",".join(evaluation.get("embeddings", ["aligned", "clip", "fused"]))
        with timed("evaluation"):
            results = run_suite(data["suite"], {"agriclip": f"{trained}:{embeddings}"}, output_dir / "evaluation",
                                batch_size=evaluation.get("batch_size", 32))
        print("\nzero-shot top-1 on the downstream tasks:\n" + render_markdown_table(results))
        write_json_atomically(staging / "eval_results.json", results)
    training_info = {**read_training_info(output_dir), "data": describe_caption_data(data["train_data"], name=data.get("name"))}
    # Named after the run (or its repo), never after the staging folder the card is written into.
    write_model_card(staging, eval_results=results, training_info=training_info, repo_id=config.get("repo_id"),
                     model_name=None if config.get("repo_id") else output_dir.resolve().name)
    replace_folder(staging, checkpoint)

    if data.get("suite"):
        classify_demo_photo(checkpoint, Path(data["suite"]))
    print(f"\nHub-ready checkpoint: {checkpoint}\nevaluation report: {output_dir / 'evaluation'}\n"
          f"stage logs: {output_dir}/stage*/logs")
    return checkpoint


if __name__ == "__main__":
    run_command(main, __spec__.name)
