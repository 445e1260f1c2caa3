"""`lowbit distill` and `lowbit qat` of an LLM on a tiny model: each student trains towards its
teacher (held-out KL falls), saves and loads back to the same logits, and bad input is one line."""

import json

import pytest
import torch

from lowbit import api, checkpoint
from lowbit.cli import main
from lowbit.models.tiny import save_tiny
from lowbit.nn.linear import QuantizedLinear
from lowbit.training.kd import KDConfig, distill, named_parameters_of, norm_parameters
from lowbit.training.qat import convert, prepare
from lowbit.training.trainer import TrainConfig

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families. ") * 30
HELD = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
        "never took up any book but the Baronetage. ") * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("t")
    (d / "train.txt").write_text(TEXT)
    (d / "held.txt").write_text(HELD)
    return d / "train.txt", d / "held.txt"


def _train_flags(texts, steps=12, lr=3e-3):
    return ["--text", texts[0], "--eval-text", texts[1], "--steps", steps, "--batch-size", 4, "--seq-len", 32,
            "--lr", lr, "--eval-windows", 2, "--eval-every", 100]


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, *capsys.readouterr()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_depth_student_distils_and_reloads(tmp_path, capsys, tiny_dir, texts):
    out = tmp_path / "student"
    code, _, err = run(capsys, "distill", tiny_dir, "--keep-layers", "0,2", *_train_flags(texts), "-o", out)
    assert code == 0, err
    rec = json.loads((out / "lowbit_train.json").read_text())
    assert rec["keep_layers"] == [0, 2] and rec["steps"] == 12
    assert rec["final_eval"]["kl"] < rec["first_eval"]["kl"]  # distillation brought it closer to the teacher
    m = api.load(str(out))
    assert len(m.model.model.layers) == 2 and m.model.config.num_hidden_layers == 2
    assert not (tmp_path / ".student.resume").exists()  # the state folder goes once the output is written


def test_drop_ranks_blocks(tmp_path, capsys, tiny_dir, texts):
    out = tmp_path / "s"
    code, _, err = run(capsys, "distill", tiny_dir, "--drop", 1, "--importance", "bi", *_train_flags(texts, steps=2),
                       "-o", out)
    assert code == 0, err
    assert "block importance" in err
    assert len(json.loads((out / "lowbit_train.json").read_text())["keep_layers"]) == 2


@pytest.mark.parametrize("tune", ["latent", "scales"])
def test_quantized_student_recovers(tmp_path, capsys, tiny_dir, texts, tune):
    q = tmp_path / "w2"
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", 2, "--per-channel", "-o", q)
    assert code == 0, err
    out = tmp_path / "w2kd"
    flags = _train_flags(texts, steps=20, lr=1e-3)
    flags[3] = texts[0]  # a random model generalises nothing: measure on the text it is trained on
    code, _, err = run(capsys, "distill", tiny_dir, "--student", q, "--tune", tune, *flags, "-o", out)
    assert code == 0, err
    _, _, rec = checkpoint.load(out)
    d = rec["distill"]
    assert d["final_eval"]["kl"] < 0.8 * d["first_eval"]["kl"]
    assert rec["method"]["method"] == "rtn" and rec["modules"]  # the same packed formats as before
    _, _, before = checkpoint.load(q)
    assert {k: v["format"] for k, v in rec["modules"].items()} == {k: v["format"] for k, v in before["modules"].items()}


