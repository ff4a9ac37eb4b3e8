"""Findings said as sentences with units and a location, in English, French and Spanish; the study page and the
report carry them (no English model text in the French and Spanish pages); model cards one click away."""

from __future__ import annotations

import re

import pytest

from appliance.jobs.intake import analyze_paths
from appliance.outputs import findings_text as ft
from appliance.outputs.report import translations
from appliance.web import create_app
from tests.web_helpers import login, make_accounts, web_settings

EN = translations("en")
RESULT = {"model": "lung-segmentation", "findings": [], "threshold": None, "flagged": False}


def test_lung_volumes_say_side_volume_and_slices_in_three_languages():
    finding = {"name": "right lung", "volume_ml": 1404.2, "slice_range": [88, 133], "centroid_mm": [-80.1, 2.0, 40.0]}
    assert ft.finding_sentence(RESULT, finding, EN) == "Right lung: 1404 mL, slices 89-134."
    assert ft.finding_sentence(RESULT, finding, translations("fr")) == "Poumon droit : 1404 mL, coupes 89-134."
    assert ft.finding_sentence(RESULT, finding, translations("es")) == "Pulmón derecho: 1404 mL, cortes 89-134."


def test_key_image_says_slice_number_and_z_and_points_at_the_volume_slice():
    result = {"model": "chest-opacity", "findings": [
        {"name": "key slice", "rank": 1, "slice_index": 115, "z_mm": 430.94, "opacity_fraction": 0.0191,
         "key_image": "artefacts/x.png"},
        {"name": "opacity by slice", "slices": [{"index": 0, "z_mm": 0.0, "opacity_fraction": 0.0}]}]}
    sentences = ft.result_sentences(result, EN)
    assert [s.text for s in sentences] == [("Key image: slice 116 (z = 430.9 mm), opacity in 1.9 % of the lung on "
                                            "this slice.")]
    assert sentences[0].slice_index == 115


def test_pancreas_lesion_names_the_part_of_the_gland_slice_z_and_size():
    result = {"model": "abdomen-pancreas", "findings": [
        {"name": "pancreas (localised)", "centroid_mm": [10.0, 20.0, -150.0], "volume_ml": 71.3,
         "slice_range": [40, 55], "localizer": "pancreas-localizer 0.1.0"},
        {"name": "lesion candidate", "probability": 0.8123, "centre_mm": [-14.0, 22.0, -148.5], "diameter_mm": 18.44,
         "slice_index": 47}]}
    text = ft.finding_sentence(result, result["findings"][1], EN)
    assert text == ("Lesion candidate in the pancreatic head, slice 48 (z = -148.5 mm), probability 0.81. "
                    "about 18.4 mm across.")
    assert ft.finding_sentence(result, result["findings"][0], EN) == (
        "Pancreas located: 71.3 mL, slices 41-56, centre at z = -150 mm.")
    assert "tête du pancréas" in ft.finding_sentence(result, result["findings"][1], translations("fr"))


def test_series_checks_and_body_region_read_as_sentences():
    qa = {"model": "series-qa", "threshold": 50.0, "flagged": True, "findings": []}
    assert ft.finding_sentence(qa, {"name": "air calibration", "air_hu": -930.04, "noise_hu": 18.3, "samples": 9},
                               EN) == ("Air reads -930 HU, more than 50 HU from -1000 HU: check the scanner's air "
                                       "calibration; image noise 18.3 HU.")
    region = {"name": "body region", "regions": [{"region": "chest", "from_mm": -300.0, "to_mm": -10.5,
                                                  "slices": [0, 96], "evidence": "lungs"}, "junk"]}
    assert ft.finding_sentence(qa, region, EN) == "Body region: chest (slices 1-97, z = -300 to -10.5 mm)."
    assert ft.finding_sentence(qa, {"name": "body region", "regions": None}, EN) == "Body region not determined."
    assert ft.finding_sentence(qa, {"name": "body region"}, translations("es")) == "Región anatómica no determinada."


def test_unknown_or_malformed_findings_fall_back_to_plain_words_never_a_repr():
    result = {"model": "x", "findings": []}
    text = ft.finding_sentence(result, {"name": "new thing", "centroid_mm": [24.8, 74.0, 299.4],
                                        "fully_covered": False, "dice": {"right_lung": 0.91234}}, EN)
    assert text == "new thing: 24.8, 74, 299.4, no, right lung 0.91"
    broken = ft.finding_sentence(result, {"name": "right lung", "volume_ml": "n/a"}, EN)
    assert broken == "right lung: n/a" and "[" not in broken and "{" not in broken


