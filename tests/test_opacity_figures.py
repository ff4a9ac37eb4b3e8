"""The lung opacity burden per zone and its profile along the body axis, on the web page and in the PDF."""

from __future__ import annotations

import io
import re

from pypdf import PdfReader

from appliance.outputs import opacity_figures
from appliance.outputs.report import render_pdf, translations

_ = translations("en")


def _result(n_slices: int = 50) -> dict:
    rows = [{"lung": lung, "zone": zone, "lung_ml": 500.0, "opacity_percent": p, "ground_glass_percent": p,
             "consolidation_percent": 0.0}
            for (lung, zone), p in zip([(lu, z) for lu in ("right", "left") for z in ("upper", "middle", "lower")],
                                       (1.5, 2.5, 30.25, 0.0, 4.0, 12.0))]
    # slices stacked feet to head (z rising with the index): the chart must still run head to feet
    slices = [{"index": k, "z_mm": -300.0 + 5 * k, "opacity_fraction": 0.4 if k < 10 else 0.01}
              for k in range(n_slices)]
    return {"id": 1, "model": "chest-opacity", "model_version": "1.0.0", "validated": False, "notice": "HU measure",
            "backend": "numpy", "precision": "fp32", "score": 8.4, "threshold": 5.0, "flagged": True,
            "key_images": [], "findings": [{"name": "opacity by zone", "rows": rows},
                                           {"name": "opacity by slice", "slices": slices}]}


def test_zone_table_has_a_row_per_zone_and_a_column_per_lung():
    table = opacity_figures.zone_table(_result())
    assert [r["zone"] for r in table] == ["upper", "middle", "lower"]
    assert table[2]["right"] == 30.25 and table[2]["left"] == 12.0 and table[0]["left"] == 0.0


def test_profile_runs_from_head_to_feet_whatever_the_slice_order():
    points = opacity_figures.profile(_result())
    assert points[0][0] > points[-1][0]
    assert points[-1][1] == 0.4 and points[0][1] == 0.01  # the opaque slices are the low (caudal) indices
    svg = opacity_figures.profile_svg(_result(), _)
    coords = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(coords) == 50 and svg.startswith("<svg") and "head" in svg and "feet" in svg
    assert opacity_figures.profile_svg({"findings": []}, _) == ""


def test_pdf_report_shows_the_burden_per_zone_and_the_chart():
    study = {"patient_name": "TEST^OPACITY", "series": [{"series_number": 2, "series_description": "CHEST",
                                                         "status": "analyzed", "results": [_result()]}]}
    pdf = render_pdf(study, {}, "Clinic", _, lambda result, n: None)
    text = PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    assert "Right lung" in text and "Left lung" in text and "30.2 %" in text and "12.0 %" in text
    assert "head" in text and "feet" in text


def test_scores_show_enough_digits_to_differ_from_their_threshold():
    from appliance.outputs.report import result_summary, score_and_threshold

    assert score_and_threshold(1.0, 0.9996) == ("1.0000", "0.9996")  # not "1.000 against 1.000"
    assert score_and_threshold(0.66649, 0.6665) == ("0.66649", "0.66650")
    assert score_and_threshold(0.264, 0.5) == ("0.264", "0.500")
    text = result_summary({"flagged": True, "score": 1.0, "threshold": 0.9996}, _)
    assert "1.0000" in text and "0.9996" in text