@pytest.mark.parametrize("method,options,view,trained", [
    ("quip", ["--samples", 8, "--seq-len", 32], "TunableE8P", "sv"),
    ("aqlm", ["--samples", 4, "--seq-len", 32, "--option", "rounds=1", "--option", "kmeans_iters=4"], "TunableAQLM",
     "codebooks"),
])
def test_codebook_student_recovers_end_to_end(tmp_path, capsys, tiny_dir, texts, method, options, view, trained):
    """End-to-end fine-tuning of the codebook formats: QuIP#'s sign vectors and scales, AQLM's
    codebooks and row factors train against the teacher's logits; the codes stay exactly as they
    were."""
    q = tmp_path / method
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", method, *options, "-o", q)
    assert code == 0, err
    out = tmp_path / f"{method}kd"
    flags = _train_flags(texts, steps=20, lr=1e-3)
    flags[3] = texts[0]
    code, _, err = run(capsys, "distill", tiny_dir, "--student", q, *flags, "-o", out)
    assert code == 0, err
    assert "no trainable view" not in err and view in err
    d = checkpoint.read_record(out)["distill"]
    assert d["final_eval"]["kl"] < 0.9 * d["first_eval"]["kl"]
    fa = {n: m.weight_format for n, m in api.load(str(q)).model.named_modules() if isinstance(m, QuantizedLinear)}
    fb = {n: m.weight_format for n, m in api.load(str(out)).model.named_modules() if isinstance(m, QuantizedLinear)}
    assert fa.keys() == fb.keys() and fa
    for n in fa:
        assert fb[n].name == fa[n].name == method.replace("quip", "e8p") and torch.equal(fa[n].codes, fb[n].codes), n
        before = fa[n].incoherence().V.diagonal() if method == "quip" else fa[n].codebooks
        assert not torch.equal(before, getattr(fb[n], trained)), n


def test_qat_cli_packs_a_checkpoint(tmp_path, capsys, tiny_dir, texts):
    out = tmp_path / "qat"
    flags = _train_flags(texts, steps=20, lr=3e-4)
    flags[3] = texts[0]  # measured on the text it is trained on (a random model generalises nothing)
    code, _, err = run(capsys, "qat", tiny_dir, "--bits", 2, "--group-size", -1, "--lsq", *flags, "-o", out)
    assert code == 0, err
    _, _, rec = checkpoint.load(out)
    assert rec["method"]["method"] == "qat" and rec["method"]["scheme"]["bits"] == 2
    assert rec["training"]["final_eval"]["kl"] < 0.8 * rec["training"]["first_eval"]["kl"]
    assert all(v["format"] == "affine" for v in rec["modules"].values())


def test_trained_models_save_and_load_bit_identically(tmp_path, texts):
    """QAT in memory, packed, saved, loaded: the loaded model's logits equal the in-memory
    model's exactly (the packed weights are what the trained model computed with)."""
    from lowbit.core.scheme import QuantScheme
    from lowbit.training.data import packed_windows

    m = api.load(str(save_tiny(tmp_path / "t", "llama")))
    teacher = api.load(str(tmp_path / "t")).model
    w = packed_windows(m.tokenizer, TEXT, 32)
    scheme = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32)
    fq = prepare(m.model, scheme, learn_scale=True)
    ids = w[:2]
    distill(m.model, teacher, {**named_parameters_of(fq), **norm_parameters(m.model)}, w, None,
            TrainConfig(steps=4, batch_size=2, lr=1e-3), KDConfig(), progress=False)
    fq_logits = _logits(m.model, ids)
    convert(m.model, fq)
    packed = _logits(m.model, ids)
    torch.testing.assert_close(packed, fq_logits, rtol=1e-4, atol=1e-4)  # float kernels vs fake-quant: rounding
    m.record = {"method": {"method": "qat", "scheme": scheme.to_dict()}, "base_model": {"kind": "test"}}
    api.save(m, str(tmp_path / "ckpt"))
    loaded = api.load(str(tmp_path / "ckpt"))
    assert torch.equal(_logits(loaded.model, ids), packed)


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--keep-layers", "0,9"], "keep"),
    (["distill", "--drop", "3"], "--drop must be between 1 and 2"),
    (["distill", "--keep-layers", "a,b"], "comma-separated"),
    (["distill", "--keep-layers", "0", "--alpha", "2"], "alpha"),
    (["qat", "--bits", "4", "--group-size", "0"], "--group-size"),
])
def test_bad_input_is_one_line(tmp_path, capsys, tiny_dir, texts, argv, needle):
    code, _, err = run(capsys, argv[0], tiny_dir, *argv[1:], "--text", texts[0], "--eval-text", texts[1],
                       "--seq-len", 32, "--steps", 1, "-o", tmp_path / "o")
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("lowbit: error: ") and needle in lines[-1], err
    assert "Traceback" not in err