def test_notes_of_the_pipelines_are_translated_sentence_by_sentence():
    note = ("The lung apices are cut off at the top of the series; volumes are partial. "
            "The total lung volume, 1510 mL, is outside the 2-8 L of an adult at full inspiration.")
    assert ft.note_text(note, translations("fr")) == (
        "Les apex pulmonaires sont coupés en haut de la série ; les volumes sont partiels. "
        "Le volume pulmonaire total, 1510 mL, est hors des 2-8 L d'un adulte en inspiration complète.")
    skipped = {"model": "lung-emphysema", "why": "Slices are 14 mm thick; low-attenuation percentages are only "
                                                 "defined on sections up to 5 mm."}
    assert ft.skipped_sentence(skipped, translations("es")) == (
        "Enfisema (pulmón de baja atenuación) no evaluado: Los cortes tienen 14 mm de grosor; los porcentajes de "
        "baja atenuación solo están definidos hasta 5 mm.")
    assert ft.note_text("something new.", translations("fr")) == "something new."
    caveat = ("Mean lung density -723 HU is denser than full inspiration usually gives: an expiratory or "
              "shallow-breath scan lowers %LAA.")
    assert ft.note_text(caveat, translations("es")) == (
        "Densidad pulmonar media de -723 UH, más densa de lo habitual en inspiración completa: un estudio en "
        "espiración o con respiración superficial reduce el %LAA.")


# the web pages of an analysed generated chest

@pytest.fixture(scope="module")
def analysed(tmp_path_factory, synthetic_chest):
    settings = web_settings(tmp_path_factory.mktemp("sentences"))
    record = analyze_paths([synthetic_chest], settings)
    make_accounts(settings.home_path)
    return settings, record["studies"][0]


def _client(settings, language: str):
    client = create_app(settings, environ={}).test_client()
    login(client, "rad")
    client.environ_base["HTTP_ACCEPT_LANGUAGE"] = language
    return client


def _english_model_text(study: dict) -> set[str]:
    """Every English sentence the appliance writes about this study's results (findings, notes, skipped)."""
    series = study["series"][0]
    texts = {s.text for r in series["results"] for s in ft.result_sentences(r, EN)}
    texts |= {ft.note_text(r.get("notice"), EN) for r in series["results"] if r.get("notice")}
    texts |= {ft.skipped_sentence(e, EN) for e in series["skipped_models"]}
    texts |= {ft.model_name(r["model"], EN) for r in series["results"]}
    texts |= {"Not validated on clinical data", "research use only", "FLAGGED for review", "not flagged"}
    return {t for t in texts if t}


def _right_lung_sentence(study: dict, language: str) -> str:
    result = next(r for r in study["series"][0]["results"] if r["model"] in ("lung-segmentation", "lungs-classical"))
    finding = next(f for f in result["findings"] if f["name"] == "right lung")
    return ft.finding_sentence(result, finding, translations(language))


def test_study_page_lists_sentences_with_slice_links_and_model_cards(analysed):
    settings, study = analysed
    page = _client(settings, "en").get(f"/study/{study['study_instance_uid']}").get_data(as_text=True)
    assert "centroid_mm" not in page and "fully_covered" not in page
    assert _right_lung_sentence(study, "en") in page
    series_uid = study["series"][0]["series_instance_uid"]
    items = re.findall(r'<li data-model="([^"]+)" data-slice="(\d+)" data-series="([^"]+)">([^<]+)</li>', page)
    covid = next(r for r in study["series"][0]["results"] if r["model"] == "chest-covid19")
    key = next(f for f in covid["findings"] if f["name"] == "key slice")
    expected = (f"Key image: slice {key['slice_index'] + 1} (z = {round(key['z_mm'])} mm), slice probability "
                f"{key['probability']:.2f}.")
    assert ("chest-covid19", str(key["slice_index"]), series_uid, expected) in items
    cards = set(re.findall(r'data-testid="model-card" href="([^"]+)"', page))
    assert "/models/chest-covid19" in cards and "/models/series-qa" in cards


@pytest.mark.parametrize("language", ["fr", "es"])
def test_study_page_and_report_carry_no_english_model_text(analysed, language):
    settings, study = analysed
    client = _client(settings, language)
    uid = study["study_instance_uid"]
    english = _english_model_text(study)
    assert len(english) > 15
    for path in (f"/study/{uid}", f"/study/{uid}/report"):
        page = re.sub(r"<[^>]+>", " ", client.get(path).get_data(as_text=True))  # the text a reader sees
        left = sorted(t for t in english if t in page)
        assert not left, (path, left)
    page = client.get(f"/study/{uid}").get_data(as_text=True)
    assert _right_lung_sentence(study, language) in page
    assert re.match(r"(Poumon droit :|Pulmón derecho:) \d+ mL, (coupes|cortes) \d+-\d+\.$",
                    _right_lung_sentence(study, language))


def test_model_card_shows_intended_use_limits_and_figures_with_confidence_intervals(analysed):
    settings, _study = analysed
    page = _client(settings, "fr").get("/models/chest-covid19").get_data(as_text=True)
    assert "Fiche du modèle en anglais." in page and "Usage prévu" in page and "Limites connues" in page
    row = re.search(r'<tr data-metric="auc"><th>auc</th><td>([\d.]+)</td><td>([\d.]+)&ndash;([\d.]+)</td>', page)
    assert row is not None and float(row[2]) <= float(row[1]) <= float(row[3])
    assert "Flag chest CT studies whose lungs look like COVID-19 pneumonia" in page
    builtin = _client(settings, "en").get("/models/chest-opacity").get_data(as_text=True)
    assert "Ground glass" in builtin or "ground glass" in builtin
    client = _client(settings, "en")
    assert client.get("/models/no-such-model").status_code == 404
    assert client.get("/models/..%2Fetc").status_code == 404


