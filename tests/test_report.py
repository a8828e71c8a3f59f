"""Reports: planted poisons show up in the numbers, user strings are escaped in HTML and markdown, numbers
print the same way everywhere (n = 1 never as "± 0.0"), PNGs are reproducible, artifact rows are flat."""

from __future__ import annotations

import ast
import copy
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import robustdata.report
import robustdata.report.figures
from conftest import markdown_rows, tree_digest
from robustdata.errors import RobustDataError
from robustdata.report.documents import audit_markdown, write_audit_report
from robustdata.report.evaluation import evaluation_markdown, evaluation_rows
from robustdata.report.formats import mean_std, number, percent
from robustdata.report.render import DocTable, render_html, render_markdown
from robustdata.report.results_page import write_results_page
from robustdata.report.robustify import metric_rows, run_rows, write_report

NAMES = ["airplane", "cat", "dog"]
SIZES = [60, 80, 60]  # samples per class; the 20 poisons sit in class 1
POISON_CLASS, HIDDEN_POISONS = 1, 2  # 2 of the 20 poisons score like clean samples, so TPR < 1
LOOP = {"rows": [{"model": "suspect", "train_samples": 200, "clean_accuracy": 0.9931, "asr": 0.998},
                 {"model": "filtered", "train_samples": 178, "clean_accuracy": 0.9929, "asr": 0.004}]}


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the report library never imports prefect."""


def binary_metrics(truth: np.ndarray, flagged: np.ndarray) -> dict:
    tp, fp = int((truth & flagged).sum()), int((~truth & flagged).sum())
    fn, tn = int((truth & ~flagged).sum()), int((~truth & ~flagged).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "tpr": tp / (tp + fn) if tp + fn else None,
            "fpr": fp / (fp + tn) if fp + tn else None, "precision": tp / (tp + fp) if tp + fp else None}


def auroc(truth: np.ndarray, score: np.ndarray) -> float | None:
    """P(poison score > clean score), ties counted half (Mann-Whitney)."""
    pos, neg = score[truth], score[~truth]
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg)))


def planted(seed: int = 0, channels: int = 3, ground_truth: bool = True):
    """(summary, scores, images) following the audit's contract, with 20 poisons planted in class 1."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.arange(len(SIZES)), SIZES).astype(np.int32)
    poison = np.zeros(len(label), bool)
    poison[np.flatnonzero(label == POISON_CLASS)[:20]] = True
    methods = {}
    for m, separation in [("spectre", 30.0), ("spectral", 5.0)]:
        score = rng.standard_normal(len(label)) ** 2  # clean: chi-square(1), heavy-tailed like the real scores
        visible = poison.copy()
        visible[np.flatnonzero(poison)[:HIDDEN_POISONS]] = False
        score[visible] += separation + rng.random(visible.sum())
        methods[m] = score
    # spectre flags the top 22 of the poisoned class only; spectral the top 10 of every class.
    flags = {"spectre": top_in_class(methods["spectre"], label, {POISON_CLASS: 22}),
             "spectral": top_in_class(methods["spectral"], label, dict.fromkeys(range(len(SIZES)), 10))}
    columns = {"key": [f"k{i:04d}" for i in range(len(label))], "label": pa.array(label, pa.int32()),
               "is_poison": pa.array(poison if ground_truth else [None] * len(label), pa.bool_()),
               "source_label": pa.array([0 if p else None for p in poison], pa.int32())}
    for m in methods:
        columns[f"{m}_score"], columns[f"{m}_flagged"] = methods[m], flags[m]
    scores = pa.table(columns)
    images = torch.from_numpy(rng.integers(0, 256, (len(label), channels, 8, 8), dtype=np.uint8))
    return summary_of(label, poison, methods, flags, ground_truth), scores, images


