"""Robust / non-robust feature datasets on a real MNIST subset: the builders do what Ilyas et al. say, and
a killed build resumes to the same bytes."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from robustdata.train.attacks import per_sample_norm
from robustdata.robustify.sharded import BuildPlan, finish, prepare, shard_seed, write_built_shard
from robustdata.config import BuildParams, TrainParams
from robustdata.data.ingest import ingest_split
from robustdata.data.manifest import open_dataset, read_manifest
from robustdata.data.memory import load_in_memory
from robustdata.data.sources import MnistMirror
from robustdata.errors import RobustDataError
from robustdata.train.models import representation
from robustdata.robustify.builders import (StepConfig, average_pool_gradients, build_batch, frozen, input_gradients,
                                  invert_representation, other_indices, relative_distance, smooth_relu_gradients,
                                  target_labels, targeted_perturbation)
from robustdata.train.training import predict, save_checkpoint, seeded_model, train_model
from robustdata.robustify.recipe import step_config
from conftest import markdown_rows, random_samples, tree_digest


@pytest.fixture(scope="module")
def mnist(tmp_path_factory, cache_dir):
    """A 2,000-image MNIST ingest (train, val) and a small CNN trained on it for one epoch."""
    root = tmp_path_factory.mktemp("robustify")
    source = MnistMirror(cache_dir=cache_dir)
    ingest_split(source, "train", root / "mnist" / "train", shard_size=1000, limit=2000, progress=False)
    ingest_split(source, "val", root / "mnist" / "val", shard_size=1000, limit=500, progress=False)
    train = load_in_memory(root / "mnist" / "train", progress=False)
    model = seeded_model("small_cnn", 10, 1, 28, init_seed=0)
    train_model(model, train, TrainParams(epochs=1, batch_size=64, lr=0.05, label_smoothing=0.0),
                torch.Generator().manual_seed(0), progress=False)
    sidecar = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 28,
               "classes": train.classes, "params": TrainParams().model_dump(mode="json")}
    save_checkpoint(root / "model" / "model.pt", model, sidecar)
    return root, train, model.eval()


def floats(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0)


def test_smoothed_relu_gradients_are_sigmoid_of_beta_z_and_the_module_is_restored():
    relu, beta = torch.nn.ReLU(), 4.0
    z = torch.linspace(-3, 3, 61, requires_grad=True)
    with smooth_relu_gradients(torch.nn.Sequential(relu), beta):
        out = relu(z)
        (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.equal(out, z.clamp_min(0))  # outputs unchanged
    torch.testing.assert_close(grad, torch.sigmoid(beta * z.detach()))  # a dark unit still passes gradient
    (plain,) = torch.autograd.grad(relu(z).sum(), z)
    assert torch.equal(plain, (z > 0).float())  # plain ReLU again outside


@pytest.mark.parametrize("pool, size", [(torch.nn.MaxPool2d(2), 8), (torch.nn.MaxPool2d(2), 7),
                                        (torch.nn.MaxPool2d(3, stride=2, padding=1), 8)])
def test_average_pool_gradients_are_those_of_average_pooling_and_the_module_is_restored(pool, size):
    """Windows that tile the input (the broadcast path) and those that do not (aten's avg_pool2d_backward)."""
    z = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    plain_out = pool(z)
    weights = torch.randn(plain_out.shape, generator=torch.Generator().manual_seed(1))
    with average_pool_gradients(torch.nn.Sequential(pool), "avg"):
        out = pool(z)
        (grad,) = torch.autograd.grad((out * weights).sum(), z)
    assert torch.equal(out, plain_out)  # outputs unchanged
    average = torch.nn.functional.avg_pool2d(z, pool.kernel_size, pool.stride, pool.padding)
    (expected,) = torch.autograd.grad((average * weights).sum(), z)
    torch.testing.assert_close(grad, expected)  # every pixel of a window gets its share, not only the largest
    (plain,) = torch.autograd.grad((pool(z) * weights).sum(), z)
    assert not torch.allclose(plain, expected)  # the max pool's own gradient again outside
    with pytest.raises(RobustDataError, match="valid"):
        with average_pool_gradients(torch.nn.Sequential(pool), "median"):
            pass


class PoolingNet(torch.nn.Module):
    """A representation that is a 2x2 max pool of the image: the mechanism of small_cnn's pools, alone."""

    LAYERS = {"penultimate": "features"}

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Linear(14 * 14, 10)

    def forward(self, x):
        return self.head(self.features(x))


def test_inversion_through_average_pool_gradients_draws_whole_strokes_not_a_lattice_of_dots(mnist):
    """Planted: to match a max pool of x, max-pool gradients draw one pixel per window (the first, on a black
    start); average-pool gradients draw the whole window, so x's strokes come back whole."""
    _, train, _ = mnist
    targets, starts = floats(train.images[:64]), floats(train.images[64:128])
    strokes = (targets > 0.5) & (starts < 0.1)  # where x has a stroke and the start image none
    drawn = {}
    for pool_grad in ("max", "avg"):
        x_r, distance = invert_representation(PoolingNet(), targets, starts, "penultimate",
                                              StepConfig(100, 0.5, "linear", pool_grad=pool_grad))
        assert x_r.min() >= 0 and x_r.max() <= 1
        assert distance.median() < 0.1  # both match the representation: only what they draw differs
        drawn[pool_grad] = (x_r[strokes] > 0.3).float().mean().item()
    # max: about one stroke pixel in four (one per window); avg: all but the windows x0's strokes already fill
    assert drawn["max"] < 0.3 and drawn["avg"] > 0.8, drawn


def test_inversion_lowers_the_feature_distance_and_stays_in_the_unit_cube(mnist):
    _, train, model = mnist
    targets, starts = floats(train.images[:32]), floats(train.images[32:64])
    with torch.no_grad():
        goal = representation(model, targets, "penultimate")
        before = relative_distance(representation(model, starts, "penultimate"), goal)
    x_r, after = invert_representation(model, targets, starts, "penultimate", StepConfig(60, 0.5, "linear"))
    assert x_r.min() >= 0 and x_r.max() <= 1
    assert (after < before).all()
    assert after.median() < 0.5 * before.median()
    with torch.no_grad():  # the returned distance is that of the returned images
        assert torch.allclose(after, relative_distance(representation(model, x_r, "penultimate"), goal), atol=1e-5)


def test_targeted_perturbation_stays_in_the_ball_and_reaches_the_target(mnist):
    _, train, model = mnist
    x, y = floats(train.images[:64]), train.labels[:64]
    targets = target_labels("det", y, 10, torch.Generator().manual_seed(0))
    x_adv, loss = targeted_perturbation(model, x, targets, StepConfig(50, 0.2, eps=5.0))
    assert (per_sample_norm(x_adv - x).flatten() <= 5.0 + 1e-4).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (predict(model, x) == targets).float().mean() < 0.05
    assert (predict(model, x_adv) == targets).float().mean() > 0.8
    with torch.no_grad():
        clean_loss = torch.nn.functional.cross_entropy(model(x), targets, reduction="none")
    assert loss.shape == (64,) and (loss < clean_loss).all()


def test_det_labels_are_the_next_class_and_rand_labels_are_never_the_true_one():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(10, (5000,), generator=g)
    assert torch.equal(target_labels("det", y, 10, g), (y + 1) % 10)
    rand = target_labels("rand", y, 10, g)
    assert (rand != y).all() and rand.min() >= 0 and rand.max() <= 9
    # uniform over the other nine: every (y, t != y) pair appears
    assert len(set(zip(y.tolist(), rand.tolist()))) == 90


def test_start_images_are_other_images():
    g = torch.Generator().manual_seed(0)
    index = torch.arange(1000)
    starts = other_indices(index, 1000, g)
    assert (starts != index).all() and starts.min() >= 0 and starts.max() <= 999
    with pytest.raises(RobustDataError, match="at least 2"):
        other_indices(torch.arange(1), 1, g)


def test_builders_keep_or_replace_labels_as_the_paper_says(mnist):
    _, train, model = mnist
    index = torch.arange(40)
    config = StepConfig(5, 0.1)
    for kind in ("robust", "nonrobust"):
        built = build_batch(kind, model, index, train.images, train.labels, 10, "penultimate", config,
                            torch.Generator().manual_seed(0))
        assert torch.equal(built.labels, train.labels[index])
        assert (built.start_index != index).all() and built.final_distance.shape == (40,)
    built = build_batch("det", model, index, train.images, train.labels, 10, "penultimate",
                        StepConfig(5, 0.1, eps=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(built.labels, (train.labels[index] + 1) % 10) and built.start_index is None
    with pytest.raises(RobustDataError, match="valid"):
        build_batch("bogus", model, index, train.images, train.labels, 10, "penultimate", config,
                    torch.Generator().manual_seed(0))


def test_an_inversion_build_with_eps_stays_in_its_ball_around_the_start_image(mnist):
    """D_NR's eps reaches the descent through the build params: unbounded, the images move further."""
    root, train, model = mnist
    moved = {}
    for eps in (None, 1.0):
        params = BuildParams(**build_params(root, "nonrobust", eps=eps, steps=30, step_size=0.5))
        built = build_batch("nonrobust", model, torch.arange(64), train.images, train.labels, 10, "penultimate",
                            step_config(params), torch.Generator().manual_seed(0))
        moved[eps] = per_sample_norm(built.images - floats(train.images[built.start_index])).flatten()
    assert (moved[1.0] <= 1.0 + 1e-4).all() and moved[1.0].median() > 0.9
    assert moved[None].median() > 2.0


def test_builders_restore_the_model_state(mnist):
    _, train, model = mnist
    model.train()
    with frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    input_gradients(model, floats(train.images[:4]), train.labels[:4])
    assert model.training
    model.eval()


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_robust_model_gradients_are_on_the_caller_device(mnist, device):
    """The gradients come back on the device of the caller's model and images, and equal the CPU's. "meta"
    stands in for an accelerator on a machine without one: a tensor made on or moved to the CPU on the way
    (a stray .cpu(), a default-device torch.zeros) either lands on the wrong device or cannot be computed."""
    _, train, model = mnist
    x, y = floats(train.images[:4]), train.labels[:4]
    on_device = copy.deepcopy(model).to(device)
    grad = input_gradients(on_device, x.to(device), y.to(device))
    assert grad.device == torch.device(device) or (device == "cuda" and grad.device.type == "cuda")
    assert grad.shape == (4, 1, 28, 28) and grad.dtype == torch.float32
    if device != "meta":  # meta tensors have shapes and devices, no values
        reference = input_gradients(model, x, y)
        assert reference.abs().sum() > 0
        torch.testing.assert_close(grad.cpu(), reference, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------- resumable builds


def test_shard_seeds_are_independent_of_order():
    assert shard_seed(0, 3) == shard_seed(0, 3)
    assert len({shard_seed(0, i) for i in range(100)} | {shard_seed(1, i) for i in range(100)}) == 200


def test_partial_build_reuses_finished_shards_and_redoes_a_torn_one(tmp_path):
    plan = BuildPlan(tmp_path / "out", 25, 10, {"params": {"a": 1}})
    samples = random_samples(25)
    assert prepare(plan) == [0, 1, 2]
    write_built_shard(plan, 0, samples[:10])
    write_built_shard(plan, 1, samples[10:20])
    plan.shard_path(1).write_bytes(plan.shard_path(1).read_bytes()[:-1000])  # torn after its rows were written
    assert prepare(plan) == [1, 2]
    other = BuildPlan(tmp_path / "out", 25, 10, {"params": {"a": 2}})
    assert prepare(other) == [0, 1, 2]  # other params: nothing is reused
    for i, chunk in enumerate((samples[:10], samples[10:20], samples[20:])):
        write_built_shard(other, i, chunk)
    card = finish(other, {"name": "t", "classes": ["0", "1", "2"], "image_shape": [8, 8, 1], "inputs": {},
                          "params": {"a": 2}, "built_by": {"stage": "test"}})
    assert card["num_samples"] == 25 and not other.work.exists()
    dataset = open_dataset(tmp_path / "out" / "train")
    assert [s["name"] for s in dataset.card["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]


def test_finish_refuses_a_build_with_missing_shards(tmp_path):
    plan = BuildPlan(tmp_path / "out", 25, 10, {})
    prepare(plan)
    write_built_shard(plan, 0, random_samples(10))
    with pytest.raises(ValueError, match=r"missing shards \[1, 2\]"):
        finish(plan, {"name": "t", "classes": ["0", "1", "2"]})
    assert not (tmp_path / "out").exists()


def build_params(root, kind="robust", **overrides):
    section = {"kind": kind, "data": str(root / "mnist"), "model": str(root / "model"),
               "out": str(root / f"built-{kind}"), "steps": 10, "step_size": 0.1, "schedule": "linear",
               "limit": 600, "shard_size": 100, "batch_size": 50, "threads": 1, "seed": 0,
               "eps": None if kind in ("robust", "nonrobust") else 1.5}
    section.update(overrides)
    return section


def run_cli(root, params, *args, wait=True):
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": API_URL}
    command = [sys.executable, "-m", "robustdata", "build", "--params", str(path), *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def api(prefect_server):
    global API_URL
    API_URL = prefect_server


@pytest.mark.parametrize("kind", ["robust", "det"])
def test_killed_build_resumes_to_the_same_bytes(mnist, api, kind):
    """SIGKILL a real build process once two shards are done; the rerun builds only the rest and ends
    byte-identical to an uninterrupted build."""
    root, _, _ = mnist
    params = {f"build_{kind}": build_params(root, kind, out=str(root / f"killed-{kind}"), steps=40)}
    process = run_cli(root, params, "--kind", kind, wait=False)
    rows = root / f"killed-{kind}.partial" / "rows"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (rows.exists() and len(list(rows.glob("*.json"))) >= 2):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (root / f"killed-{kind}").exists()  # nothing that looks complete
    done = len(list(rows.glob("*.json")))
    assert 2 <= done < 6
    result = run_cli(root, params, "--kind", kind)
    assert result.returncode == 0, result.stderr
    assert f"{6 - done} of 6 shards built now" in " ".join(result.stdout.split())
    reference = {f"build_{kind}": build_params(root, kind, out=str(root / f"reference-{kind}"), steps=40)}
    result = run_cli(root, reference, "--kind", kind)
    assert result.returncode == 0, result.stderr
    assert "6 of 6 shards built now" in " ".join(result.stdout.split())
    assert tree_digest(root / f"killed-{kind}") == tree_digest(root / f"reference-{kind}")


def test_built_dataset_records_its_lineage(mnist, api):
    root, train, model = mnist
    out = root / "whole-robust"
    if not out.exists():
        result = run_cli(root, {"build_robust": build_params(root, out=str(out))}, "--kind", "robust")
        assert result.returncode == 0, result.stderr
    dataset = open_dataset(out / "train")
    manifest = read_manifest(dataset.manifest_path).to_pydict()
    assert manifest["origin_key"] == train.keys[:600] == manifest["key"]
    assert manifest["label"] == train.labels[:600].tolist() == manifest["source_label"]
    assert all(start in train.keys[:600] and start != key for start, key in zip(manifest["start_key"],
                                                                                 manifest["key"]))
    where = {key: i for i, key in enumerate(train.keys)}
    starts = torch.tensor([where[key] for key in manifest["start_key"]])
    with torch.no_grad():
        goal = representation(model, floats(train.images[:600]), "penultimate")
        before = relative_distance(representation(model, floats(train.images[starts]), "penultimate"), goal)
    after = torch.tensor(manifest["final_distance"], dtype=torch.float32)
    assert (after >= 0).all() and (after < before).float().mean() > 0.95
    assert dataset.card["inputs"]["manifest_sha256"] == open_dataset(root / "mnist" / "train").card["manifest"]["sha256"]
    assert dataset.card["params"]["steps"] == 10 and dataset.card["built_by"]["stage"] == "build_robust"
    assert (out / "val" / "card.json").exists()
    images = load_in_memory(out / "train", progress=False).images
    assert not torch.equal(images, train.images[:600])


def test_build_errors_are_one_line(mnist, api):
    root, _, _ = mnist
    result = run_cli(root, {"build_det": build_params(root, "det", eps=None)}, "--kind", "det")
    assert result.returncode == 2 and "needs eps" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(root, {}, "--kind", "sideways")
    assert result.returncode == 2 and "valid" in result.stderr
    result = run_cli(root, {"build_robust": build_params(root, model=str(root / "nowhere"))}, "--kind", "robust")
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_build_evaluate_and_report_end_to_end(mnist, api, tmp_path):
    """Every surface once, tiny: build all four kinds, train/evaluate classifiers on D and each D_*, report."""
    root, _, _ = mnist
    params = {f"build_{kind}": build_params(root, kind, out=str(tmp_path / kind), limit=200, steps=5)
              for kind in ("robust", "nonrobust", "rand", "det")}
    params["build_robust"]["relu_grad_beta"] = 4.0
    params["build_nonrobust"]["eps"] = 2.0
    params["robustify_eval"] = {
        "test": str(root / "mnist" / "val"), "val": str(root / "mnist" / "val"), "seeds": [0, 1],
        "lrs": [0.05], "fragile_lrs": [0.02, 0.05], "train": {"epochs": 1, "batch_size": 64},
        "attacks": [{"threat": "linf", "eps": 0.1, "steps": 3, "step_size": 0.05, "restarts": 1},
                    {"threat": "l2", "eps": 1.0, "steps": 3, "step_size": 0.5, "restarts": 2}],
        "limit": 40, "models": str(tmp_path / "models"), "out": str(tmp_path / "reports")}
    path = root / "params-e2e.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": API_URL}
    for kind in ("robust", "nonrobust", "rand", "det"):
        result = subprocess.run([sys.executable, "-m", "robustdata", "build", "--kind", kind, "--params", str(path)],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    for kind in ("original", "robust", "nonrobust", "rand", "det"):
        result = subprocess.run([sys.executable, "-m", "robustdata", "evaluate-built", "--kind", kind, "--params",
                                 str(path)], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        runs = json.loads((tmp_path / "reports" / f"{kind}.json").read_text())
        assert runs["seeds"] == [0, 1] and set(runs["robust"]) == {"linf_0.1", "l2_1"}
        assert {r["lr"] for r in runs["runs"]} <= ({0.05} if kind in ("original", "robust") else {0.02, 0.05})
        for details in runs["details"]:  # robust accuracy never exceeds clean accuracy on the same images
            assert all(a["accuracy"] <= a["clean_accuracy_same_images"] for a in details["robust"])
        assert (tmp_path / "models" / kind / "seed1" / "model.pt").exists()
    result = subprocess.run([sys.executable, "-m", "robustdata", "robustify-report", "--params", str(path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"original", "robust", "nonrobust", "rand", "det"}
    markdown = (tmp_path / "reports" / "report.md").read_text()
    for kind, name in (("original", "D"), ("robust", "D_R"), ("det", "D_det")):
        mean = 100 * metrics[kind]["clean_accuracy"]
        assert f"| {name} |" in markdown.replace("\\_", "_") and f"{mean:.1f} ±" in markdown
    built = markdown_rows(markdown.split("## How each dataset was built")[1])
    assert [built[name][4] for name in ("D_R", "D_NR", "D_det")] == ["None", "2.0", "1.5"]  # eps (L2)
    figures = sorted((tmp_path / "reports" / "figures").glob("*.png"))
    assert len(figures) == 3 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    # DVC plots data: robust accuracy against eps per threat model, eps 0 being the clean accuracy
    linf = json.loads((tmp_path / "reports" / "plots" / "linf.json").read_text())
    assert [p["eps"] for p in linf] == [0.0, 0.1]
    assert linf[0]["D_R"] == metrics["robust"]["clean_accuracy"] and linf[1]["D"] == metrics["original"]["robust_linf_0.1"]

    # the results page: its table holds the numbers of the JSON metrics
    params.update({"results": {"out": str(tmp_path / "site")}, "evaluate": {"out": str(tmp_path / "none")},
                   "audit": {"report": str(tmp_path / "none")}, "audit_eval": {"out": str(tmp_path / "none")}})
    path.write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "robustdata", "results", "--params", str(path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = markdown_rows((tmp_path / "site" / "index.md").read_text())
    html = (tmp_path / "site" / "index.html").read_text()
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())["results"]
    for kind, name in (("original", "D"), ("robust", "D_R"), ("nonrobust", "D_NR"), ("rand", "D_rand"),
                       ("det", "D_det")):
        clean, linf_01 = summary[kind]["clean_accuracy"], summary[kind]["robust"]["linf_0.1"]
        assert clean["mean"] == metrics[kind]["clean_accuracy"]
        expected = {"clean %": f"{100 * clean['mean']:.1f} ± {100 * clean['std']:.1f}",
                    "linf eps 0.1 %": f"{100 * linf_01['mean']:.1f} ± {100 * linf_01['std']:.1f}"}
        row = dict(zip(rows["trained on"], rows[name]))
        assert {column: row[column] for column in expected} == expected
        assert all(value in html for value in expected.values())


def built_bytes(root, kind, out, **overrides):
    """Build through the CLI (a separate process, as DVC runs it); the digest of every output file."""
    params = {f"build_{kind}": build_params(root, kind, out=str(out), limit=400, steps=5, **overrides)}
    result = run_cli(root, params, "--kind", kind)
    assert result.returncode == 0, result.stderr
    return tree_digest(out)


def test_dask_build_is_byte_identical_to_a_single_process_build(mnist, api, tmp_path):
    """4 shards mapped over a 2-worker Dask LocalCluster (DaskTaskRunner) give the same bytes as one process."""
    root, _, _ = mnist
    single = built_bytes(root, "det", tmp_path / "single")
    on_dask = built_bytes(root, "det", tmp_path / "dask", dask="local", workers=2)
    assert len(single) > 4 and on_dask == single


def test_python_api_builds_the_same_dataset(mnist, api, tmp_path):
    """api.build(...) in this process equals the CLI's build; bad options are a RobustDataError."""
    from robustdata import api as robustdata

    root, _, _ = mnist
    reference = built_bytes(root, "rand", tmp_path / "cli")
    options = build_params(root, "rand", out=str(tmp_path / "api"), limit=400, steps=5)
    del options["kind"]
    result = robustdata.build("rand", **options)
    assert result["num_samples"] == 400 and tree_digest(tmp_path / "api") == reference
    with pytest.raises(RobustDataError, match="stepz"):
        robustdata.build("rand", stepz=3)
    with pytest.raises(RobustDataError, match="valid"):
        robustdata.build("sideways")
