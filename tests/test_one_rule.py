"""One meaning, one function: a second copy of a shared rule fails here before it can drift from the first.

Each rule names the one module allowed to implement it; the package's source is scanned for the patterns a
copy would need (a rename into place, a JSON encoder, a grayscale conversion, a set of image suffixes, a
threshold search, an age parser), and every module that imports the rule must take it from there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "covidxray"
SOURCES = {p.relative_to(PACKAGE).as_posix(): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}

RULES = [
    # (meaning, regex a copy needs, modules allowed to hold it)
    ("atomic rename into place", r"\bos\.replace\(", {"outputs.py", "data/download.py"}),
    # app/render_notebooks.py writes a Python string literal in papermill's style with json.dumps, not a JSON file
    ("JSON encoding", r"\bjson\.dumps?\(", {"outputs.py", "app/render_notebooks.py"}),
    ("JSON conversion of numpy types", r"def \w*json\w*\(", {"outputs.py", "runs/load.py"}),
    ("grayscale conversion", r"\.convert\(\s*[\"']L[\"']", {"data/images.py"}),
    ("the set of image suffixes", r"[\"']\.jpe?g[\"']\s*,\s*[\"']\.(png|jpe?g)[\"']", {"data/images.py"}),
    ("the decision-threshold rule", r"def \w*(youden|choose_threshold)\w*\(", {"metrics.py"}),
    ("the age parser", r"def _?(\w+_)?ages?\(|def parse_age", {"data/sources/base.py"}),
    ("the dataset summary reader", r"SUMMARY_NAME\)?\.read_text|summary\.json\"?\)?\.read_text", {"data/manifest.py"}),
    ("ownership of output folders", r"\bshutil\.rmtree\(",
     {"outputs.py", "data/download.py", "training/feature_cache.py"}),
    ("the OS-error message", r"errno\.errorcode", {"errors.py"}),
    ("the metric number format (percent)", r"\.1f\} ?%", {"metrics.py"}),
    ("the share format (heatmap mass and area)", r"\.2f\} \(\{|\.2f\} / \{|mass_share'\]:\.2f", {"metrics.py"}),
    # data/synthetic.py writes the synthetic sources in the real sources' own CSV layouts
    ("writing a CSV", r"\.to_csv\(|csv\.(Dict)?[wW]riter\(", {"outputs.py", "data/synthetic.py"}),
    # outputs.py holds the one reader (read_json) and the record readers, which treat another tool's JSON as no record
    ("reading a JSON file", r"json\.loads?\([^)]*(read_text|open)\(", {"outputs.py"}),
    ("a listed source file that is missing or leaves its folder", r"but not on disk", {"data/sources/base.py"}),
    ("saving a figure", r"\.savefig\(", {"evaluation/figures.py"}),
    ("decoding an image file", r"tf\.io\.decode_\w+\(|tf\.image\.decode_\w+\(|Image\.open\(", {"data/images.py"}),
    ("TensorFlow's log filter", r"cpu_feature_guard|absl::InitializeLog", {"tfenv.py"}),
    ("a progress bar (tqdm)", r"(?m)\btqdm\(|^\s*(from|import) tqdm\b", {"progress.py"}),
    # Keras' epoch bar (training/loop.py) is drawn where progress.bar_wanted says so
    ("whether a bar is drawn (a terminal check)", r"\.isatty\(", {"progress.py"}),
]


@pytest.mark.parametrize(("meaning", "pattern", "allowed"), RULES, ids=[r[0] for r in RULES])
def test_one_implementation(meaning: str, pattern: str, allowed: set[str]) -> None:
    assert allowed <= set(SOURCES), f"{meaning}: {sorted(allowed - set(SOURCES))} no longer exist; name their new homes"
    holders = sorted(name for name, text in SOURCES.items() if re.search(pattern, text))
    strays = [name for name in holders if name not in allowed]
    assert not strays, f"{meaning} is written again in {strays}; use the one in {sorted(allowed)}"


def test_no_module_writes_an_output_file_behind_the_ownership_record() -> None:
    """Writers of files that outlive a run go through covidxray.outputs (directly or via a claimed folder)."""
    offenders = []
    for name, text in SOURCES.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("mkdtemp", "mkstemp") and \
                    name not in ("training/feature_cache.py", "data/download.py"):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"temporary folders outside covidxray.outputs: {offenders}"


def test_the_threshold_is_chosen_by_one_function_everywhere() -> None:
    import covidxray.evaluation.baseline as baseline
    import covidxray.evaluation.shortcut_probes as probes
    import covidxray.metrics as metrics
    import covidxray.runs.train as train

    for module in (baseline, probes, train):
        assert getattr(module, "choose_threshold", metrics.choose_threshold) is metrics.choose_threshold
    assert "choose_threshold" in SOURCES["runs/train.py"] and "choose_threshold" in SOURCES["evaluation/baseline.py"]


def test_models_baseline_and_figures_see_the_same_gray_levels(tmp_path: Path) -> None:
    """An RGB file whose colours TensorFlow's own RGB-to-gray rounds one level away from Pillow's ITU-R 601-2
    luma (Pillow's ``convert("L")``, the independent reference): the model input pipeline, the baseline's reader
    and the figures' reader all give Pillow's gray levels."""
    import numpy as np
    from PIL import Image

    from covidxray.data.images import open_grayscale
    from covidxray.training.pipeline import load_images

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb, mode="RGB").save(path)
    reference = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.float32)
    tf_gray = np.rint(rgb.astype(np.float64) @ [0.2989, 0.5870, 0.1140])
    assert (tf_gray != reference).any(), "the colours chosen no longer tell the two conversions apart"
    model_input = load_images([path], image_size=48)[0]
    np.testing.assert_array_equal(model_input[..., 0], reference)
    np.testing.assert_array_equal(np.asarray(open_grayscale(path), dtype=np.float32), reference)
