"""`crossspec generate` end to end on tiny checkpoints saved to disk, and its user errors.

The checkpoints are built from configs (no downloads): a tiny Video-LLaVA target and a tiny EventGPT
drafter sharing a 128-token word-level tokenizer, saved with save_pretrained beside the processor
files a real Video-LLaVA folder has. Without pillow/torchvision (as on CI) the command falls back to
its built-in preprocessing and says so; the tests check both the note and the results.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from crossspec_kernels import generate_cli, generate_inputs
from crossspec_kernels import testing_models as tm
from crossspec_kernels.events import EventStream, save_eventgpt_npy, write_dsec_h5
from crossspec_kernels.models.adapters import AdapterConfig, build_adapter
from crossspec_kernels.models.adapters import save_pretrained as save_adapter
from crossspec_kernels.models.eventgpt import EventGPTForCausalLM, eventgpt_config

HAVE_H5PY = importlib.util.find_spec("h5py") is not None

# The template's words get their own ids; everything else is <unk>, enough for prompts to tokenize.
TEMPLATE_WORDS = (
    "A chat between a curious human and an artificial intelligence assistant . The gives helpful , "
    "detailed polite answers to the human's questions USER : ASSISTANT What is happening ? Describe scene"
)
SENSOR = (24, 32)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tokenizer(swap: bool = False):
    """A word-level tokenizer with ids 0..127: specials, the template's words, fillers, <image>, <video>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in TEMPLATE_WORDS.split():
        vocab.setdefault(word, len(vocab))
    for index in range(len(vocab), tm.IMAGE_TOKEN_ID):
        vocab[f"w{index}"] = index
    vocab["<image>"], vocab["<video>"] = tm.IMAGE_TOKEN_ID, tm.VIDEO_TOKEN_ID
    if swap:  # another vocabulary: two words trade ids
        vocab["chat"], vocab["human"] = vocab["human"], vocab["chat"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def _write_processor_files(folder, patch_size: int = tm.PATCH_SIZE) -> None:
    """The processor settings a Video-LLaVA folder carries (VideoLlavaProcessor.save_pretrained's files)."""
    (folder / "processor_config.json").write_text(
        json.dumps(
            {
                "processor_class": "VideoLlavaProcessor",
                "patch_size": patch_size,
                "vision_feature_select_strategy": "default",
                "num_additional_image_tokens": 1,
            }
        )
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "VideoLlavaImageProcessor",
                "processor_class": "VideoLlavaProcessor",
                "crop_size": {"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE},
                "size": {"shortest_edge": tm.IMAGE_SIZE},
                "do_center_crop": True,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "do_convert_rgb": True,
                "resample": 3,
                "rescale_factor": 1 / 255,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
            }
        )
    )