def top_in_class(score: np.ndarray, label: np.ndarray, counts: dict[int, int]) -> np.ndarray:
    flagged = np.zeros(len(score), bool)
    for c, k in counts.items():
        rows = np.flatnonzero(label == c)
        flagged[rows[np.argsort(-score[rows])[:k]]] = True
    return flagged


def summary_of(label, poison, methods, flags, ground_truth: bool) -> dict:
    removal = flags["spectre"]
    classes = [{"label": c, "name": NAMES[c], "n": int((label == c).sum()), "budget": None,
                "flagged": int(removal[label == c].sum()), "poisoned": c == POISON_CLASS,
                "estimated_poisons": int(removal[label == c].sum()), "statistic": 9.5 if c == POISON_CLASS else 1.0 + c,
                "threshold": 4.2, "poisons": int(poison[label == c].sum()) if ground_truth else None}
               for c in range(len(SIZES))]
    summary_methods = {}
    for m, score in methods.items():
        metrics = None
        if ground_truth:
            overall = {**binary_metrics(poison, flags[m]), "auroc": auroc(poison, score), "auprc": 0.9,
                       "recall_at_budget": binary_metrics(poison, flags[m])["tpr"]}
            per_class = [{"label": c, **binary_metrics(poison[label == c], flags[m][label == c]),
                          "auroc": auroc(poison[label == c], score[label == c]), "auprc": None}
                         for c in range(len(SIZES))]
            metrics = {"overall": overall, "per_class": per_class}
        summary_methods[m] = {"flagged": int(flags[m].sum()), "metrics": metrics}
    return {"removal_method": "spectre", "layer": "last_conv", "mode": "auto", "eps": None,
            "num_samples": len(label), "num_flagged": int(removal.sum()), "ground_truth": ground_truth,
            "classes": classes, "methods": summary_methods, "seconds": {"features": 4.1, "scoring": 0.6}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    summary, scores, images = planted()
    out = tmp_path_factory.mktemp("report")
    return summary, scores, images, out, write_audit_report(out, summary, scores, images, loop=LOOP)


def test_report_writes_its_files(report):
    *_, out, paths = report
    assert set(paths) == {"markdown", "html", "score_histograms", f"suspicious_{POISON_CLASS}"}
    assert paths["markdown"] == out / "report.md" and paths["score_histograms"] == out / "figures/score_histograms.png"
    assert all(p.is_file() for p in paths.values())
    assert not list(out.rglob("*.tmp"))  # no temporary left behind


def test_markdown_holds_the_planted_numbers(report):
    summary, scores, *_, paths = report
    text = paths["markdown"].read_text()
    truth = scores["is_poison"].to_numpy(zero_copy_only=False)
    flagged = scores["spectre_flagged"].to_numpy(zero_copy_only=False)
    tp, fn = int((truth & flagged).sum()), int((truth & ~flagged).sum())
    assert fn >= HIDDEN_POISONS  # the planted misses are missed, so TPR below is not trivially 100%
    assert f"Flagged {flagged.sum()} of {len(truth)} samples" in text
    assert f"Classes judged poisoned: cat (≈{summary['classes'][POISON_CLASS]['estimated_poisons']} poisons)." in text
    assert f"TPR {100 * tp / (tp + fn):.2f}%" in text and f"({tp + fn} poisons)" in text
    assert "| suspect | 200 | 99.31% | 99.80% |" in text  # the loop table
    assert "spectral" in text and "spectre (removal)" in text  # the methods table
    assert "![spectre score per class](figures/score_histograms.png)" in text
    # The markdown and HTML show the same numbers.
    html_text = paths["html"].read_text()
    assert f"TPR {100 * tp / (tp + fn):.2f}%" in html_text and '<img src="figures/score_histograms.png"' in html_text


def test_undefined_metrics_print_a_dash(report):
    summary, *_ = report
    lines = audit_markdown(summary).splitlines()
    dog = next(line for line in lines if line.startswith("| dog |"))
    assert dog.split(" | ")[-1] == "0.00% |" and "–" in dog  # class 2 has no poisons: TPR undefined


def test_pngs_decode_and_are_byte_identical_across_runs(report, tmp_path):
    summary, scores, images, out, paths = report
    for name in ["score_histograms", f"suspicious_{POISON_CLASS}"]:
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250
            assert len(image.convert("RGB").getcolors(1 << 16)) > 10  # something is drawn
    again = write_audit_report(tmp_path, summary, scores, images, loop=LOOP)
    assert set(again) == set(paths)
    assert tree_digest(tmp_path) == tree_digest(out)


HOSTILE = ["a|b*", "<script>alert(1)</script>", "$\\frac{$"]  # class names are a user's folder names


def test_user_strings_are_escaped(tmp_path):
    summary, scores, images = planted()
    # "$...$" would be parsed as LaTeX by matplotlib (and this one fails to parse): names are plain text.
    paths = write_audit_report(tmp_path, summary, scores, images, classes=HOSTILE)
    html_text, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    assert "<script>" not in html_text and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "<td>a|b*</td>" in html_text  # HTML needs no escape for these; the cell stays one cell
    assert "<script>" not in markdown and "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    assert "| a\\|b\\* |" in markdown  # a pipe must not split a table cell, a star must not start emphasis
    assert markdown_rows(markdown)["a\\|b\\*"][:2] == ["0", "60"]  # the row still has its own cells


def test_results_page_escapes_model_names(tmp_path):
    loop = {"<script>x</script>": {"clean_accuracy": 0.99313, "asr": 0.0009}, "a|b*": {"clean_accuracy": 0.5,
                                                                                         "asr": None}}
    paths = write_results_page(tmp_path, {"audit_loop": loop}, [])
    html_text, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    assert "<script>" not in html_text and "<td>&lt;script&gt;x&lt;/script&gt;</td><td>99.31%</td><td>0.09%</td>" \
        in html_text
    assert "<script>" not in markdown and "| &lt;script&gt;x&lt;/script&gt; | 99.31% | 0.09% |" in markdown
    assert "| a\\|b\\* | 50.00% | – |" in markdown


def test_html_is_autoescaped_by_the_templates_and_markdown_by_its_filter():
    doc = [("<h1>", [["<i>x</i>", "`code` *em* [link](u)"], "<p>"]), ("t", [DocTable(["<th>"], [["<td>|"]], [True])])]
    html_text, markdown = render_html(doc), render_markdown(doc)
    assert "<title>&lt;h1&gt;</title>" in html_text and "<li>&lt;i&gt;x&lt;/i&gt;</li>" in html_text
    assert "<p>&lt;p&gt;</p>" in html_text and '<tr class="marked"><td>&lt;td&gt;|</td></tr>' in html_text
    assert markdown.startswith("# &lt;h1&gt;\n") and "- \\`code\\` \\*em\\* \\[link\\](u)" in markdown
    assert "\n&lt;p&gt;\n" in markdown and "| &lt;td&gt;\\| |" in markdown


def test_every_html_page_shares_one_layout(report, tmp_path):
    *_, paths = report
    page = write_results_page(tmp_path, {"audit_loop": {"m": {"clean_accuracy": 1.0, "asr": 0.0}}}, [])["html"]

    def style(path):
        text = path.read_text()
        return text[text.index("<style>"):text.index("</style>")]

    assert style(paths["html"]) == style(page) and "tr.marked td" in style(page)


def test_report_without_ground_truth_or_loop(tmp_path):
    summary, scores, images = planted(channels=1, ground_truth=False)
    assert scores["is_poison"].null_count == scores.num_rows
    for c in summary["classes"]:
        c["poisoned"] = False
    paths = write_audit_report(tmp_path, summary, scores, images)
    # No class is judged poisoned: the grid shows the class with the highest statistic.
    assert set(paths) == {"markdown", "html", "score_histograms", f"suspicious_{POISON_CLASS}"}
    text = paths["markdown"].read_text()
    assert "No class judged poisoned." in text and "No ground truth" in text
    assert "TPR" not in text and "Before and after" not in text
    with Image.open(paths[f"suspicious_{POISON_CLASS}"]) as image:
        assert image.width >= 400


def test_markdown_reads_without_figures(report):
    summary, *_ = report
    text = audit_markdown(summary, LOOP)
    assert text.startswith("# Poisoning audit\n") and "![" not in text and "## Figures" not in text


def test_stale_grids_are_removed(report, tmp_path):
    summary, scores, images, out, _ = report
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)  # an earlier run that judged class 1 poisoned
    summary = copy.deepcopy(summary)
    summary["classes"][POISON_CLASS]["poisoned"], summary["classes"][2]["poisoned"] = False, True
    paths = write_audit_report(tmp_path, summary, scores, images)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["score_histograms.png", "suspicious_2.png"]
    assert "(label 2)](figures/suspicious_2.png)" in paths["markdown"].read_text()


