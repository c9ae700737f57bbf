"""Root conftest: applies to tests/ and to the notebooks nbval replays.

The data directory defaults to the shared MNIST folder beside the checkout (where CI's fresh clone
finds it); MICROCNN_DATA overrides it. Set here, before any notebook kernel starts, so kernels inherit it.
"""

import os
from pathlib import Path

_SHARED_MNIST = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "mnist"
if "MICROCNN_DATA" not in os.environ and _SHARED_MNIST.is_dir():
    os.environ["MICROCNN_DATA"] = str(_SHARED_MNIST)

import pytest  # noqa: E402  (after the environment default above, which notebook kernels inherit)

# Fixtures (tests/conftest.py) that read the MNIST files.
_DATA_FIXTURES = {"mnist_test", "mnist_train"}

# Tests measured at over ~1.5 s each with a warm Numba cache (pytest --durations=60 on 2 busy cores),
# all parametrizations included: subprocesses, widget and report rendering, fuzzing loops, training.
# Kept here, not as decorators, so the quick lane is one list to maintain; CI runs them all.
_MEASURED_SLOW = {
    "tests/test_analysis.py::test_calibration_sweep_accuracies",
    "tests/test_analysis.py::test_confusion_matrix_of_a_network_matches_its_accuracy",
    "tests/test_cli.py::test_bench_json_fp32",
    "tests/test_cli.py::test_info_reports_versions_and_data_dir",
    "tests/test_cli_safety.py::test_real_write_failure_in_a_two_file_train_save_keeps_both_old_files",
    "tests/test_datasets.py::test_fashion_mnist_from_debian_package",
    "tests/test_datasets.py::test_load_mnist_test_split_from_shared_files",
    "tests/test_fuzz_models.py::test_load_model_mutated_fp32_files",
    "tests/test_fuzz_models.py::test_quantized_loader_mutated_files",
    "tests/test_fuzz_models.py::test_read_safetensors_random_headers",
    "tests/test_hostile_files.py::test_bounded_json_reads_what_json_writes_up_to_the_depth_limit",
    "tests/test_hostile_files.py::test_mutated_calibration_files_load_cleanly_or_not_at_all",
    "tests/test_hostile_files.py::test_valid_calibrations_load_with_the_same_ranges",
    "tests/test_idx_fuzz.py::test_mutated_valid_files",
    "tests/test_idx_fuzz.py::test_random_bytes_behind_a_plausible_header",
    "tests/test_packaging.py::test_import_compiles_nothing",
    "tests/test_plots.py::test_activation_histograms_mark_every_methods_range",
    "tests/test_quant_accuracy.py::test_accuracy_targets",
    "tests/test_quant_network.py::test_mixed_precision",
    "tests/test_quant_rounding.py::test_gptq_improves_a_4bit_network",
    "tests/test_report.py::test_failing_cell_still_writes_html_then_raises",
    "tests/test_report.py::test_render_writes_html_with_table_and_png",
    "tests/test_robustness_arrays.py::test_memory_layout_and_dtype_do_not_change_results",
    "tests/test_robustness_models.py::test_cli_process_exit_code_and_stderr",
    "tests/test_train.py::test_cli_train_one_epoch_writes_both_files",
    "tests/test_train.py::test_short_training_learns_and_is_deterministic",
    "tests/test_widgets.py::test_drawing_pad_predicts_when_pixels_change",
    "tests/test_widgets.py::test_explorer_widgets_follow_the_slider",
    "tests/test_widgets.py::test_feature_maps_show_the_layer_outputs",
    "tests/test_widgets.py::test_mnist_digits_survive_canvas_round_trip",
    "tests/test_widgets.py::test_on_layer_change_covers_every_layer",
    "tests/test_widgets.py::test_on_misclassified_change_every_page",
    "tests/test_widgets.py::test_on_misclassified_change_without_mistakes",
}


def pytest_collection_modifyitems(config, items):
    """Test lanes: every notebook cell nbval replays is ``notebook`` (and ``slow`` and ``data``: each
    notebook reads MNIST and takes tens of seconds); tests that use the MNIST fixtures, or skip without
    the shared MNIST files, are ``data``; the measured-slow tests and the ``torch`` ones (other stacks,
    seconds just to import) are ``slow``. Quick lane: ``pytest -m "not slow"``."""
    for item in items:
        if item.nodeid.split("[")[0] in _MEASURED_SLOW or item.get_closest_marker("torch"):
            item.add_marker(pytest.mark.slow)
        if item.path.suffix == ".ipynb":
            for mark in (pytest.mark.notebook, pytest.mark.slow, pytest.mark.data):
                item.add_marker(mark)
        elif _DATA_FIXTURES & set(getattr(item, "fixturenames", ())) or any(
                "MNIST" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.data)
