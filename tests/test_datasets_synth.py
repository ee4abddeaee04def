"""The synthetic dataset writer and the manifest loader (issue 14, items 1 and 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from crossspec_kernels import cli  # noqa: E402
from crossspec_kernels.datasets import ManifestError, load_manifest, write_synthetic_dataset  # noqa: E402
from crossspec_kernels.events import DSECEventFile, load_eventgpt_npy, synthetic_clip  # noqa: E402
from crossspec_kernels.generate_inputs import load_video  # noqa: E402

# Small clips: the writer's cost is synthetic_clip's, which scales with pixels x steps.
CLIP = dict(frames=4, height=24, width=32, duration_us=50_000, events_per_clip=3_000, num_objects=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    manifest = write_synthetic_dataset(out, 3, seed=7, show_progress=False, **CLIP)
    return out, manifest


def test_writer_output_reads_back_through_dsec_reader_and_manifest(dataset):
    out, manifest = dataset
    samples = load_manifest(manifest)
    assert [s.id for s in samples] == ["clip_0000", "clip_0001", "clip_0002"]
    assert [s.line for s in samples] == [1, 2, 3]
    for index, sample in enumerate(samples):
        # The same clip, regenerated: what the files hold must be exactly synthetic_clip's output.
        events, video = synthetic_clip(
            num_frames=CLIP["frames"],
            height=CLIP["height"],
            width=CLIP["width"],
            duration_us=CLIP["duration_us"],
            events_per_second=CLIP["events_per_clip"] / (CLIP["duration_us"] / 1e6),
            seed=7 * 1_000_000 + index,
            num_objects=CLIP["num_objects"],
        )
        assert sample.video == out / f"clip_{index:04d}" / "video.npy"
        assert sample.window_us == (0, CLIP["duration_us"])
        assert sample.sensor_size == (CLIP["height"], CLIP["width"])
        with h5py.File(sample.events, "r") as file:  # the DSEC layout, ms_to_idx included
            assert file["ms_to_idx"].shape == (CLIP["duration_us"] // 1000 + 1,)
        with DSECEventFile(sample.events, sample.sensor_size) as recording:
            read = recording.read(*sample.window_us)
        assert len(read) == len(events) > 0
        for name in "xytp":
            assert torch.equal(getattr(read, name).long(), getattr(events, name).long()), name
        frames, total = load_video(str(sample.video), CLIP["frames"])  # what `crossspec generate` reads
        assert total == CLIP["frames"]
        np.testing.assert_array_equal(frames, video.permute(0, 2, 3, 1).numpy())
    # The one question with a known answer carries it.
    assert samples[1].question == "How many objects are moving?" and samples[1].answer == "2"
    assert samples[0].answer is None


def test_eventgpt_npy_events_read_back_like_the_h5_ones(dataset, tmp_path):
    out, _ = dataset
    manifest = write_synthetic_dataset(
        tmp_path / "npy", 2, seed=7, event_format="npy", show_progress=False, **CLIP
    )
    h5_samples, npy_samples = load_manifest(out / "manifest.jsonl")[:2], load_manifest(manifest)
    for h5_sample, npy_sample in zip(h5_samples, npy_samples):
        assert npy_sample.events.name == "events.npy" and npy_sample.window_us == h5_sample.window_us
        with DSECEventFile(h5_sample.events, h5_sample.sensor_size) as recording:
            want = recording.read(*h5_sample.window_us)
        got = load_eventgpt_npy(npy_sample.events, npy_sample.sensor_size)  # no pickle trust needed
        assert len(got) == len(want) > 0
        for name in "xytp":
            assert torch.equal(getattr(got, name).long(), getattr(want, name).long()), name
    with pytest.raises(ValueError, match="event_format must be one of"):
        write_synthetic_dataset(tmp_path / "bad", 1, event_format="txt", show_progress=False)
    assert not (tmp_path / "bad").exists()


def test_writer_refuses_a_non_empty_folder_unless_forced(dataset, tmp_path):
    out, _ = dataset
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_dataset(out, 1, show_progress=False, **CLIP)
    small = dict(CLIP, events_per_clip=500)
    target = tmp_path / "again"
    write_synthetic_dataset(target, 1, show_progress=False, **small)
    manifest = write_synthetic_dataset(target, 1, force=True, show_progress=False, **small)
    assert len(load_manifest(manifest)) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clips", "1", "--height", "40000"], "--height must be an int in"),
        (["--clips", "1", "--duration-us", str(2**32)], "--duration-us must be an int in"),
        (["--clips", "0"], "argument --clips"),
        (["--clips", "1", "--event-format", "txt"], "argument --event-format"),
    ],
)
def test_cli_errors_name_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "synth", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_cli_refuses_non_empty_out(dataset, capsys):
    out, _ = dataset
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "synth", str(out), "--clips", "1"])
    assert exit_info.value.code == 2
    assert "is not empty; --force" in capsys.readouterr().err


def _line(dataset, **changes) -> dict:
    out, manifest = dataset
    record = json.loads(manifest.read_text().splitlines()[0])
    record.update({key: value for key, value in changes.items() if value is not None})
    for key in [key for key, value in changes.items() if value is None]:
        del record[key]
    # Absolute paths: the bad manifests live in another folder than the clips.
    for key in ("video", "events"):
        if key in record and not str(record[key]).startswith("/"):
            record[key] = str(out / record[key])
    return record


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(question=None), "question"),  # missing required field
        (dict(colour="red"), "colour"),  # unknown field
        (dict(events="/nonexistent/events.h5"), "events"),  # missing file
        (dict(video="/nonexistent/video.npy"), "video"),
        (dict(window_us=[10_000_000, 20_000_000]), "window_us"),  # outside the recording
        (dict(window_us=[5, 5]), "window_us"),  # empty window
        (dict(window_us="0,5"), "window_us"),  # wrong type
        (dict(question="  "), "question"),
        (dict(answer=3), "answer"),
        (dict(sensor_size=[0, 10]), "sensor_size"),
    ],
)
def test_bad_line_names_line_and_field(dataset, tmp_path, changes, field):
    good = _line(dataset)
    bad = _line(dataset, **changes)
    bad["id"] = "other"
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")  # bad on line 3
    with pytest.raises(ManifestError, match=rf"bad\.jsonl:3: field '{field}'"):
        load_manifest(manifest)


def test_bad_json_duplicate_id_and_empty_manifest(dataset, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(_line(dataset)) + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not valid JSON"):
        load_manifest(manifest)
    manifest.write_text(json.dumps(_line(dataset)) + "\n" + json.dumps(_line(dataset)) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: field 'id': 'clip_0000' is already used on line 1"):
        load_manifest(manifest)
    manifest.write_text("\n  \n")
    with pytest.raises(ManifestError, match="the manifest is empty"):
        load_manifest(manifest)


def test_relative_paths_resolve_against_the_manifest_folder(dataset, monkeypatch, tmp_path):
    out, manifest = dataset
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    assert load_manifest(manifest)[0].events == out / "clip_0000" / "events.h5"