def _events(seed: int = 0) -> EventStream:
    gen = torch.Generator().manual_seed(seed)
    count = 4000
    return EventStream(
        torch.randint(0, SENSOR[1], (count,), generator=gen),
        torch.randint(0, SENSOR[0], (count,), generator=gen),
        torch.sort(torch.randint(0, 50_000, (count,), generator=gen)).values,
        torch.randint(0, 2, (count,), generator=gen),
        SENSOR,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    paths = {name: root / name for name in ("target", "drafter", "drafter_other_vocab", "adapter", "narrow")}
    target = tm.tiny_video_llava(seed=0)
    target.save_pretrained(paths["target"])
    _tokenizer().save_pretrained(paths["target"])
    _write_processor_files(paths["target"])

    torch.manual_seed(1)
    drafter = EventGPTForCausalLM(eventgpt_config("tiny")).eval()
    for name, swap in (("drafter", False), ("drafter_other_vocab", True)):
        drafter.save_pretrained(paths[name])
        _tokenizer(swap=swap).save_pretrained(paths[name])

    hidden = target.config.text_config.hidden_size
    torch.manual_seed(2)
    save_adapter(
        build_adapter(AdapterConfig(kind="linear", d_draft=hidden, d_target=hidden)), paths["adapter"]
    )
    save_adapter(build_adapter(AdapterConfig(kind="linear", d_draft=32, d_target=hidden)), paths["narrow"])

    torch.manual_seed(4)
    text = target.config.text_config
    d_event = drafter.config.get_text_config().hidden_size
    for name, kind, d_draft in (
        ("head", "b1", text.hidden_size),
        ("head_l5f", "l5f", d_event),
        ("head_l5_narrow", "l5", 32),
    ):
        head = build_adapter(
            AdapterConfig(
                kind=kind,
                d_draft=d_draft,
                d_target=text.hidden_size,
                vocab_size=text.vocab_size,
                num_heads=text.num_attention_heads,
                num_kv_heads=text.num_key_value_heads,
                intermediate_size=text.intermediate_size,
            )
        )
        paths[name] = root / name
        head.save_pretrained(paths[name])
    paths["draft_vocab"] = root / "draft_vocab.json"
    paths["draft_vocab"].write_text(json.dumps(list(range(3, 60))))

    gen = torch.Generator().manual_seed(3)
    clip = torch.randint(0, 256, (11, 20, 26, 3), generator=gen, dtype=torch.uint8)  # [T, H, W, 3]
    paths["video"] = root / "clip.npy"
    np.save(paths["video"], clip.numpy())
    paths["video_pt"] = root / "clip.pt"
    torch.save(clip.permute(0, 3, 1, 2).contiguous(), paths["video_pt"])  # [T, 3, H, W]
    paths["events_npy"] = save_eventgpt_npy(root / "events.npy", _events())
    paths["events_h5"] = root / "events.h5"
    if HAVE_H5PY:  # the GPU image has no h5py: its DSEC cases skip there (CI installs it)
        write_dsec_h5(paths["events_h5"], _events(seed=1))
    paths["root"] = root
    return paths


def _argv(files, **overrides) -> list[str]:
    options = {
        "--target": files["target"],
        "--drafter": files["drafter"],
        "--video": files["video"],
        "--events": files["events_npy"],
        "--question": "What is happening?",
        "--max-new-tokens": 6,
        "--device": "cpu",
        "--backend": "reference",
    }
    options.update({f"--{key.replace('_', '-')}": value for key, value in overrides.items()})
    argv = ["generate"]
    for key, value in options.items():
        if value is True:
            argv.append(key)
        elif value is not None:
            argv += [key, str(value)]
    return argv


def _reference_tokens(files, video_path, max_new_tokens: int = 6) -> list[int]:
    """What the target answers, computed without the command: the processor's work done by hand."""
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration

    target = VideoLlavaForConditionalGeneration.from_pretrained(files["target"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(files["target"])
    clip = torch.from_numpy(np.load(video_path))
    indices = np.linspace(0, clip.shape[0] - 1, tm.NUM_FRAMES).round().astype(int)
    frames = clip[indices].permute(0, 3, 1, 2).float()  # 20 x 26 -> shortest edge 16: 16 x 20
    frames = torch.nn.functional.interpolate(frames, size=(16, 20), mode="bicubic", antialias=True)
    frames = frames.round().clamp(0, 255)[:, :, :, 2:18] / 255
    pixels = (frames - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    text = "USER: " + "<video>" * tm.VIDEO_TOKENS + "\nWhat is happening? ASSISTANT:"
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = target.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            pixel_values_videos=pixels[None],
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, encoded["input_ids"].shape[1] :].tolist()


def test_chain_with_compare_and_json(files, capsys):
    out_json = files["root"] / "chain.json"
    assert generate_cli.main(_argv(files, gamma=3, compare=True, json=out_json, processor="builtin")) == 0
    printed = capsys.readouterr().out
    assert "Q: What is happening?" in printed
    assert "identical tokens" in printed and "yes (6 tokens)" in printed
    for row in (
        "acceptance rate",
        "mean accepted length",
        "free tokens",
        "TTFT",
        "tokens/s",
        "verify.forward",
    ):
        assert row in printed
    payload = json.loads(out_json.read_text())
    assert payload["compare"]["identical"] is True
    assert payload["tokens"] == payload["compare"]["tokens"] == _reference_tokens(files, files["video"])
    assert payload["settings"]["video_tokens"] == tm.VIDEO_TOKENS
    assert payload["settings"]["num_video_frames"] == tm.NUM_FRAMES
    assert payload["settings"]["draft"] == "chain gamma=3"
    assert 0.0 <= payload["stats"]["acceptance_rate"] <= 1.0
    assert payload["answer"] == payload["compare"]["answer"]


@pytest.mark.parametrize(("head", "kind"), [("head", "b1"), ("head_l5f", "l5f")])
def test_feature_head_drafts_after_the_prefill_and_output_is_the_targets(files, capsys, head, kind):
    out_json = files["root"] / f"{head}.json"
    argv = _argv(
        files,
        gamma=3,
        compare=True,
        json=out_json,
        processor="builtin",
        feature_head=files[head],
        draft_vocab=files["draft_vocab"],
    )
    assert generate_cli.main(argv) == 0
    payload = json.loads(out_json.read_text())
    assert payload["compare"]["identical"] is True
    assert payload["settings"]["feature_head"] == str(files[head])
    drafted = payload["stats"]["drafters"]["feature"]
    assert drafted["row_rounds"] > 0 and drafted["kind"] == kind  # the head drafted


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"draft_vocab": "x.json"}, "--draft-vocab needs --feature-head"),
        ({"feature_head": "adapter"}, "--feature-head"),  # a linear adapter, not a feature head
        ({"feature_head": "head_l5_narrow"}, "drafter's hidden size is"),
    ],
)
def test_feature_head_errors(files, capsys, overrides, message):
    overrides = {k: files.get(v, v) for k, v in overrides.items()}
    with pytest.raises(SystemExit, match=message) as info:
        generate_cli.main(_argv(files, **overrides))
    assert info.value.code == 2


