"""The ALive builder over three sources of different kinds, each output format read back by the training loader."""

import errno
import hashlib
import io
import json
import os
import re
import shutil

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from agriclip.errors import ExitCode
from agriclip.images import DECODE_REPORT, open_image
from agriclip.sources import load_image_text_dataset
from training import alive_builder
from training.alive import main
from training.alive_builder import BuildConfig, build_alive
from training.data import ImageTextCollator
from training.embedded import pretraining_sources, render_cattle, render_fish, render_leaf

from conftest import run_as_main


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three labelled sources with metadata files, and the bad and duplicate files planted in them.

    - leaves: class-per-folder image folder (PNG, one CMYK JPEG, one zero-byte and one truncated file), YAML metadata
    - fish: CSV of path and label (JPEG, one missing file, one BMP with the same pixels as a leaf PNG), JSON metadata
    - cattle: a `datasets` dataset on disk with a ClassLabel column under other names, YAML metadata
    """
    root = tmp_path_factory.mktemp("sources")
    metadata = {source.name: source.metadata.to_dict() for source in pretraining_sources()}
    for condition in ("healthy", "rust"):
        (root / "leaves" / condition).mkdir(parents=True)
        for index in range(4):
            image = Image.fromarray(render_leaf("tomato", condition, np.random.default_rng([1, index]), 48))
            image.save(root / "leaves" / condition / f"{index}.png")
    Image.fromarray(render_leaf("tomato", "rust", np.random.default_rng(9), 48)).convert("CMYK").save(
        root / "leaves" / "rust" / "cmyk.jpg", quality=95
    )
    (root / "leaves" / "rust" / "zero.png").write_bytes(b"")
    payload = (root / "leaves" / "rust" / "0.png").read_bytes()
    (root / "leaves" / "healthy" / "cut.png").write_bytes(payload[: len(payload) // 2])
    (root / "leaves.yaml").write_text(yaml.safe_dump(metadata["tomato-leaves"]))

    (root / "fish").mkdir()
    lines = ["filepath,label"]
    for species in ("clownfish", "goby"):
        for index in range(3):
            Image.fromarray(render_fish(species, np.random.default_rng([2, index]), 48)).save(
                root / "fish" / f"{species}{index}.jpg", quality=95
            )
            lines.append(f"fish/{species}{index}.jpg,{species}")
    lines.append("fish/missing.jpg,goby")
    Image.open(root / "leaves" / "healthy" / "0.png").save(root / "fish" / "copy.bmp")
    lines.append("fish/copy.bmp,goby")
    (root / "fish.csv").write_text("\n".join(lines) + "\n")
    (root / "fish.json").write_text(json.dumps(metadata["fish-species"]))

    images, labels = [], []
    for label, breed in enumerate(("angus", "holstein")):
        for index in range(3):
            buffer = io.BytesIO()
            Image.fromarray(render_cattle(breed, np.random.default_rng([3, index]), 48)).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(label)
    features = datasets.Features({"photo": datasets.Image(), "breed": datasets.ClassLabel(names=["angus", "holstein"])})
    datasets.Dataset.from_dict({"photo": images, "breed": labels}, features=features).save_to_disk(str(root / "cattle"))
    (root / "cattle.yaml").write_text(yaml.safe_dump(metadata["cattle-breeds"]))

    config = {
        "output_dir": "out",
        "seed": 0,
        "validation_fraction": 0.25,
        "shard_size": 4,
        "image_format": "png",
        "sources": [
            {"name": "leaves", "path": "leaves", "metadata": "leaves.yaml"},
            {"name": "fish", "path": "fish.csv", "metadata": "fish.json"},
            {"name": "cattle", "path": "cattle", "metadata": "cattle.yaml"},
        ],
    }
    (root / "build.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def built(sources):
    return build_alive(BuildConfig.from_file(sources / "build.yaml"), progress=False)


def rows_of(dataset) -> list[tuple]:
    return sorted(
        (
            hashlib.sha256(open_image(r["image"]).tobytes()).hexdigest(),
            r["caption"],
            tuple(r["captions"]),
            r["source"],
            r["label"],
        )
        for r in dataset
    )


def test_report_counts_skips_and_duplicates(built, sources):
    leaves, fish, cattle = (built["sources"][name] for name in ("leaves", "fish", "cattle"))
    assert (leaves["images"], leaves["written"], leaves["skipped"]) == (11, 9, 2)
    assert (fish["images"], fish["written"], fish["skipped"], fish["duplicates"]) == (8, 6, 1, 1)
    assert (cattle["written"], cattle["skipped"]) == (6, 0)
    skipped = built["decode"]["skipped"]
    assert skipped["empty file"] == [str(sources / "leaves" / "rust" / "zero.png")]
    assert skipped["truncated"] == [str(sources / "leaves" / "healthy" / "cut.png")]
    assert skipped["missing file"] == [str(sources / "fish" / "missing.jpg")]
    assert "zero.png" in built["decode_summary"] and "missing.jpg" in built["decode_summary"]
    assert built["duplicates"] == [
        {
            "dropped": str(sources / "fish" / "copy.bmp"),
            "source": "fish",
            "kept": f"leaves:{sources / 'leaves' / 'healthy' / '0.png'}",
        }
    ]
    assert built["splits"]["train"] > 0 and built["splits"]["validation"] > 0
    assert sum(built["splits"].values()) == 21
    assert json.loads((sources / "out" / "build_report.json").read_text())["splits"] == built["splits"]


def test_every_output_format_reads_back_with_equal_content(built, sources):
    out = sources / "out"
    for split in ("train", "validation"):
        folder = rows_of(load_image_text_dataset(out / "imagefolder", split=split))
        assert len(folder) == built["splits"][split]
        assert rows_of(load_image_text_dataset(out / "datasets", split=split)) == folder
        assert rows_of(load_image_text_dataset(out / "webdataset", split=split, streaming=True)) == folder
    # The image bytes themselves are the same in all three.
    first = load_image_text_dataset(out / "imagefolder")[0]
    saved = load_image_text_dataset(out / "datasets")[0]
    shard = next(iter(load_image_text_dataset(out / "webdataset", streaming=True)))
    assert open(first["image"]["path"], "rb").read() == saved["image"]["bytes"] == shard["image"]["bytes"]


def test_captions_mention_class_details_and_images_are_clean(built, sources):
    metadata = {source.name: source.metadata for source in pretraining_sources()}
    by_source = {"leaves": "tomato-leaves", "fish": "fish-species", "cattle": "cattle-breeds"}
    rows = list(load_image_text_dataset(sources / "out" / "imagefolder", split="train"))
    rows += list(load_image_text_dataset(sources / "out" / "imagefolder", split="validation"))
    assert {row["source"] for row in rows} == {"leaves", "fish", "cattle"}
    assert {row["label"] for row in rows} == {"healthy", "rust", "clownfish", "goby", "angus", "holstein"}
    for row in rows:
        cls = metadata[by_source[row["source"]]].class_metadata(row["label"])
        assert len(row["captions"]) == 3 and row["caption"] == row["captions"][0]
        for caption in row["captions"]:
            assert cls.name in caption and any(cue in caption for cue in cls.description), caption
        image = Image.open(row["image"]["path"])
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (48, 48))
    # The CMYK JPEG was decoded and re-encoded as RGB, not dropped.
    cmyk = open_image(sources / "leaves" / "rust" / "cmyk.jpg")
    digests = {hashlib.sha256(open_image(row["image"]).tobytes()).hexdigest() for row in rows}
    assert hashlib.sha256(cmyk.tobytes()).hexdigest() in digests


def test_training_collator_reads_the_build(built, sources, tiny_processor):
    dataset = load_image_text_dataset(sources / "out" / "webdataset", split="train", streaming=True)
    batch = ImageTextCollator(tiny_processor)(list(dataset.take(4)))
    assert batch["pixel_values"].shape[0] == 4 and batch["input_ids"].shape[0] == 4
    assert batch[DECODE_REPORT].decoded == 4 and batch[DECODE_REPORT].num_skipped == 0


def test_jpeg_output_copies_rgb_jpegs_unchanged(sources, tmp_path):
    config = BuildConfig.from_file(sources / "build.yaml")
    config.output_dir, config.image_format, config.formats = str(tmp_path / "jpeg"), "jpeg", ["imagefolder"]
    build_alive(config, progress=False)
    originals = {(sources / "fish" / f"{s}{i}.jpg").read_bytes() for s in ("clownfish", "goby") for i in range(3)}
    written = {p.read_bytes() for p in (tmp_path / "jpeg" / "imagefolder").rglob("*.jpg")}
    assert originals <= written and len(written) == 21
    assert not (tmp_path / "jpeg" / "datasets").exists() and not (tmp_path / "jpeg" / "webdataset").exists()


def test_empty_caption_is_a_build_error(sources, tmp_path):
    bad = yaml.safe_load((sources / "cattle.yaml").read_text())
    bad["templates"] = [" "]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    config = BuildConfig.from_file(sources / "build.yaml")
    config.output_dir = str(tmp_path / "bad-out")
    config.sources[2].metadata = str(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match=r"cattle.*bad\.yaml.*empty caption for class 'angus'"):
        build_alive(config, progress=False)


def test_an_empty_caption_from_the_command_line_is_one_line_and_exit_9(sources, tmp_path):
    """`python -m training.alive`: bad input is one `prog: error:` line on stderr and exit status 9, no traceback."""
    bad = yaml.safe_load((sources / "cattle.yaml").read_text())
    bad["templates"] = [" "]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    config = absolute_sources(yaml.safe_load((sources / "build.yaml").read_text()), sources)
    config["output_dir"] = str(tmp_path / "out")
    config["sources"][2]["metadata"] = str(tmp_path / "bad.yaml")
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(config))
    code, err = run_as_main("training.alive", ["--config", tmp_path / "build.yaml", "--no-progress"])
    assert code == ExitCode.INPUT == 9
    (line,) = err.splitlines()
    assert line.startswith(f"python -m training.alive: error: source 'cattle' ({tmp_path / 'bad.yaml'}): ")
    assert line.endswith("empty caption for class 'angus'")
    assert not (tmp_path / "out").exists()


def absolute_sources(config, sources):
    """`config` with its source paths made absolute, for a copy of the config written elsewhere."""
    return {
        **config,
        "sources": [
            {**s, "path": str(sources / s["path"]), "metadata": str(sources / s["metadata"])} for s in config["sources"]
        ],
    }


def test_config_errors_name_the_field(sources, tmp_path):
    config = absolute_sources(yaml.safe_load((sources / "build.yaml").read_text()), sources)
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**config, "shards": 3}))
    with pytest.raises(ValueError, match=r"typo\.yaml.*shards"):
        BuildConfig.from_file(tmp_path / "typo.yaml")
    (tmp_path / "format.yaml").write_text(yaml.safe_dump({**config, "formats": ["parquet"]}))
    with pytest.raises(ValueError, match="parquet"):
        BuildConfig.from_file(tmp_path / "format.yaml")


def test_command_line(sources, tmp_path, capsys):
    config = absolute_sources(yaml.safe_load((sources / "build.yaml").read_text()), sources)
    config["output_dir"] = str(tmp_path / "cli")
    config["formats"] = ["webdataset"]
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(config))
    main(["--config", str(tmp_path / "build.yaml"), "--no-progress"])
    out = capsys.readouterr().out
    assert "fish: 6 written, 1 skipped, 1 duplicates of 8 images" in out
    assert "duplicate dropped: fish:" in out and "missing.jpg" in out
    assert str(tmp_path / "cli" / "webdataset") in out
    assert not (tmp_path / "cli" / "imagefolder").exists()
    counts = [
        len(list(load_image_text_dataset(tmp_path / "cli" / "webdataset", split=split, streaming=True)))
        for split in ("train", "validation")
    ]
    assert sum(counts) == 21


def test_push_to_hub_receives_the_saved_dataset(sources, tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo_id: pushed.append((repo_id, self)))
    config = BuildConfig.from_file(sources / "build.yaml")
    config.output_dir, config.formats, config.push_to_hub = str(tmp_path / "hub"), ["datasets"], "agri/alive-mini"
    build_alive(config, progress=False)
    ((repo_id, dataset),) = pushed
    assert repo_id == "agri/alive-mini" and sorted(dataset) == ["train", "validation"]
    assert sum(len(split) for split in dataset.values()) == 21
    assert not (tmp_path / "hub" / "imagefolder").exists()  # staged in a temporary folder only


@pytest.mark.slow
def test_parallel_build_matches_serial(sources, built, tmp_path):
    config = BuildConfig.from_file(sources / "build.yaml")
    config.output_dir, config.num_workers, config.formats = str(tmp_path / "parallel"), 2, ["imagefolder"]
    report = build_alive(config, progress=False)
    assert report["sources"] == built["sources"] and report["duplicates"] == built["duplicates"]
    serial = sources / "out" / "imagefolder"
    for split in ("train", "validation"):
        assert (tmp_path / "parallel" / "imagefolder" / split / "metadata.jsonl").read_text() == (
            serial / split / "metadata.jsonl"
        ).read_text()


def tree(folder):
    """Every file under `folder` (hidden ones too) with a digest of its bytes: a build, byte for byte."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def previous_build(sources, tmp_path):
    """A config writing two sources as an image folder into tmp_path/out, its first build done, and a user's file
    beside the build."""
    config = absolute_sources(yaml.safe_load((sources / "build.yaml").read_text()), sources)
    config.update(output_dir="out", formats=["imagefolder"], sources=config["sources"][:2])
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(config))
    build_alive(BuildConfig.from_file(tmp_path / "build.yaml"), progress=False)
    (tmp_path / "out" / "NOTES.md").write_text("my notes")
    return tmp_path / "build.yaml", tree(tmp_path / "out")