def test_a_failed_figure_leaves_no_report(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    summary, scores, images = planted()
    monkeypatch.setattr(robustdata.report.figures, "suspicious_figure", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_audit_report(tmp_path, summary, scores, images)
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.html").exists()


def test_bad_inputs_are_refused(tmp_path):
    summary, scores, images = planted()
    with pytest.raises(RobustDataError, match="lacks columns .'spectre_score'"):
        write_audit_report(tmp_path, summary, scores.drop_columns(["spectre_score"]), images)
    with pytest.raises(RobustDataError, match="must be aligned"):
        write_audit_report(tmp_path, summary, scores, images[:-1])
    with pytest.raises(RobustDataError, match="not an audited method"):
        write_audit_report(tmp_path, {**summary, "removal_method": "magic"}, scores, images)
    with pytest.raises(RobustDataError, match="2 class names"):
        write_audit_report(tmp_path, summary, scores, images, classes=["a", "b"])
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# One way to print a number, in every report


def test_formatters():
    assert percent(0.99313) == "99.31%" and percent(0.0) == "0.00%" and percent(None) == "–"
    assert number(0.95556, ".4f") == "0.9556" and number(None, "d") == "–"
    assert mean_std({"mean": 0.9485, "std": 0.0031, "n": 3}) == "94.8 ± 0.3"
    assert mean_std({"mean": 0.9485, "std": 0.0031, "n": 3}, unit="%") == "94.8 ± 0.3%"
    assert mean_std({"mean": 0.95, "std": 0.0, "n": 1}) == "95.0 (n=1)"  # one seed: no spread to show
    assert mean_std({"mean": 0.95, "std": 0.0, "n": 1}, unit="%") == "95.0% (n=1)"
    assert mean_std(None) == "–"


def stats(mean: float, std: float, n: int) -> dict:
    return {"mean": mean, "std": std, "n": n}


def robustify_results(n: int) -> dict:
    """Two datasets evaluated over n seeds, under one attack."""
    std = 0.0 if n == 1 else 0.012
    runs = [{"seed": s, "lr": 0.1, "model": f"m{s}", "clean_accuracy": 0.95, "robust": {"linf_0.1": 0.765}}
            for s in range(n)]
    return {kind: {"clean_accuracy": stats(mean, std, n), "robust": {"linf_0.1": stats(0.765 + d, std, n)},
                   "runs": runs} for kind, mean, d in (("original", 0.9485, 0.0), ("rand", 0.803, -0.62))}


@pytest.mark.parametrize("n", [1, 3])
def test_robustify_report_and_results_page_print_seeds_the_same_way(tmp_path, n):
    results = robustify_results(n)
    paths = write_report(tmp_path / "robustify", results, {}, {})
    summary = {"results": results}
    page = write_results_page(tmp_path / "site", {"robustify": summary}, [])
    report_md, page_md = paths["markdown"].read_text(), page["markdown"].read_text()
    if n == 1:
        expected = {"D": ["94.8 (n=1)", "76.5 (n=1)"], "D_rand": ["80.3 (n=1)", "14.5 (n=1)"]}
        assert "D_rand: 80.3% (n=1) on the original test set" in report_md
    else:
        expected = {"D": ["94.8 ± 1.2", "76.5 ± 1.2"], "D_rand": ["80.3 ± 1.2", "14.5 ± 1.2"]}
        assert "D_rand: 80.3 ± 1.2% on the original test set" in report_md
    report_rows, page_rows = markdown_rows(report_md), markdown_rows(page_md)
    assert report_rows["trained on"] == ["seeds", "lr", "clean %", "linf eps 0.1 %", "paper CIFAR-10 clean",
                                         "paper robust (L2 0.25)"]
    for name, cells in expected.items():
        assert report_rows[name][:4] == [str(n), "0.1", *cells] and page_rows[name] == [str(n), *cells]
    for text in (report_md, page_md, paths["html"].read_text(), page["html"].read_text()):
        assert "± 0.0" not in text


EVALUATION = [{"model": "models/standard", "arch": "small_cnn", "trained_adversarially": False,
               "clean": {"accuracy": 0.9939, "per_class": [0.998, 0.9892]},
               "robust": [{"threat": "linf", "eps": 0.3, "steps": 50, "restarts": 2, "accuracy": 0.0, "n": 200}]},
              {"model": "models/<robust>", "arch": "small_cnn", "trained_adversarially": True,
               "clean": {"accuracy": 0.9615, "per_class": [0.9918, 0.9495]},
               "robust": [{"threat": "linf", "eps": 0.3, "steps": 50, "restarts": 2, "accuracy": 0.775, "n": 200}]}]


def test_evaluation_summary_keeps_its_numbers_and_tables():
    assert evaluation_markdown(EVALUATION) == (
        "# Evaluation\n\n"
        "| model | arch | adversarially trained | clean accuracy | linf eps 0.3 (PGD-50 x2) |\n|---|---|---|---|---|\n"
        "| standard | small_cnn | no | 99.39% | 0.00% (n=200) |\n"
        "| &lt;robust&gt; | small_cnn | yes | 96.15% | 77.50% (n=200) |\n\n"
        "Robust accuracy is measured on the first n test images; clean accuracy on all of them.\n\n"
        "## Per-class clean accuracy\n\n| model | 0 | 1 |\n|---|---|---|\n"
        "| standard | 99.80% | 98.92% |\n| &lt;robust&gt; | 99.18% | 94.95% |\n")


# ---------------------------------------------------------------------------------------------------------------
# Prefect table artifacts: flat rows of numbers, not rendered text


def test_artifact_rows_are_flat_numbers():
    assert evaluation_rows(EVALUATION)[1] == {"model": "<robust>", "arch": "small_cnn",
                                              "adversarially_trained": True, "clean_accuracy": 0.9615,
                                              "robust_linf_0.3": 0.775}
    runs = robustify_results(2)["original"]["runs"]
    assert run_rows(runs) == [{"seed": s, "lr": 0.1, "model": f"m{s}", "clean_accuracy": 0.95,
                               "robust_linf_0.1": 0.765} for s in (0, 1)]
    metrics = {"rand": {"clean_accuracy": 0.8}, "original": {"clean_accuracy": 0.95, "robust_linf_0.1": 0.7}}
    assert metric_rows(metrics) == [{"dataset": "D", "clean_accuracy": 0.95, "robust_linf_0.1": 0.7},
                                    {"dataset": "D_rand", "clean_accuracy": 0.8}]


def test_report_functions_are_short():
    """DESIGN.md section 6: short functions; none in the report library runs past 60 lines."""
    package = Path(robustdata.report.__file__).parent
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(package.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long