def test_coupled_sampling_flag_reaches_the_engine(files):
    out_json = files["root"] / "coupled.json"
    argv = _argv(files, temperature=0.5, seed=7, sampling="coupled", json=out_json, processor="builtin")
    assert generate_cli.main(argv) == 0
    assert json.loads(out_json.read_text())["stats"]["sampling"] == "coupled"


def test_tree_with_dsec_window_adapter_and_channels_first_video(files, capsys):
    if not HAVE_H5PY:
        pytest.skip("h5py is not installed: DSEC files cannot be written")
    out_json = files["root"] / "tree.json"
    argv = _argv(
        files,
        tree="2,3,5",
        events=files["events_h5"],
        window_us="10000,40000",
        sensor_size=f"{SENSOR[0]},{SENSOR[1]}",
        adapter=files["adapter"],
        video=files["video_pt"],
        compare=True,
        json=out_json,
    )
    assert generate_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "yes (6 tokens)" in captured.out
    if "pillow" in captured.err:  # --processor auto fell back, and said why
        assert "built-in PyTorch preprocessing" in captured.err
    payload = json.loads(out_json.read_text())
    assert payload["settings"]["window_us"] == [10000, 40000]
    assert payload["settings"]["sensor_size"] == list(SENSOR)
    assert payload["settings"]["draft"] == "tree top_k=2 depth=3 max_nodes=5"
    # The same frames as the .npy clip (channels first here): the same answer as the reference.
    assert payload["tokens"] == _reference_tokens(files, files["video"])


def test_hf_processor_path(files, capsys, monkeypatch):
    """--processor hf hands text and frames to VideoLlavaProcessor and uses what it returns.

    pillow/torchvision are not needed here: the processor is a stand-in computing what the real one
    does (the built-in preprocessing), so this checks the command's side of the call.
    """
    from transformers import VideoLlavaProcessor

    calls = []

    class StandIn:
        def __init__(self, folder):
            self.tokenizer = generate_cli.load_tokenizer(files["target"], "--target")
            target = generate_cli.load_target(files["target"], torch.float32, torch.device("cpu"))
            self.builtin = generate_inputs.BuiltinVideoProcessor(files["target"], target, self.tokenizer)

        def __call__(self, text, videos, return_tensors):
            calls.append((text, videos.shape, videos.dtype, return_tensors))
            return {**self.builtin(text, videos), "token_type_ids": None}

    monkeypatch.setattr(generate_cli, "missing_processor_dependencies", list)
    monkeypatch.setattr(VideoLlavaProcessor, "from_pretrained", lambda folder, **kwargs: StandIn(folder))
    out_json = files["root"] / "hf.json"
    assert generate_cli.main(_argv(files, processor="hf", json=out_json)) == 0
    assert calls == [("USER: <video>\nWhat is happening? ASSISTANT:", (8, 20, 26, 3), np.uint8, "pt")]
    payload = json.loads(out_json.read_text())
    assert payload["settings"]["preprocessing"] == "VideoLlavaProcessor"
    assert payload["tokens"] == _reference_tokens(files, files["video"])
    assert "note" not in capsys.readouterr().err


