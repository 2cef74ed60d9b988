"""CLI: train and generate with experiment=smoke, plain-safetensors loading, resume, clear errors."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from synthnet.cli import main
from synthnet.targets import build_target


def _args(tiny_zoo, root, *extra):
    return ["experiment=smoke", f"paths.root={root}", f"paths.checkpoints_dir={tiny_zoo['checkpoints_dir']}",
            "target.hidden=[16]", "progress=false", *extra]


def test_train_then_generate_writes_plain_loadable_files(tiny_zoo, tmp_path, capsys):
    assert main(["train", *_args(tiny_zoo, tmp_path)]) == 0
    generator = tmp_path / "digits-mlp" / "generators" / "perceiver_moe-imitation.safetensors"
    assert generator.exists()
    assert (tmp_path / "digits-mlp" / "generators" / "perceiver_moe-imitation.metrics.jsonl").exists()
    assert not (generator.parent / "resume" / generator.name).exists()
    assert main(["generate", *_args(tiny_zoo, tmp_path, "generate.count=3", "generate.steps=2")]) == 0
    out = capsys.readouterr().out
    assert "| step |" in out and "zoo SGD test acc" in out
    files = sorted((tmp_path / "digits-mlp" / "generated" / "perceiver_moe-imitation").glob("*.safetensors"))
    assert [f.name for f in files] == [f"seed_{s:07d}.safetensors" for s in (1000000, 1000001, 1000002)]
    model = build_target({"name": "mlp", "hidden": [16]}, (1, 8, 8), 10)
    for f in files:  # no SynthNet code needed to use them
        model.load_state_dict(load_file(str(f)), strict=True)
    # a generator only makes weights for its own kind of target
    assert main(["generate", *_args(tiny_zoo, tmp_path), "target.activation=tanh"]) == 2
    assert "cannot make these networks: its target.activation is 'relu', not 'tanh'" in capsys.readouterr().err


def test_generate_for_an_unseen_width_and_depth(tiny_zoo, tmp_path, capsys):
    """Tokens describe units by role, so a generator trained on 64-16-10 makes 64-24-10 and 64-16-16-10 networks
    from the CLI (zero-shot, said in the log), written apart from its own architecture's; the flat baseline,
    which reads one vector of a fixed size, is refused in one line."""
    assert main(["train", *_args(tiny_zoo, tmp_path)]) == 0
    assert main(["train", *_args(tiny_zoo, tmp_path, "generator=flat_mlp")]) == 0
    folder = tmp_path / "digits-mlp" / "generated" / "perceiver_moe-imitation"
    assert main(["generate", *_args(tiny_zoo, tmp_path, "generate.count=2")]) == 0
    own = {f.name: load_file(str(f)) for f in folder.glob("*.safetensors")}
    capsys.readouterr()
    for hidden, tag in (([24], "hidden-24"), ([16, 16], "hidden-16-16")):
        override = f"target.hidden=[{','.join(map(str, hidden))}]"
        assert main(["generate", *_args(tiny_zoo, tmp_path, "generate.count=2"), override]) == 0, hidden
        captured = capsys.readouterr()
        assert "| step |" in captured.out and "(zero-shot: an architecture it was not trained on)" in captured.out
        files = sorted((folder / tag).glob("*.safetensors"))
        assert len(files) == 2
        model = build_target({"name": "mlp", "hidden": hidden}, (1, 8, 8), 10)
        for f in files:
            model.load_state_dict(load_file(str(f)), strict=True)
    assert {f.name: load_file(str(f)) for f in folder.glob("*.safetensors")}.keys() == own.keys()  # untouched
    flat = tmp_path / "digits-mlp" / "generators" / "flat_mlp-imitation.safetensors"
    assert main(["generate", *_args(tiny_zoo, tmp_path, f"generate.generator={flat}"), "target.hidden=[24]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "reads one flat vector" in err and len(err.splitlines()) == 1


def test_the_tokenizer_option_bias_chunk_travels_with_the_generator(tiny_zoo, tmp_path):
    """A generator trained with generator.bias_chunk=true records it in its header, and generate tokenizes with the
    file's own option (no override needed): its files equal the library's output under that layout, not the other."""
    from synthnet.generation import generate_networks, target_layout
    from synthnet.generators import load_generator

    assert main(["train", *_args(tiny_zoo, tmp_path, "generator.bias_chunk=true")]) == 0
    loaded = load_generator(tmp_path / "digits-mlp" / "generators" / "perceiver_moe-imitation.safetensors")
    assert loaded.bias_chunk is True and loaded.metadata["generator_config"]["bias_chunk"] is True
    assert main(["generate", *_args(tiny_zoo, tmp_path, "generate.count=2", "generate.steps=2")]) == 0
    folder = tmp_path / "digits-mlp" / "generated" / "perceiver_moe-imitation"
    written = [load_file(str(folder / f"seed_{s:07d}.safetensors")) for s in (1000000, 1000001)]
    target = {"name": "mlp", "hidden": [16]}
    for bias_chunk in (True, False):
        _, layout = target_layout(target, (1, 8, 8), 10, loaded.chunk_size, bias_chunk)
        final = generate_networks(loaded.model, layout, target, (1, 8, 8), 10, [1000000, 1000001], 2).state_dicts[-1]
        same = all(torch.allclose(final[k][i], written[i][k], atol=1e-6) for i in range(2) for k in written[i])
        assert same == bias_chunk


def test_generate_writes_pruned_and_quantized_networks(tiny_zoo, tmp_path, capsys):
    """generate.prune / generate.bits: plain safetensors with exactly that share of weights zeroed and every
    weight on its output channel's grid of 2^bits - 1 levels, the settings and the sparsity in the header."""
    import json

    assert main(["train", *_args(tiny_zoo, tmp_path)]) == 0
    capsys.readouterr()
    assert main(["generate", *_args(tiny_zoo, tmp_path, "generate.count=2", "generate.prune=0.9",
                                    "generate.bits=4")]) == 0
    out = capsys.readouterr().out
    assert "written networks (0.9 of weights zeroed, 4-bit): test acc mean" in out
    files = sorted((tmp_path / "digits-mlp" / "generated" / "perceiver_moe-imitation").glob("*.safetensors"))
    assert len(files) == 2
    model = build_target({"name": "mlp", "hidden": [16]}, (1, 8, 8), 10)
    from safetensors import safe_open
    for f in files:
        weights = load_file(str(f))
        model.load_state_dict(weights, strict=True)
        matrices = [weights[k] for k in ("layers.0.weight", "layers.1.weight")]
        total = sum(m.numel() for m in matrices)
        zeros = sum(int((m == 0).sum()) for m in matrices)
        assert zeros == round(0.9 * total)
        for m in matrices:
            for row in m:
                assert len(row.unique()) <= 15
        with safe_open(str(f), "pt") as handle:
            header = handle.metadata()
        assert json.loads(header["bits"]) == 4 and json.loads(header["prune"]) == 0.9
        assert abs(json.loads(header["weight_sparsity"]) - zeros / total) < 1e-6
    assert main(["generate", *_args(tiny_zoo, tmp_path, "generate.bits=1")]) == 2
    assert "generate.bits" in capsys.readouterr().err


