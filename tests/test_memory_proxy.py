"""benchmarks/memory_proxy.py: its measurement path at toy widths (the real hybrid load with nf4 and 8-bit AdamW,
each configuration in its own forked process), the least-squares fit with residuals, the extrapolation and the
report."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_proxy  # noqa: E402

pytestmark = pytest.mark.slow


def test_fit_recovers_a_linear_model_and_its_residuals():
    rows = [
        {"key": f"r{i}", "n_frozen": f, "n_region": r, "peak_bytes": 100 + 10 * f + 40 * r + e}
        for i, (f, r, e) in enumerate([(1, 1, 0), (3, 1, 0), (2, 2, 0), (6, 2, 3)])
    ]
    result = memory_proxy.fit(rows)
    assert result["dof"] == 1 and set(result["coefficients"]) == {"c0", "c_frozen", "c_region"}
    assert abs(sum(result["residuals"].values())) < 1e-9 and max(map(abs, result["residuals"].values())) > 0
    assert memory_proxy.fit(rows[:2]) is None  # fewer rows than coefficients: no fit
    full = [{"key": str(d), "n_frozen": 0, "n_region": d, "peak_bytes": 5 + 7 * d} for d in (1, 2)]
    assert memory_proxy.fit(full)["coefficients"] == pytest.approx({"c0": 5, "c_region": 7})
    assert memory_proxy.predict({"c0": 5, "c_region": 7}, 0, 32) == 5 + 7 * 32


@pytest.fixture
def restored():
    """memory_proxy.main sets the process's torch threads, vr_plugin's log level and quieting environment variables
    (benchlib.setup): put them all back. Later tests compare logits bit for bit with fresh interpreters that use the
    default thread count, and read log lines of subprocesses that inherit this environment."""
    import logging

    import torch

    threads, level, environ = torch.get_num_threads(), logging.getLogger("vr_plugin").level, dict(os.environ)
    yield
    torch.set_num_threads(threads)
    logging.getLogger("vr_plugin").setLevel(level)
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("loss_chunk", [None, 16])
def test_tiny_hybrid_run(tmp_path, restored, loss_chunk):
    out = tmp_path / "proxy.json"
    chunking = ["--loss-chunk", str(loss_chunk)] if loss_chunk else []
    report = memory_proxy.main(["--tiny", "--modes", "hybrid", "--threads", "1", "--out", str(out), *chunking])
    assert json.loads(out.read_text())["benchmark"] == "memory_proxy"
    rows = report["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["status"] for r in rows]
    shape = memory_proxy.base_shape(memory_proxy.parse_args(["--tiny"]))
    counts = memory_proxy.parameter_counts(shape)
    for row in rows:  # exactly the region layers and the projector train, with bitsandbytes' 8-bit AdamW
        assert row["optimizer"] == "AdamW8bit"
        assert row["trainable"] == row["n_region"] * counts["layer"] + counts["projector"]
        assert row["peak_bytes"] > row["resting_bytes"] > 0
        # bitsandbytes keeps 32-bit moments for tensors under 4096 values, as most are at toy widths: only the
        # real-width run has 1 byte per moment value
        assert row["optimizer_state_bytes"] > 0
    hybrid = report["fits"]["hybrid"]
    assert hybrid["dof"] == 0 and len(hybrid["residuals"]) == 3  # the seq probe is not in the fit
    assert hybrid["seq_correction"]["probe"] == rows[3]["key"]
    assert hybrid["floor_2048"]["total"] > hybrid["floor"]["total"]
    answer = report["hybrid_answer"]
    assert answer["peak_gb"] == pytest.approx(hybrid["extrapolated_2048_bytes"] / 1e9)
    assert answer["margin_gb"] == pytest.approx(22 - answer["peak_gb"])
    text = memory_proxy.render(
        rows, {"fits": report["fits"], "hybrid_answer": answer}, memory_proxy.parse_args(["--tiny", *chunking])
    )
    assert "Hybrid at 32 layers" in text and "fit residual MB" in text
    assert ("in chunks of 16 positions" in text) == bool(loss_chunk)


def test_bad_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        memory_proxy.parse_args(["--modes", "hybrid,nonsense"])
    assert "--modes nonsense not among hybrid, region, full" in capsys.readouterr().err