class _FakeFrame:
    def __init__(self, index):
        self.index = index

    def to_ndarray(self, format):
        assert format == "rgb24"
        return np.full((6, 10, 3), self.index, np.uint8)


class _FakeContainer:
    """What load_video uses of PyAV: streams.video[0].frames (the header's count) and decode()."""

    def __init__(self, decodable, claimed):
        self.decodable = decodable
        self.streams = type("Streams", (), {"video": [type("Stream", (), {"frames": claimed})()]})()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def decode(self, stream):
        return (_FakeFrame(i) for i in range(self.decodable))


@pytest.mark.parametrize(("decodable", "claimed"), [(20, 20), (20, 0), (12, 20)])
def test_video_container_decoding_samples_uniformly(tmp_path, monkeypatch, decodable, claimed):
    fake_av = type(sys)("av")
    fake_av.open = lambda path: _FakeContainer(decodable, claimed)
    monkeypatch.setitem(sys.modules, "av", fake_av)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    frames, _ = generate_inputs.load_video(str(path), 8)
    assert frames.shape == (8, 6, 10, 3) and frames.dtype == np.uint8
    # Header right, header missing, header over-counting: always spread over the frames that exist.
    assert frames[:, 0, 0, 0].tolist() == generate_inputs.sample_frame_indices(decodable, 8)


def test_uniform_frame_sampling():
    assert generate_inputs.sample_frame_indices(11, 8) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert generate_inputs.sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]  # short clips repeat frames
    assert generate_inputs.sample_frame_indices(1, 8) == [0] * 8


def _write(files, name: str, array) -> str:
    path = files["root"] / name
    if name.endswith(".npy"):
        np.save(path, array)
    else:
        path.write_bytes(array)
    return str(path)


def _corrupt_target(files) -> str:
    folder = files["root"] / "corrupt_target"
    if not folder.exists():
        shutil.copytree(files["target"], folder)
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(folder)