def test_flat_baseline_trains_the_same_way(tiny_zoo, tmp_path):
    assert main(["train", *_args(tiny_zoo, tmp_path, "generator=flat_mlp", "generator.hidden=32")]) == 0
    assert main(["generate", *_args(tiny_zoo, tmp_path, "generator=flat_mlp", "generate.count=2")]) == 0
    assert len(list((tmp_path / "digits-mlp" / "generated" / "flat_mlp-imitation").glob("*.safetensors"))) == 2


def test_missing_zoo_and_generator_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "experiment=smoke", f"paths.root={tmp_path}"]) == 2
    assert "synthnet zoo" in capsys.readouterr().err
    assert main(["generate", "experiment=smoke", f"paths.root={tmp_path}"]) == 2
    assert "no generator file" in capsys.readouterr().err


def test_train_resumes_after_an_interruption(tiny_zoo, tmp_path, monkeypatch):
    import synthnet.methods.imitation as imitation

    steps = ["method.steps=6", "method.save_every=3", "method.eval_every=6", "method.log_every=3"]
    assert main(["train", *_args(tiny_zoo, tmp_path / "straight", *steps)]) == 0

    real = imitation.train_imitation

    def interrupted(*args, on_save=None, **kwargs):
        def save_then_stop(state):
            on_save(state)
            raise KeyboardInterrupt
        return real(*args, on_save=save_then_stop, **kwargs)

    monkeypatch.setattr(imitation, "train_imitation", interrupted)
    assert main(["train", *_args(tiny_zoo, tmp_path / "resumed", *steps)]) == 130
    folder = tmp_path / "resumed" / "digits-mlp" / "generators"
    assert (folder / "resume" / "perceiver_moe-imitation.safetensors").exists()
    assert not (folder / "perceiver_moe-imitation.safetensors").exists()  # nothing unfinished where evaluate looks
    monkeypatch.setattr(imitation, "train_imitation", real)
    assert main(["train", *_args(tiny_zoo, tmp_path / "resumed", *steps)]) == 0
    assert not (folder / "resume" / "perceiver_moe-imitation.safetensors").exists()
    a = load_file(str(tmp_path / "straight" / "digits-mlp" / "generators" / "perceiver_moe-imitation.safetensors"))
    b = load_file(str(folder / "perceiver_moe-imitation.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    import json  # the resumed log holds each step once, like the straight run's

    def steps_logged(root):
        path = root / "digits-mlp" / "generators" / "perceiver_moe-imitation.metrics.jsonl"
        return [(json.loads(line)["step"], sorted(json.loads(line))) for line in path.read_text().splitlines()]
    assert steps_logged(tmp_path / "resumed") == steps_logged(tmp_path / "straight")
    # a finished generator with the same settings is not retrained
    assert main(["train", *_args(tiny_zoo, tmp_path / "resumed", *steps)]) == 0


def test_unfinished_generator_is_refused_by_generate_and_evaluate(tiny_zoo, tmp_path, capsys):
    from synthnet.storage import load_state_dict, read_metadata, save_state_dict

    assert main(["train", *_args(tiny_zoo, tmp_path)]) == 0
    path = tmp_path / "digits-mlp" / "generators" / "perceiver_moe-imitation.safetensors"
    assert read_metadata(path)["finished"] is True
    tensors, meta = load_state_dict(path)
    save_state_dict(path, tensors, {**meta, "finished": False, "step": 3})  # as an interrupted GRPO leaves it
    capsys.readouterr()
    assert main(["generate", *_args(tiny_zoo, tmp_path)]) == 2
    assert "unfinished training" in capsys.readouterr().err
    assert main(["evaluate", *_args(tiny_zoo, tmp_path, "evaluate.count=2")]) == 2
    assert "unfinished training" in capsys.readouterr().err
    assert not (tmp_path / "digits-mlp" / "reports").exists()


def test_every_command_refuses_a_generator_for_another_target_or_task(tiny_zoo, tmp_path, capsys):
    """generate, evaluate, GRPO and the task method share one fit check; each refuses in one line and
    writes nothing."""
    assert main(["train", *_args(tiny_zoo, tmp_path)]) == 0
    path = tmp_path / "digits-mlp" / "generators" / "perceiver_moe-imitation.safetensors"
    other = tmp_path / "other"
    commands = {
        "generate": ["generate", "experiment=smoke", f"generate.generator={path}"],
        "evaluate": ["evaluate", "experiment=smoke", f"evaluate.generators=[{path}]"],
        "grpo": ["train", "experiment=smoke_grpo", f"method.source={path}", "method.iterations=1"],
        "task": ["train", "experiment=smoke", "method=task", f"method.source={path}", "method.steps=2"],
    }
    capsys.readouterr()
    for name, command in commands.items():
        for wrong, message in ((["target.hidden=[16]", "target.activation=tanh"], "its target.activation is"),
                               (["target=cnn"], "it makes 'mlp' networks, not 'cnn'"),
                               (["target.hidden=[16]", "task=mnist1d", "task.num_samples=400"],
                                "was trained on task 'digits'")):
            args = [*command[:2], f"paths.root={other}", "progress=false", *wrong, *command[2:]]
            assert main(args) == 2, (name, wrong)
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1, (name, wrong, err)
    assert not other.exists() or not any(p.is_file() for p in other.rglob("*") if "data" not in p.parts)
