"""Training on a real MNIST subset: learns, is deterministic, checkpoints round-trip."""

import json

import pytest
import torch

from robustdata.train.attacks import Linf, PGDConfig, fgsm_rs, pgd_attack
from robustdata.config import TrainParams
from robustdata.data.ingest import ingest_split
from robustdata.data.memory import load_in_memory
from robustdata.data.sources import MnistMirror
from robustdata.errors import DataError, IntegrityError
from robustdata.io import sha256_file
from robustdata.train.training import (
    accuracy_report, adversarial_predict, load_checkpoint, predict, save_checkpoint, seeded_model, subset,
    train_model,
)


@pytest.fixture(scope="module")
def mnist_subsets(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("mnist")
    source = MnistMirror(cache_dir=cache_dir)
    ingest_split(source, "train", root / "train", shard_size=1000, limit=3000, progress=False)
    ingest_split(source, "test", root / "test", shard_size=1000, limit=1000, progress=False)
    return load_in_memory(root / "train", progress=False), load_in_memory(root / "test", progress=False)


def train_small(data, seed=0, epochs=1, adversary=None):
    model = seeded_model("small_cnn", 10, 1, 28, init_seed=seed)
    history = train_model(model, data, TrainParams(epochs=epochs, batch_size=64, lr=0.05, label_smoothing=0.0),
                          torch.Generator().manual_seed(seed), adversary=adversary, progress=False)
    return model, history


def test_training_learns_and_is_deterministic(mnist_subsets):
    train, test = mnist_subsets
    a, history = train_small(train, epochs=2)
    b, _ = train_small(train, epochs=2)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    report = accuracy_report(predict(a, test.images), test.labels, 10)
    assert report["accuracy"] > 0.9  # 3k images, two epochs; chance is 0.1
    assert history[1]["loss"] < history[0]["loss"]
    c, _ = train_small(train, seed=1)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_robust_accuracy_is_below_clean(mnist_subsets):
    train, test = mnist_subsets
    model, _ = train_small(train)
    clean = accuracy_report(predict(model, test.images[:200]), test.labels[:200], 10)["accuracy"]
    attack = PGDConfig(Linf(0.3), steps=10, step_size=0.05, restarts=2)
    robust = accuracy_report(adversarial_predict(model, test.images[:200], test.labels[:200], attack,
                                                 torch.Generator().manual_seed(0)), test.labels[:200], 10)["accuracy"]
    assert robust <= clean and robust < 0.5  # a standard model is not robust at eps 0.3


@pytest.mark.parametrize("method", ["fgsm_rs", "pgd"])
def test_adversarial_training_restores_the_models_mode_and_draws_only_from_its_generators(mnist_subsets, method):
    """Anything that changes state restores it (DESIGN.md section 6): FGSM runs in the mode training gives it
    (train); PGD attacks in eval mode and hands the model back in train mode, with its parameters still
    trainable. Randomness comes from the explicit generators: the global stream is left as it was."""
    train, _ = mnist_subsets
    train = subset(train, 512)
    eps, attack_stream = 0.3, torch.Generator().manual_seed(0)
    pgd = PGDConfig(Linf(eps), steps=3, step_size=0.1)
    inner = {"fgsm_rs": lambda m, x, y: fgsm_rs(m, x, y, eps, 0.375, attack_stream),
             "pgd": lambda m, x, y: pgd_attack(m, x, y, pgd, generator=attack_stream)}[method]
    calls = []

    def adversary(model, x, y):
        modes = []  # the mode of every forward pass inside the attack
        hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        try:
            x_adv = inner(model, x, y)
        finally:
            hook.remove()
        calls.append({"inside": set(modes), "after": model.training,
                      "trainable": all(p.requires_grad for p in model.parameters()),
                      "in_ball": bool(((x_adv - x).abs() <= eps + 1e-6).all()),
                      "in_cube": bool((x_adv >= 0).all() and (x_adv <= 1).all()), "moved": not torch.equal(x_adv, x)})
        return x_adv

    global_rng, attack_rng = torch.get_rng_state(), attack_stream.get_state()
    model, history = train_small(train, adversary=adversary)
    assert torch.equal(torch.get_rng_state(), global_rng), "training drew from the global random stream"
    assert not torch.equal(attack_stream.get_state(), attack_rng), "the attack did not draw from its generator"
    assert len(calls) == 8 and len(history) == 1 and history[0]["loss"] > 0
    expected_inside = {True} if method == "fgsm_rs" else {False}
    for call in calls:
        assert call["inside"] == expected_inside, call
        assert call["after"] is True and call["trainable"], call  # what the next training step needs
        assert call["in_ball"] and call["in_cube"] and call["moved"], call
    assert not model.training  # train_model hands back a model ready for inference


def test_checkpoint_round_trip(mnist_subsets, tmp_path):
    train, test = mnist_subsets
    model, _ = train_small(train)
    sidecar = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 28}
    save_checkpoint(tmp_path / "m.pt", model, sidecar)
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta == {**sidecar, "weights_sha256": sha256_file(tmp_path / "m.pt")}
    assert torch.equal(predict(loaded, test.images), predict(model, test.images))
    (tmp_path / "m.pt").write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match="altered"):
        load_checkpoint(tmp_path / "m.pt")
    # garbage whose hash the sidecar vouches for: still never unpickled, a clear error
    (tmp_path / "m.json").write_text(json.dumps({**meta, "weights_sha256": sha256_file(tmp_path / "m.pt")}))
    with pytest.raises(DataError, match="not a loadable state_dict"):
        load_checkpoint(tmp_path / "m.pt")


def test_train_and_evaluate_flows_write_consistent_reports(tmp_path):
    """The Prefect flows end to end on a small MNIST ingest; the markdown holds the JSON's numbers."""
    import json

    from robustdata.flows.train import evaluate_flow, train_flow
    from robustdata.config import AdversarialParams, AttackParams, EvaluateParams, TrainParams
    from robustdata.data.sources import MnistMirror

    data = tmp_path / "mnist"
    source = MnistMirror()
    for split, n in [("train", 2000), ("val", 300), ("test", 300)]:
        ingest_split(source, split, data / split, shard_size=1000, limit=n, progress=False)
    standard = train_flow(TrainParams(data=data, out=tmp_path / "standard", epochs=1, batch_size=64))
    robust = train_flow(TrainParams(data=data, out=tmp_path / "robust", epochs=1, batch_size=64, optimizer="adam",
                                    lr=0.005, adversarial=AdversarialParams(guard_size=100)))
    assert standard["val_accuracy"] > 0.8 and robust["epochs_run"] == 1
    sidecar = json.loads((tmp_path / "robust" / "model.json").read_text())
    assert sidecar["params"]["adversarial"]["eps"] == 0.3 and "val_pgd10_accuracy" in sidecar["history"][0]
    result = evaluate_flow(EvaluateParams(
        models=[tmp_path / "standard", tmp_path / "robust"], data=data / "test", limit=100,
        attacks=[AttackParams(eps=0.3, steps=5, step_size=0.1, restarts=2)], out=tmp_path / "report"))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    summary = (tmp_path / "report" / "summary.md").read_text()
    for r in result["results"]:
        name = r["model"].split("/")[-1]
        clean, robust_acc = metrics[name]["clean_accuracy"], metrics[name]["robust_linf_0.3"]
        assert robust_acc <= r["robust"][0]["clean_accuracy_same_images"]
        assert f"{100 * clean:.2f}%" in summary and f"{100 * robust_acc:.2f}%" in summary