def test_interrupted_state_needs_resume(tmp_path, capsys, tiny_dir, texts):
    out = tmp_path / "s"
    state = tmp_path / ".s.resume"
    state.mkdir()
    (state / "trainer.pt").write_bytes(b"not a state")
    code, _, err = run(capsys, "distill", tiny_dir, "--keep-layers", "0,1", *_train_flags(texts, steps=1), "-o", out)
    assert code == 2 and "--resume" in err
    code, _, err = run(capsys, "distill", tiny_dir, "--keep-layers", "0,1", *_train_flags(texts, steps=1), "--resume",
                       "-o", out)
    assert code == 2 and "cannot read the training state" in err


def test_pruned_student_recovers_and_keeps_its_zeros(tmp_path, capsys, tiny_dir, texts):
    p = tmp_path / "pruned"
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--sparsity", 0.6, "--storage", "dense",
                       "-o", p)
    assert code == 0, err
    out = tmp_path / "pkd"
    flags = _train_flags(texts, steps=20, lr=1e-3)
    flags[3] = texts[0]
    code, _, err = run(capsys, "distill", tiny_dir, "--student", p, *flags, "-o", out)
    assert code == 0, err
    before, after = api.load(str(p)).model, api.load(str(out)).model
    d = checkpoint.read_record(out)["distill"]
    assert d["final_eval"]["kl"] < 0.8 * d["first_eval"]["kl"]
    changed = 0
    for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        if ".layers." in n and n.endswith("proj.weight"):
            assert torch.equal(a == 0, b == 0), n  # the same weights are zero, exactly
            changed += int(not torch.equal(a, b))
    assert changed > 0


def test_distilled_students_save_and_load_bit_identically(tmp_path):
    """A depth student and a recovered quantized student, trained in memory, written the way the
    command writes them and loaded back: the same logits, bit for bit."""
    from lowbit.commands._training import save_float_model
    from lowbit.core.scheme import QuantScheme
    from lowbit.training import depth
    from lowbit.training.data import packed_windows
    from lowbit.training.tunable import make_trainable, restore

    d = save_tiny(tmp_path / "t", "llama", num_hidden_layers=3)
    teacher = api.load(str(d))
    w = packed_windows(teacher.tokenizer, TEXT, 32)
    ids = w[:2]
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3)

    student = depth.drop_blocks(teacher.model, [0, 2])
    distill(student, teacher.model, {n: p for n, p in student.named_parameters() if ".layers." in n}, w, None,
            cfg, KDConfig(), progress=False)
    want = _logits(student, ids)
    save_float_model(student, teacher.tokenizer, str(tmp_path / "depth"), {"test": True})
    assert torch.equal(_logits(api.load(str(tmp_path / "depth")).model, ids), want)

    q = api.load(str(d))
    api.quantize(q, "rtn", QuantScheme(bits=3, symmetric=True, granularity="group", group_size=32), progress=False)
    standins = make_trainable(q.model, "scales")
    distill(q.model, teacher.model, {**named_parameters_of(standins), **norm_parameters(q.model)}, w, None, cfg,
            KDConfig(), progress=False)
    restore(q.model, standins, keep=True)
    want = _logits(q.model, ids)
    api.save(q, str(tmp_path / "rec"))
    assert torch.equal(_logits(api.load(str(tmp_path / "rec")).model, ids), want)


def test_hidden_state_matching_pairs_kept_blocks_with_their_teacher_blocks(tmp_path, capsys, tiny_dir, texts):
    """--hidden adds the matched-block loss: a depth student's block j is compared with the teacher
    block it was copied from (keep[j]); the loss reaches the history and the run finishes."""
    out = tmp_path / "h"
    code, _, err = run(capsys, "distill", tiny_dir, "--keep-layers", "0,2", "--hidden", 0.5,
                       *_train_flags(texts, steps=3), "-o", out)
    assert code == 0, err
    from lowbit.training.kd import kd_loss_fn

    teacher = api.load(str(tiny_dir)).model
    from lowbit.training import depth

    student = depth.drop_blocks(teacher, [0, 2])
    ids = torch.randint(0, 90, (1, 16))
    _, right = kd_loss_fn(teacher, KDConfig(hidden=1.0), [0, 2])(student, ids)
    _, wrong = kd_loss_fn(teacher, KDConfig(hidden=1.0), [1, 2])(student, ids)
    # block 0 is the teacher's block 0 on the same input: its pair adds nothing; the wrong pairing
    # compares it with the teacher's block 1 (the last pair, the final states, is the same in both)
    assert right["hidden"] + 1e-3 < wrong["hidden"]
