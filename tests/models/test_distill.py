"""Knowledge distillation in model: espnet_ext (model_conf.distill)."""

import copy
import shutil

import pytest
import soundfile as sf
import torch
import yaml
from conftest import real_speech_batch
from espnet2.tasks.asr import ASRTask

from espnet_ext.models.distill import Distiller

CHARS = ["<blank>", "<unk>", "a", "b", "c", "d", "<space>", "<sos/eos>"]

# A teacher with nothing that differs between training and eval mode (no dropout, no
# BatchNorm, no SpecAugment), so a copy of it in training mode computes the same.
TEACHER = dict(
    encoder="conformer",
    encoder_conf=dict(
        output_size=16,
        attention_heads=2,
        linear_units=24,
        num_blocks=1,
        dropout_rate=0.0,
        positional_dropout_rate=0.0,
        use_cnn_module=False,
        rel_pos_type="latest",
        input_layer="conv2d",
    ),
    decoder="transformer",
    decoder_conf=dict(
        attention_heads=2,
        linear_units=24,
        num_blocks=1,
        dropout_rate=0.0,
        positional_dropout_rate=0.0,
    ),
    model_conf=dict(ctc_weight=0.3, lsm_weight=0.0),
    frontend_conf=dict(n_fft=512, hop_length=160, n_mels=20),
    normalize="utterance_mvn",
)


def make_teacher(root, tokens=CHARS, **overrides):
    """ESPnet's own training config.yaml (asr_train's dry run) and a model file."""
    root.mkdir(parents=True, exist_ok=True)
    conf = copy.deepcopy(TEACHER)
    conf.update(overrides)
    (root / "train.yaml").write_text(yaml.safe_dump(conf))
    (root / "tokens.txt").write_text("\n".join(tokens) + "\n")
    ASRTask.main(
        cmd=[
            "--config", str(root / "train.yaml"), "--iterator_type", "none",
            "--dry_run", "true", "--output_dir", str(root / "out"),
            "--token_list", str(root / "tokens.txt"),
        ]
    )  # fmt: skip
    config = root / "out" / "config.yaml"
    torch.manual_seed(0)
    teacher, _ = ASRTask.build_model_from_file(config, None, "cpu")
    torch.save(teacher.state_dict(), root / "model.pth")
    return config, root / "model.pth", teacher


def make_student(teacher_config, path, distill, tokens=None, **changes):
    """The student's config.yaml: the teacher's with model: espnet_ext + distill."""
    args = yaml.safe_load(teacher_config.read_text())
    args["model"] = "espnet_ext"
    args["model_conf"] = dict(args["model_conf"], distill=distill)
    if tokens is not None:
        args["token_list"] = tokens
    for key, value in changes.items():
        args[key] = value
    path.write_text(yaml.safe_dump(args))
    model, _ = ASRTask.build_model_from_file(path, None, "cpu")
    return model


def _distill(config, model_file, **kw):
    return dict(teacher_config=str(config), teacher_model=str(model_file), **kw)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        speech=torch.randn(2, 9000, generator=g),
        speech_lengths=torch.tensor([9000, 7000]),
        text=torch.tensor([[2, 3, 6, 4], [5, 2, -1, -1]]),
        text_lengths=torch.tensor([4, 2]),
    )


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


def test_kd_losses_are_zero_when_the_student_is_a_copy_of_the_teacher(
    teacher_files, tmp_path
):
    config, model_file, teacher = teacher_files
    distill = _distill(config, model_file, ctc_kl=1.0, decoder_kl=1.0, hidden_mse=1.0)
    student = make_student(config, tmp_path / "s.yaml", distill)
    student.load_state_dict(teacher.state_dict())  # strict: distill adds no key
    _, stats, _ = student.train()(**_batch())
    for name in ("loss_kd_ctc", "loss_kd_dec", "loss_kd_hidden"):
        assert abs(float(stats[name])) < 1e-5, (name, stats[name])
    # and not zero for another student: the terms measure something
    student2 = make_student(config, tmp_path / "s2.yaml", distill)
    _, stats2, _ = student2.train()(**_batch())
    assert all(float(stats2[n]) > 1e-3 for n in ("loss_kd_ctc", "loss_kd_dec"))


def test_gradients_reach_only_the_student_and_the_teacher_stays_out_of_it(
    teacher_files, tmp_path
):
    config, model_file, _ = teacher_files
    distill = _distill(config, model_file, ctc_kl=1.0, decoder_kl=1.0)
    student = make_student(config, tmp_path / "s.yaml", distill).train()
    plain_keys = set(make_student(config, tmp_path / "p.yaml", None).state_dict())
    loss, stats, _ = student(**_batch())
    assert "loss_kd_ctc" in stats and "loss_kd_dec" in stats
    teacher = student.distill.teacher(torch.device("cpu"))
    student.train()  # never reaches the teacher: not a sub-module
    assert not teacher.training
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert set(student.state_dict()) == plain_keys
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    # the KD terms themselves send gradient into the student
    grads = [p.grad.clone() for p in student.encoder.parameters()]
    student.zero_grad()
    student.aux_loss_weights = {"kd_ctc": 0.0, "kd_dec": 0.0}
    student(**_batch())[0].backward()
    assert any(
        not torch.allclose(g, p.grad)
        for g, p in zip(grads, student.encoder.parameters())
    )


