"""The end-to-end AgriCLIP run: stages 1, 2 and 3 from one config file into one Hub-ready folder.

    python -m training.run_all                              # the demo: training/configs/demo.yaml
    python -m training.run_all --config smoke               # checks an install end to end in seconds
    python -m training.run_all --config my_run.yaml         # your data and settings

Each stage writes `<output_dir>/stageN/final`; a stage whose output exists is skipped, and an interrupted
stage resumes from its newest checkpoint, so running the same command again continues where it stopped.
The result, `<output_dir>/agriclip` (model, processor, custom-code files, evaluation results, model card), is
evaluated zero-shot with each image embedding side by side, and classifies one photo through the transformers
pipeline. A `control` section in the config adds the honest baseline to that table: a CLIP tower trained by stage 1
alone, from the same start, for the budget of stages 1 and 2 (`<output_dir>/control/final`, see `control_options`).
`agriclip publish <output_dir>/agriclip --repo-id org/name` puts it on the Hub.
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
from training.options import load_config_file, options_from


# Packaged run configs, by name: the README demo, and a smoke run that checks an install end to end in seconds.
CONFIGS = {name: Path(__file__).parent / "configs" / f"{name}.yaml" for name in ("demo", "smoke")}
# Each stage by its config section: the options class the section is read into, and the stage's `run`.
STAGES = {
    "stage1": (stage1_contrastive.ContrastiveOptions, stage1_contrastive.run),
    "stage2": (stage2_dino.DinoOptions, stage2_dino.run),
    "stage3": (stage3_align.AlignmentOptions, stage3_align.run),
}
# The equal-compute CLIP control: its folder beside the stages' and its name in the evaluation results.
CONTROL = "control"
CONTROL_MODEL = "clip-control"
# The options that set how long a stage trains: --max-steps replaces --epochs when given.
BUDGET_KEYS = ("epochs", "max_steps")
# How to continue a stopped end-to-end run: the stages' messages say this instead of their own `--resume` advice.
RESUME_HINT = "run the same command again to continue (finished stages are skipped, an interrupted one resumes)"


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
        data = {
            "train_data": str(root / "pretrain"),
            "suite": str(root / "suite.yaml"),
            "name": "ALive-mini (embedded)",
            "knn_data": str(root / "downstream" / "cattle-breed"),
            **data,
        }
        # The card says the training images were drawn procedurally, unless the config trains on data of its own.
        data.setdefault("synthetic", data["train_data"] == str(root / "pretrain"))
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


def training_source(data: dict) -> dict:
    """The training (and validation) data options that stages 1 and 2, and the control, all train on."""
    return {"train_data": data["train_data"], **({"val_data": data["val_data"]} if data.get("val_data") else {})}


def train_into(name: str, stage: tuple, values: dict, folder: Path, what: str | None = None) -> Path:
    """Runs `stage` (an entry of `STAGES`) with its options read from `values` (the config's section `name`, and
    what run_all adds) into `folder`, timed as `what` (default: `name`), unless `folder/final` exists already;
    returns `folder/final`."""
    options_class, run = stage
    options = options_from(options_class, {**values, "output_dir": str(folder)}, f"run config section {name}")
    final = folder / "final"
    if final.is_dir():
        print(f"{name}: done already ({final}), skipped")
    else:
        with timed(what or name):
            run(options, resume_hint=RESUME_HINT)
    return final


def run_stages(config: dict, data: dict, output_dir: Path) -> Path:
    model = config.get("model", "tiny")
    for name, stage in STAGES.items():
        values = {**training_source(data), **(config.get(name) or {}), "model": model}
        if name == "stage2" and data.get("knn_data"):
            values.setdefault("knn_data", data["knn_data"])
        if name != "stage3":
            values["resume"] = "latest"  # continues an interrupted run; starts fresh when there is no checkpoint
        model = str(train_into(name, stage, values, output_dir / name))
    return Path(model)


def control_options(config: dict) -> dict | None:
    """The stage-1 options of the equal-compute CLIP control, or None when the run config has no `control` section.

    The control answers "what if the DINO budget had been spent on CLIP?": stage 1 with the `stage1` section's
    options for the budget of stage 1 plus stage 2, their `epochs` summed, or their `max_steps` when both sections
    set that. The `control` section's options override these; an `epochs` or `max_steps` of its own sets the budget
    (`control: {epochs: 30}`), and no sum is needed then.

    Raises:
        ValueError: a sum is needed but the stage1 and stage2 sections do not set the same one of epochs and
            max_steps (a stage's default epochs would be a budget nobody chose).
    """
    if "control" not in config:
        return None
    control = config["control"] or {}
    stage1, stage2 = config.get("stage1") or {}, config.get("stage2") or {}
    options = {key: value for key, value in stage1.items() if key not in BUDGET_KEYS}
    if not any(control.get(key) is not None for key in BUDGET_KEYS):
        sets = {name: _budget_key(section) for name, section in (("stage1", stage1), ("stage2", stage2))}
        if None in sets.values() or sets["stage1"] != sets["stage2"]:
            found = ", ".join(f"{name}.{key}" if key else f"{name} sets neither" for name, key in sets.items())
            raise ValueError(
                "the control trains for the budget of stage 1 plus stage 2, which needs stage1.epochs and "
                f"stage2.epochs, or stage1.max_steps and stage2.max_steps ({found}); or give the control section "
                "its own epochs or max_steps"
            )
        key = sets["stage1"]
        options[key] = stage1[key] + stage2[key]
    return {**options, **control}


def _budget_key(section: dict) -> str | None:
    """The option a stage section sets its length with: `max_steps`, which replaces epochs, else `epochs`."""
    return "max_steps" if section.get("max_steps") else "epochs" if section.get("epochs") is not None else None


def run_control(options: dict, config: dict, data: dict, output_dir: Path) -> Path:
    """Trains the control with `options` (`control_options`) into `<output_dir>/control`, from the model the run
    starts from (the config's `model`, as stage 1); returns its final folder."""
    values = {**training_source(data), **options, "model": config.get("model", "tiny"), "resume": "latest"}
    return train_into(
        CONTROL, STAGES["stage1"], values, output_dir / CONTROL, "control (stage 1 for the stage-1 + stage-2 budget)"
    )


def read_stage_logs(output_dir: Path) -> dict:
    """`read_training_info` of the stages' folders alone: the control's log is no part of how the checkpoint was
    made, and a second `stage1_contrastive` run under `output_dir` would make the whole folder ambiguous."""
    from model_card.card import describe_initialisation, read_training_info

    logs = [read_training_info(output_dir / name) for name in STAGES if (output_dir / name / "logs").is_dir()]
    stages = {run: flags for info in logs for run, flags in info["stages"].items()}
    final_metrics = {run: metrics for info in logs for run, metrics in info["final_metrics"].items()}
    initialisation = describe_initialisation(stages)
    return {
        "stages": stages,
        "final_metrics": final_metrics,
        **({"initialisation": initialisation} if initialisation else {}),
    }


def describe_control(output_dir: Path, stages: dict) -> str:
    """What the control row of the card is, with its budget and the stages', as their logs record them (a control
    section with a budget of its own may differ from the sum)."""
    from model_card.card import read_training_info

    control = read_training_info(output_dir / CONTROL)["stages"]["stage1_contrastive"]
    return (
        f"the equal-compute CLIP control: stage 1 alone, from the same start, for {_length(control)}, against "
        f"this checkpoint's stage 1 of {_length(stages['stage1_contrastive'])} and stage 2 of "
        f"{_length(stages['stage2_dino'])}"
    )


def _length(flags: dict) -> str:
    """How long a run trained, from its logged flags: its max_steps, which replace epochs, else its epochs."""
    count, unit = (flags["max_steps"], "optimizer step") if flags.get("max_steps") else (flags["epochs"], "epoch")
    return f"{count} {unit}{'' if count == 1 else 's'}"


def describe_progress(output_dir: Path) -> str:
    """What a stop of the end-to-end run outside a stage leaves: the stages finished, and how to continue."""
    finished = [name for name in (*STAGES, CONTROL) if (output_dir / name / "final").is_dir()]
    done = (
        f"the stages finished so far ({', '.join(finished)}) are in {output_dir}"
        if finished
        else "no stage finished yet"
    )
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
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default="demo",
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
    from model_card.card import describe_caption_data, write_model_card
    from modeling_agriclip import AgriCLIPConfig

    control_plan = control_options(config)  # a control section without a budget fails before any training
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "run_config.yaml", yaml.safe_dump(config))

    data = prepare_data(config, output_dir)
    trained = run_stages(config, data, output_dir)
    control = None if control_plan is None else run_control(control_plan, config, data, output_dir)
    checkpoint = output_dir / "agriclip"
    staging = output_dir / ".staging-agriclip"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trained, staging)
    # The checkpoint's own row: named explicitly, since the control is an AgriCLIP folder too and, with a `clip`
    # image embedding, would match it (`select_eval_model`).
    eval_model = f"agriclip ({AgriCLIPConfig.from_pretrained(trained).image_embedding})"

    results = None
    if data.get("suite"):
        from evaluation.report import render_markdown_table
        from evaluation.runner import run_suite

        evaluation = config.get("evaluation") or {}
        embeddings = ",".join(evaluation.get("embeddings", ["aligned", "clip", "fused"]))
        models = {"agriclip": f"{trained}:{embeddings}"}
        if control is not None:
            models[CONTROL_MODEL] = f"{control}:clip"
        with timed("evaluation"):
            results = run_suite(
                data["suite"], models, output_dir / "evaluation", batch_size=evaluation.get("batch_size", 32)
            )
        print("\nzero-shot top-1 on the downstream tasks:\n" + render_markdown_table(results))
        write_json_atomically(staging / "eval_results.json", results)
    # read_stage_logs gives the start (a preset: random weights) from the stage logs; the card says it and whether
    # the images were synthetic.
    training_info = {
        **read_stage_logs(output_dir),
        "data": {
            **describe_caption_data(data["train_data"], name=data.get("name")),
            "synthetic": bool(data.get("synthetic")),
        },
    }
    if results is not None and control is not None:
        training_info["baselines"] = {f"{CONTROL_MODEL} (clip)": describe_control(output_dir, training_info["stages"])}
    # Named after the run (or its repo), never after the staging folder the card is written into.
    write_model_card(
        staging,
        eval_results=results,
        training_info=training_info,
        repo_id=config.get("repo_id"),
        eval_model=eval_model,
        model_name=None if config.get("repo_id") else output_dir.resolve().name,
    )
    replace_folder(staging, checkpoint)

    if data.get("suite"):
        classify_demo_photo(checkpoint, Path(data["suite"]))
    control_logs = f", the control's: {output_dir / CONTROL / 'logs'}" if control is not None else ""
    print(
        f"\nHub-ready checkpoint: {checkpoint}\nevaluation report: {output_dir / 'evaluation'}\n"
        f"stage logs: {output_dir}/stage*/logs{control_logs}"
    )
    return checkpoint


if __name__ == "__main__":
    run_command(main, __spec__.name)