@pytest.mark.parametrize("typo", ["fihs.csv", "leaves/healthyy", "./leavs"])
def test_a_typo_in_a_source_path_is_named_and_the_previous_build_is_kept(previous_build, sources, tmp_path, typo):
    config_file, before = previous_build
    config = yaml.safe_load(config_file.read_text())
    config["sources"][1]["path"] = typo
    # A folder named "leaves" beside the config makes "leaves/healthyy" a local path, not a Hub id "org/name".
    (tmp_path / "leaves").symlink_to(sources / "leaves")
    config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(
        ValueError,
        match=rf"build\.yaml: sources\[1\] \('fish'\): path '{re.escape(typo)}' does not "
        r"exist .*relative to the config file",
    ) as failure:
        build_alive(BuildConfig.from_file(config_file), progress=False)
    assert "hub" not in str(failure.value).lower().replace("a hub dataset id", "")
    assert tree(tmp_path / "out") == before


def test_every_source_is_checked_before_the_previous_build_is_touched(previous_build, sources, tmp_path):
    config_file, before = previous_build
    config = BuildConfig.from_file(config_file)
    config.sources[1].metadata = str(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"source 'fish': cannot read its metadata file .*missing\.yaml"):
        build_alive(config, progress=False)
    config = BuildConfig.from_file(config_file)
    config.sources[1].path = str(tmp_path / "gone")  # set in Python: no config file to resolve it against
    with pytest.raises(ValueError, match=rf"source 'fish': '{tmp_path / 'gone'}' is not a local file or folder"):
        build_alive(config, progress=False)
    assert tree(tmp_path / "out") == before