def test_clear_errors(teacher_files, tmp_path):
    config, model_file, _ = teacher_files
    with pytest.raises(ValueError, match="enables no KD term"):
        make_student(
            config,
            tmp_path / "a.yaml",
            _distill(config, model_file, ctc_kl=0, decoder_kl=0),
        )
    with pytest.raises(ValueError, match="unknown keys"):
        make_student(config, tmp_path / "b.yaml", _distill(config, model_file, tau=2))
    # missing files: building (and decoding) works, training says what is missing
    missing = make_student(
        config, tmp_path / "c.yaml", _distill(config, tmp_path / "nope.pth")
    )
    missing.eval()(**_batch())
    with pytest.raises(FileNotFoundError, match="teacher_model"):
        missing.train()(**_batch())
    other = CHARS[:2] + ["x"] + CHARS[3:]
    tokens = make_student(
        config, tmp_path / "d.yaml", _distill(config, model_file), tokens=other
    )
    with pytest.raises(ValueError, match="token list"):
        tokens.train()(**_batch())
    enc_conf = dict(TEACHER["encoder_conf"], input_layer="conv2d6")
    rate = make_student(
        config, tmp_path / "e.yaml", _distill(config, model_file), encoder_conf=enc_conf
    )
    with pytest.raises(ValueError, match="frame rates differ"):
        rate.train()(**_batch())


# ----- real speech: a short KD run, then the packed student without its teacher -------


@pytest.fixture(scope="module")
def kd_run(speechocean, tmp_path_factory):
    """A tiny teacher trained for a few steps, and a shared_moe_conformer student of
    another width trained for a few steps with every KD term on real speech; its
    files saved."""
    root = tmp_path_factory.mktemp("kd")
    tokens, batch, wavs = real_speech_batch(speechocean, 4, space="<space>")
    wav = wavs[0]
    config, model_file, teacher = make_teacher(root / "teacher", tokens=tokens)
    # A teacher that knows something about this batch (a random one predicts nearly
    # uniform posteriors, which the student's own loss then pulls it away from).
    teacher.train()
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(10):
        opt.zero_grad()
        teacher(**batch)[0].backward()
        opt.step()
    torch.save(teacher.state_dict(), model_file)
    enc_conf = dict(
        output_size=24, attention_heads=2, linear_units=32, num_blocks=2,
        macaron_style=True, rel_pos_type="latest", cnn_module_kernel=5,
        input_layer="conv2d", num_experts=2, top_k=1, share_group_size=2,
    )  # fmt: skip
    distill = _distill(config, model_file, ctc_kl=1.0, decoder_kl=1.0, hidden_mse=1.0)
    (root / "student").mkdir()
    torch.manual_seed(0)
    student = make_student(
        config,
        root / "student" / "config.yaml",
        distill,
        encoder="shared_moe_conformer",
        encoder_conf=enc_conf,
    ).train()
    assert isinstance(student.distill, Distiller) and student.distill.proj is not None
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    kd = []
    for _ in range(12):
        loss, stats, _ = student(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kd.append({k: float(stats[k]) for k in stats if k.startswith("loss_kd_")})
    torch.save(student.state_dict(), root / "student" / "model.pth")
    return dict(root=root, kd=kd, wav=wav, teacher_dir=root / "teacher")


def test_short_real_speech_run_with_kd_lowers_the_kd_losses(kd_run):
    kd = kd_run["kd"]
    assert set(kd[0]) == {"loss_kd_ctc", "loss_kd_dec", "loss_kd_hidden"}
    for name in kd[0]:
        first = sum(k[name] for k in kd[:2]) / 2
        last = sum(k[name] for k in kd[-2:]) / 2
        assert last < 0.9 * first, (name, [k[name] for k in kd])


def test_packed_student_decodes_through_speech2text_without_the_teacher(kd_run):
    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.bin.pack import main as pack_main
    from espnet2.main_funcs.pack_funcs import unpack

    root, student_dir = kd_run["root"], kd_run["root"] / "student"
    pack_main(
        [
            "asr", "--asr_train_config", str(student_dir / "config.yaml"),
            "--asr_model_file", str(student_dir / "model.pth"),
            "--outpath", str(root / "packed.zip"),
        ]
    )  # fmt: skip
    shutil.rmtree(kd_run["teacher_dir"])  # the teacher's config and model are gone
    files = unpack(str(root / "packed.zip"), str(root / "unpacked"))
    s2t = Speech2Text(
        asr_train_config=files["asr_train_config"],
        asr_model_file=files["asr_model_file"],
        device="cpu",
        token_type="char",
        beam_size=2,
        ctc_weight=0.3,
        maxlenratio=0.3,
    )
    model = s2t.asr_model
    assert model.distill is not None and model.distill.proj is not None
    state = torch.load(files["asr_model_file"], map_location="cpu")
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert "distill.proj.weight" in state
    speech, _ = sf.read(kd_run["wav"], dtype="float32")
    hyp = s2t(torch.from_numpy(speech))[0][0]
    assert isinstance(hyp, str)
    assert model.distill.__dict__["_teachers"] == {}  # decoding never loaded it