def test_impression_says_what_needs_review_what_was_measured_and_what_was_not_assessed():
    covid = {"id": 7, "model": "chest-covid19", "flagged": True, "score": 0.91, "threshold": 0.6665, "findings": [
        {"name": "key slice", "rank": 1, "slice_index": 22, "probability": 0.97, "z_mm": 308.0}]}
    lungs = {"id": 8, "model": "lung-segmentation", "flagged": False, "score": 2799.0, "threshold": None,
             "findings": [{"name": "lungs", "total_volume_ml": 2799.0, "apex_covered": False, "base_covered": True,
                           "fully_covered": False}]}
    study = {"series": [
        {"status": "analyzed", "results": [covid, lungs],
         "skipped_models": [{"model": "lung-emphysema", "why": "no lungs found in this series"}]},
        {"status": "rejected", "series_number": 3, "reason_code": "NOT_A_VOLUME", "reason": "one slice",
         "results": []}]}
    unreviewed = ft.impression(study, {}, EN)
    assert unreviewed.needs_review == [("COVID-19 pneumonia screen: score 0.9100 against threshold 0.6665: FLAGGED "
                                        "for review. Key image: slice 23 (z = 308 mm), slice probability 0.97.")]
    assert unreviewed.measured == ["Lung volumes (learned lung mask): Total lung volume 2799 mL; apices not covered."]
    assert unreviewed.not_assessed == ["Emphysema (low-attenuation lung) not assessed: no lungs found in this series",
                                       "Series 3 not analysed: NOT_A_VOLUME. one slice"]
    reviewed = ft.impression(study, {7: {"decision": "confirmed"}}, EN)
    assert reviewed.needs_review == [] and len(reviewed.measured) == 2


def test_report_opens_with_the_impression_then_findings_then_the_models(analysed):
    import io

    from pypdf import PdfReader

    settings, study = analysed
    client = _client(settings, "en")
    uid = study["study_instance_uid"]
    page = client.get(f"/study/{uid}/report").get_data(as_text=True)
    order = [page.index(s) for s in ("<h2>Impression</h2>", "<h2>Findings</h2>", "<h2>Models</h2>")]
    assert order == sorted(order)
    impression = page[order[0]:order[1]]
    assert "No flagged result awaits review." in impression
    assert "Emphysema (low-attenuation lung) not assessed: Slices are 14 mm thick" in impression
    assert "Series quality: Air reads -1000 HU" in impression
    pdf = client.get(f"/study/{uid}/report.pdf", headers={"Accept-Language": "fr"}).data
    text = re.sub(r"\s+", " ", " ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages))
    order = [text.index(s) for s in ("Conclusion", "Résultats", "Modèles")]
    assert order == sorted(order), text[:400]
    assert _right_lung_sentence(study, "fr") in text


def test_key_image_banner_says_not_validated_in_every_language_and_fits(tmp_path):
    import numpy as np
    from PIL import Image, ImageDraw

    from appliance.pipelines import key_images

    for size in (128, 512):
        gray = np.full((size, size, 3), 60.0)
        key_images.save_key_image(gray, tmp_path / f"a{size}.png", "Not validated: research use only")
        key_images.save_key_image(gray, tmp_path / f"b{size}.png", "a pack's own note, any language")
        key_images.save_key_image(gray, tmp_path / f"c{size}.png", None)
        a, b, c = (np.asarray(Image.open(tmp_path / f"{k}{size}.png")) for k in "abc")
        assert np.array_equal(a, b), "the banner does not depend on the note's language"
        lines, font, height = key_images.banner_layout(size, max(12, int(size * key_images.BANNER_HEIGHT_FRACTION)))
        banner = a[:height]
        assert (banner == key_images.BANNER_COLOUR).all(axis=2).mean() > 0.5 and (banner[..., 1] > 80).any()
        assert (c == 60).all(), "a validated model's key image has no banner"
        assert " ".join(lines).count("VALID") == 3, "English, French and Spanish"
        assert all(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line, font=font) <= size - 4 for line in lines)


def test_a_model_outside_its_body_region_says_so_in_the_readers_language():
    entry = {"model": "chest-opacity", "why": "not applicable: this series covers the head (z 0 to 180 mm, slices "
             "0-59: a bone ring around brain density); the model reads the chest",
             "not_applicable": {"reads": "chest", "covers": ["head", "neck"]}}
    assert ft.skipped_sentence(entry, EN) == ("Lung opacity not applicable: this series covers head, neck; the model "
                                              "reads the chest")
    french = ft.skipped_sentence(entry, translations("fr"))
    spanish = ft.skipped_sentence(entry, translations("es"))
    assert "tête" in french and "thorax" in french and "covers" not in french
    assert "cabeza" in spanish and "tórax" in spanish and "covers" not in spanish