# (argv overrides, a callable making them from the fixture's files, expected message)
BAD_INPUTS = {
    "missing target folder": (
        lambda f: {"target": f["root"] / "nope"},
        r"--target folder .*nope.* does not exist",
    ),
    "missing drafter folder": (
        lambda f: {"drafter": f["root"] / "nope"},
        r"--drafter folder .* does not exist",
    ),
    "missing video file": (
        lambda f: {"video": f["root"] / "nope.npy"},
        r"--video .*nope.npy.* does not exist",
    ),
    "video with 4 channels": (
        lambda f: {"video": _write(f, "rgba.npy", np.zeros((4, 8, 8, 4), np.uint8))},
        r"expected frames \[T, H, W, 3\] or \[T, 3, H, W\], got shape \(4, 8, 8, 4\)",
    ),
    "video of floats": (
        lambda f: {"video": _write(f, "float.npy", np.zeros((4, 8, 8, 3), np.float32))},
        r"frames must be uint8 \(0\.\.255\), got dtype float32",
    ),
    "video of unknown type": (
        lambda f: {"video": _write(f, "clip.txt", b"hello")},
        r"--video .*clip.txt: unknown file type '.txt'",
    ),
    "mp4 without PyAV": (
        lambda f: {"video": _write(f, "clip.mp4", b"\x00" * 16)},
        r"needs PyAV \(pip install av\); or convert the clip to a uint8 .npy",
    ),
    "events of unknown type": (
        lambda f: {"events": _write(f, "events.csv", b"x,y,t,p\n")},
        r"--events .*events.csv: unknown file type '.csv'",
    ),
    "window without events": (
        lambda f: {"events": f["events_h5"], "window_us": "90000000,90000001"},
        r"no events in the window \[90000000, 90000001\)",
    ),
    "events outside the sensor": (
        lambda f: {"events": f["events_h5"], "sensor_size": "8,8"},
        r"--events .*events.h5: .*lie outside the sensor",
    ),
    "tokenizers that disagree": (
        lambda f: {"drafter": f["drafter_other_vocab"]},
        r"tokenizers disagree on 2 of the 128 ids .*id \d+: target '(chat|human)' vs drafter '(human|chat)'",
    ),
    "drafter folder holding a Video-LLaVA": (
        lambda f: {"drafter": f["target"]},
        r"--drafter .*holds a 'video_llava' model; expected an EventGPTForCausalLM folder",
    ),
    "unreadable target weights": (
        lambda f: {"target": _corrupt_target(f)},
        r"--target .*corrupt_target: cannot load the checkpoint",
    ),
    "adapter with another hidden size": (
        lambda f: {"adapter": f["narrow"]},
        r"--adapter .*maps hidden size 32 -> 64, but the drafter's hidden size is 64 and the target's 64",
    ),
    "adapter folder without an adapter": (
        lambda f: {"adapter": f["root"]},
        r"--adapter .*no adapter_config.json",
    ),
    "--processor hf without pillow": (
        lambda f: {"processor": "hf"},
        r"--processor hf: VideoLlavaProcessor cannot be imported here \(it needs pillow and torchvision",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_user_errors_are_one_line_and_exit_2(files, capsys, monkeypatch, case):
    make, message = BAD_INPUTS[case]
    if not HAVE_H5PY and "events_h5" in str(make(files).get("events", "")):
        pytest.skip("h5py is not installed: DSEC files cannot be written")
    if case == "mp4 without PyAV":
        monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    if case == "--processor hf without pillow":
        monkeypatch.setattr(generate_cli, "missing_processor_dependencies", lambda: ["torchvision"])
    with pytest.raises(SystemExit, match=message) as info:
        generate_cli.main(_argv(files, **make(files)))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("crossspec generate: error: ")
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tree": "4,5"}, r"argument --tree: expected TOP_K,DEPTH,MAX_NODES"),
        ({"tree": "0,5,32"}, r"argument --tree: TreeDraft: top_k must be an int in \[1, 16\], got 0"),
        ({"tree": "2,2,4", "gamma": "3"}, r"argument --gamma: not allowed with argument --tree"),
        ({"gamma": "x"}, r"argument --gamma: expected an int"),
        (
            {"window_us": "500,500"},
            r"argument --window-us: the window \[T0, T1\) needs T0 < T1, got T0=500, T1=500",
        ),
        ({"window_us": "9,3"}, r"needs T0 < T1"),
        ({"sensor_size": "480"}, r"argument --sensor-size: expected H,W"),
        ({"temperature": "-1"}, r"argument --temperature: must be a finite float >= 0"),
        ({"max_new_tokens": "0"}, r"argument --max-new-tokens: must be >= 1"),
    ],
)
def test_malformed_options_are_argparse_errors(files, capsys, overrides, message):
    with pytest.raises(SystemExit) as info:
        generate_cli.main(_argv(files, **overrides))
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), so the file's existence tells whether it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _planted_events(files, marker) -> str:
    """A well-formed EventGPT dict {'x', 'y', 't', 'p'} with one extra entry whose unpickling runs code."""
    events = _events().as_numpy()
    events["extra"] = _CreatesFile(marker)
    path = files["root"] / f"planted_{marker.name}.npy"
    np.save(path, events, allow_pickle=True)
    return str(path)


def _no_models(monkeypatch):
    """Loading a model from here on fails the test: it says which checks ran before any weights."""

    def refuse(folder, *args, **kwargs):
        raise AssertionError(f"a model was loaded from {folder} before the inputs were checked")

    monkeypatch.setattr(generate_cli, "load_target", refuse)
    monkeypatch.setattr(generate_cli, "load_drafter", refuse)