def test_a_build_that_fails_midway_leaves_the_previous_build_and_a_complete_one_replaces_it(
    previous_build, tmp_path, monkeypatch
):
    config_file, before = previous_build
    encode_job = alive_builder._encode_job
    calls = []

    def disk_full_at_the_fifth_image(job):
        calls.append(job)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return encode_job(job)

    monkeypatch.setattr(alive_builder, "_encode_job", disk_full_at_the_fifth_image)
    with pytest.raises(OSError, match="No space left on device"):
        build_alive(BuildConfig.from_file(config_file), progress=False)
    assert tree(tmp_path / "out") == before  # no staging folder left either

    monkeypatch.setattr(alive_builder, "_encode_job", encode_job)
    config = BuildConfig.from_file(config_file)
    config.formats = ["webdataset"]
    report = build_alive(config, progress=False)
    after = tree(tmp_path / "out")
    # The new build replaced the old one whole: its formats, its report; the user's file stayed.
    assert sorted({name.split("/")[0] for name in after}) == ["NOTES.md", "build_report.json", "webdataset"]
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["splits"] == report["splits"]
    assert sum(report["splits"].values()) == 15


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../../secret.jpg", "leads outside"),
        ("fish/link.jpg", r"leads outside .*secret\.jpg"),
    ],
)
def test_a_csv_source_with_an_image_path_outside_its_folder_is_refused(sources, tmp_path, name, message):
    data = tmp_path / "data"
    (data / "fish").mkdir(parents=True)
    shutil.copy(sources / "fish" / "goby0.jpg", data / "fish" / "goby0.jpg")
    (tmp_path / "secret.jpg").write_bytes((sources / "fish" / "goby1.jpg").read_bytes())
    (data / "fish" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (data / "fish.csv").write_text(f"filepath,label\nfish/goby0.jpg,goby\n{name},goby\n")
    config = BuildConfig.from_file(sources / "build.yaml")
    config.output_dir, config.formats = str(tmp_path / "out"), ["imagefolder"]
    config.sources = [config.sources[1]]
    config.sources[0].path = str(data / "fish.csv")
    with pytest.raises(ValueError, match=rf"{data / 'fish.csv'}: row 3: the image path '{re.escape(name)}' {message}"):
        build_alive(config, progress=False)
    assert not (tmp_path / "out").exists()
