"""benchmarks/paired.py on hand-made result files in the two layouts it reads."""

import json
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def paired(benchmark_script):
    return benchmark_script("paired")


def ablation_json(path, ids, lmd, fid):
    row = {"row": "IRN^ID", "ids": float(np.nanmean(ids)), "fid": fid,
           "per_face": {"names": ["a.png", "b.png", "c.png", "d.png"], "ids": ids, "lmd": lmd}}
    path.write_text(json.dumps({"meta": {}, "rows": [row]}))
    return path


def test_ablation_layout(paired, tmp_path):
    a = ablation_json(tmp_path / "a.json", [0.92, 0.90, 0.94, 0.96], [8.0, float("nan"), 9.0, 7.0], 99.5)
    b = ablation_json(tmp_path / "b.json", [0.91, 0.90, 0.93, 0.94], [8.5, 9.0, 9.5, 7.5], 100.25)
    names, va, fid_a = paired.load_row(a, "IRN^ID")
    _, vb, fid_b = paired.load_row(b, "IRN^ID")
    assert names == ["a.png", "b.png", "c.png", "d.png"] and (fid_a, fid_b) == (99.5, 100.25)
    table = {r["metric"]: r for r in paired.paired_rows(va, vb)}
    assert set(table) == {"ids", "lmd"}
    assert table["ids"]["a"] == pytest.approx(0.93) and table["ids"]["b"] == pytest.approx(0.92)
    assert table["ids"]["diff"] == pytest.approx(0.01)
    assert 0.0 <= table["ids"]["low"] <= 0.01 <= table["ids"]["high"] <= 0.02
    # the face without landmarks drops out of its metric only: (-0.5 - 0.5 - 0.5) / 3
    assert table["lmd"]["diff"] == pytest.approx(-0.5) and table["lmd"]["a"] == pytest.approx(8.0)


def test_real_world_layout_and_errors(paired, tmp_path, monkeypatch, capsys):
    row = {"row": "IRN", "subsets": {"all": {"fid": 120.3}},
           "per_face": {"laplacian_var": [500.0, 600.0], "id_vs_input": [0.98, 0.99]}}
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"meta": {"names": ["cropped/x", "whole/y_0"]}, "rows": [row]}))
    names, values, fid = paired.load_row(real, "IRN")
    assert names == ["cropped/x", "whole/y_0"] and fid == 120.3 and values["laplacian_var"] == [500.0, 600.0]
    with pytest.raises(SystemExit, match="no row 'full'"):
        paired.load_row(real, "full")

    other = ablation_json(tmp_path / "abl.json", [0.9] * 4, [8.0] * 4, 99.0)
    monkeypatch.setattr(sys, "argv", ["paired.py", str(real), "IRN", str(other), "IRN^ID"])
    with pytest.raises(SystemExit, match="different faces"):
        paired.main()
    monkeypatch.setattr(sys, "argv", ["paired.py", str(real), "IRN", str(real), "IRN"])
    paired.main()
    out = capsys.readouterr().out
    assert "| laplacian_var | 550.0000 | 550.0000 | +0.0000 [+0.0000, +0.0000] |" in out
    assert "| fid | 120.30 | 120.30 |" in out


def test_evaluate_layout(paired, tmp_path):
    result = {"per_face": {"names": ["a", "b"], "ids": [0.9, 0.94], "lmd": [8.0, 6.0]},
              "rows": [{"metric": "ids", "status": "ok", "value": 0.92},
                       {"metric": "fid", "status": "ok", "value": 77.5}]}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(result))
    names, values, fid = paired.load_row(path, "-")
    assert names == ["a", "b"] and fid == 77.5 and values == {"ids": [0.9, 0.94], "lmd": [8.0, 6.0]}
    with pytest.raises(SystemExit, match="named '-'"):
        paired.load_row(path, "IRN")
    result["rows"][1]["status"] = "unavailable"  # an FID that could not be computed is no number
    path.write_text(json.dumps(result))
    assert paired.load_row(path, "-")[2] is None