def test_planted_pickle_is_refused_without_trust_pickle(files, capsys, monkeypatch):
    from crossspec_kernels import cli, cli_common

    _no_models(monkeypatch)
    marker = files["root"] / "payload_ran"
    argv = _argv(files, events=_planted_events(files, marker))
    with pytest.raises(SystemExit) as info:  # through the `crossspec` entry point itself
        cli.main(argv)
    assert info.value.code == cli_common.EXIT_USAGE == 2
    assert "2  usage error" in cli_common.EXIT_CODES_HELP
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("crossspec generate: error: --events ")
    assert re.search(r"refers to \S*open, .*refusing to load it.*--trust-pickle", err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not marker.exists()


def test_trust_pickle_reaches_the_loader(files, monkeypatch):
    """--trust-pickle loads the same file with the full pickle (the payload runs: the flag is real)."""

    class ModelsReached(Exception):
        pass

    def stop(*args, **kwargs):
        raise ModelsReached

    monkeypatch.setattr(generate_cli, "load_target", stop)
    marker = files["root"] / "trusted_payload_ran"
    with pytest.raises(ModelsReached):
        generate_cli.main(_argv(files, events=_planted_events(files, marker), trust_pickle=True))
    assert marker.exists()


def test_trust_pickle_help_warns_about_code(capsys):
    with pytest.raises(SystemExit):
        generate_cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--trust-pickle .*may run any code", help_text), help_text


# Every user error but unreadable weights (found only by reading them) comes before any model loads.
@pytest.mark.parametrize("case", [case for case in BAD_INPUTS if case != "unreadable target weights"])
def test_inputs_are_checked_before_any_model_loads(files, capsys, monkeypatch, case):
    make, message = BAD_INPUTS[case]
    if not HAVE_H5PY and "events_h5" in str(make(files).get("events", "")):
        pytest.skip("h5py is not installed: DSEC files cannot be written")
    if case == "mp4 without PyAV":
        monkeypatch.setitem(sys.modules, "av", None)
    if case == "--processor hf without pillow":
        monkeypatch.setattr(generate_cli, "missing_processor_dependencies", lambda: ["torchvision"])
    _no_models(monkeypatch)
    with pytest.raises(SystemExit, match=message) as info:
        generate_cli.main(_argv(files, **make(files)))
    assert info.value.code == 2


@pytest.mark.parametrize("flag", ["json", "profile"])
def test_output_folders_are_checked_before_any_model_loads(files, capsys, monkeypatch, flag):
    _no_models(monkeypatch)
    missing = files["root"] / "no_such_folder" / "out.file"
    with pytest.raises(SystemExit, match=rf"--{flag} .*no_such_folder.* does not exist") as info:
        generate_cli.main(_argv(files, **{flag: missing}))
    assert info.value.code == 2


def test_status_lines_go_to_stderr_only(files, capsys):
    out_json = files["root"] / "status.json"
    assert generate_cli.main(_argv(files, gamma=2, compare=True, json=out_json, processor="builtin")) == 0
    captured = capsys.readouterr()
    target, drafter = files["target"], files["drafter"]
    expected = [
        rf"loading target from {re.escape(str(target))} \.\.\.",
        r"loaded target in \d+\.\d s",
        rf"loading drafter from {re.escape(str(drafter))} \.\.\.",
        r"loaded drafter in \d+\.\d s",
        r"baseline: target\.generate greedy, up to 6 tokens \.\.\.",
        r"baseline: 6 tokens in \d+\.\d s",
        r"generating \(CrossSpecEngine, chain gamma=2, backend reference\), up to 6 tokens \.\.\.",
        r"generated 6 tokens in \d+\.\d s",
    ]
    status = [line for line in captured.err.splitlines() if line.startswith("crossspec generate: ")]
    status = [line for line in status if not line.startswith("crossspec generate: note: ")]
    assert len(status) == len(expected), status
    for line, pattern in zip(status, expected):  # in this order
        assert re.fullmatch(rf"crossspec generate: {pattern}", line), (line, pattern)
    for word in ("loading", "loaded", "generating", "generated", "baseline:"):
        assert word not in captured.out
    assert "Q: What is happening?" in captured.out and "identical tokens" in captured.out
    assert json.loads(out_json.read_text())["compare"]["identical"] is True
