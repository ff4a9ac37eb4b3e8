"""The study report: one A4 document (site, patient and study, findings, key images, model identity,
disclaimers) in the reader's language, as the web page shows it and as a PDF (fpdf2).

``_`` is the translation function of the caller: Flask-Babel's in the web UI, a catalogue loaded
with :func:`translations` in the worker.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpdf import FPDF

from appliance.outputs import findings_text, opacity_figures
from appliance.store.datadir import DataDirectory

Gettext = Callable[..., str]
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CATALOGUES = Path(__file__).resolve().parents[1] / "web" / "translations"


def translations(language: str) -> Gettext:
    """A gettext for ``language`` read straight from the package's ``.po`` catalogue (English: identity)."""
    from babel.messages.pofile import read_po

    po = CATALOGUES / language / "LC_MESSAGES" / "messages.po"
    if language == "en" or not po.is_file():
        return lambda text, **kw: text % kw if kw else text
    with open(po, "rb") as f:
        catalog = read_po(f)
    # plural entries (tuple ids) never match a singular lookup, so only singular ones are kept
    table = {m.id: m.string for m in catalog if isinstance(m.id, str) and isinstance(m.string, str)
             and m.id and m.string}

    def gettext(text: str, **kw: Any) -> str:
        out = table.get(text, text)
        return out % kw if kw else out
    return gettext


def key_image_finder(home: Path) -> Callable[[dict[str, Any], int], Path | None]:
    """``find(result, n)``: the stored key image ``n`` of ``result`` when it lies inside the artefacts folder."""
    root = DataDirectory(home).artefacts.resolve()

    def find(result: dict[str, Any], n: int) -> Path | None:
        stored = result["findings"][n].get("key_image")
        if not stored:
            return None
        path = (home / stored).resolve()  # relative to the data directory (older results: absolute)
        return path if path.is_relative_to(root) and path.is_file() else None
    return find


def disclaimers(_: Gettext) -> list[str]:
    return [
        _("This report was produced by screening software. It is not a diagnosis: a qualified radiologist "
          "must read the images before any clinical decision."),
        _("A negative screening result does not rule out disease."),
    ]


def model_notice(result: dict[str, Any], _: Gettext) -> str | None:
    """For a model not validated on clinical data: the warning, and the model's own note (e.g. trained
    on synthetic data only)."""
    if result.get("validated"):
        return None
    warning = _("Not validated on clinical data: research use only. Do not use this result for diagnosis.")
    note = findings_text.note_text(result.get("notice"), _)
    return f"{warning} ({note})" if note else warning


def format_date(value: str | None) -> str:
    """``YYYYMMDD`` as ``YYYY-MM-DD`` (anything else as it is)."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def patient_lines(study: dict[str, Any], _: Gettext) -> list[tuple[str, str]]:
    return [(_("Patient"), (study.get("patient_name") or "").replace("^", " ").strip()),
            (_("Patient ID"), study.get("patient_id") or ""),
            (_("Birth date"), format_date(study.get("patient_birth_date"))),
            (_("Sex"), study.get("patient_sex") or ""),
            (_("Study date"), format_date(study.get("study_date"))),
            (_("Accession number"), study.get("accession_number") or ""),
            (_("Study description"), study.get("study_description") or "")]


MIN_DIGITS, MAX_DIGITS = 3, 6
# series checks and lung volumes: measurements with nothing for a radiologist to confirm or reject
NOT_REVIEWED = frozenset({"series-qa", "lungs-classical", "lung-segmentation"})


def is_reviewed(result: dict[str, Any]) -> bool:
    """Whether a result carries a decision a radiologist confirms or rejects."""
    return result["model"] not in NOT_REVIEWED


def score_digits(score: float, threshold: float) -> int:
    """Decimals that show the threshold as it is and the score apart from it (3 to 6): a 0.9996 threshold
    is not shown as 1.000, and a score just under its threshold does not read the same."""
    for digits in range(MIN_DIGITS, MAX_DIGITS + 1):
        exact = round(threshold, digits) == threshold
        apart = score == threshold or round(score, digits) != round(threshold, digits)
        if exact and apart:
            return digits
    return MAX_DIGITS


def score_and_threshold(score: float, threshold: float) -> tuple[str, str]:
    digits = score_digits(score, threshold)
    return f"{score:.{digits}f}", f"{threshold:.{digits}f}"


def verdict(result: dict[str, Any], _: Gettext) -> str:
    """Flagged or not, as the radiologist left it: a flag every review rejected is no longer "for review"."""
    if not result["flagged"]:
        return _("not flagged")
    state = str(getattr(result.get("review"), "state", ""))
    if state == "rejected":
        return _("flagged, flag rejected by the radiologist")
    if state == "confirmed":
        return _("FLAGGED, confirmed by the radiologist")
    return _("FLAGGED for review")


def result_summary(result: dict[str, Any], _: Gettext) -> str:
    verdict_text = verdict(result, _)
    if result.get("score") is None or result.get("threshold") is None:
        return verdict_text
    score, threshold = score_and_threshold(float(result["score"]), float(result["threshold"]))
    return _("score %(score)s against threshold %(threshold)s: %(verdict)s",
             score=score, threshold=threshold, verdict=verdict_text)


def model_identity(result: dict[str, Any], _: Gettext) -> str:
    return _("model %(model)s version %(version)s, %(backend)s %(precision)s",
             model=result["model"], version=result["model_version"], backend=result["backend"],
             precision=result["precision"])


def _decision_words(decision: str, _: Gettext) -> str:
    return _("confirmed") if decision == "confirmed" else _("rejected")


def _when(review: dict[str, Any]) -> str:
    return str(review["at"])[:16].replace("T", " ")


def why_words(why: Any, _: Gettext) -> str:
    """Why an earlier review no longer applies (:class:`~appliance.store.reviews.NoLongerApplies`) in words."""
    if str(why) == "new model version":
        return _("the model version changed")
    if str(why) == "decision changed":
        return _("the decision (flagged or not) changed")
    return _("it was made on an earlier analysis")


def review_line(review: Any, _: Gettext) -> str:
    """The radiologist's review of a result in words: ``review`` is the result's
    :class:`~appliance.store.reviews.ResultReview` (``result["review"]``), or a review row, or None."""
    state = getattr(review, "state", None)
    if state is not None:  # a ResultReview: the review that applies, or the earlier one that no longer does
        if review.earlier is not None and review.review is None:
            return _needs_rereview_line(review, _)
        review = review.review
    if review is None:
        return _("Not yet reviewed by a radiologist.")
    line = _("Reviewed by %(reviewer)s on %(at)s: %(decision)s", reviewer=review["reviewer"],
             at=_when(review), decision=_decision_words(review["decision"], _))
    return f"{line}. {review['comment']}" if review.get("comment") else line


def _needs_rereview_line(state: Any, _: Gettext) -> str:
    earlier = state.earlier
    why = why_words(state.why, _)
    line = _("Needs re-review: the earlier review by %(reviewer)s on %(at)s (%(decision)s) no longer applies "
             "because %(why)s", reviewer=earlier["reviewer"], at=_when(earlier),
             decision=_decision_words(earlier["decision"], _), why=why)
    return f"{line}. {earlier['comment']}" if earlier.get("comment") else line


def _opacity_block(pdf: FPDF, font: str, t, result: dict[str, Any], _: Gettext) -> None:
    """Lung opacity: the burden per zone as a small table and the profile along the body axis as a chart."""
    rows = opacity_figures.zone_table(result)
    if not rows:
        return
    if pdf.get_y() + 45 > pdf.h - 20:
        pdf.add_page()
    pdf.set_font(font, "B", 8)
    widths = (22, 26, 26)
    for text, w in zip((_("Zone"), _("Right lung"), _("Left lung")), widths):
        pdf.cell(w, 4.5, t(text), border=1)
    pdf.ln()
    pdf.set_font(font, size=8)
    for row in rows:
        cells = [_(row["zone"])] + [f"{row[lung]:.1f} %" if row[lung] is not None else "-"
                                    for lung in opacity_figures.LUNGS]
        for text, w in zip(cells, widths):
            pdf.cell(w, 4.5, t(text), border=1)
        pdf.ln()
    top = pdf.get_y() - 4.5 * (len(rows) + 1)
    if opacity_figures.draw_profile(pdf, result, pdf.l_margin + sum(widths) + 14, top + 1, 80, 18, t, _):
        pdf.set_font(font, size=8)
    pdf.ln(2)


class _Report(FPDF):
    def __init__(self, footer_text: str, font: str):
        super().__init__(format="A4")
        self.footer_text, self.font_name = footer_text, font

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(self.font_name, size=7)
        self.cell(0, 5, f"{self.footer_text}  {self.page_no()}/{{nb}}", align="C")


def _fonts(pdf: FPDF) -> str:
    regular, bold = FONT_DIR / "DejaVuSans.ttf", FONT_DIR / "DejaVuSans-Bold.ttf"
    if regular.is_file() and bold.is_file():
        pdf.add_font("DejaVu", "", str(regular))
        pdf.add_font("DejaVu", "B", str(bold))
        return "DejaVu"
    return "Helvetica"  # Latin-1 only: other characters become '?'


def _text(font: str, value: str) -> str:
    return value if font == "DejaVu" else value.encode("latin-1", "replace").decode("latin-1")


def render_pdf(study: dict[str, Any], reviews: dict[int, dict[str, Any]], site_name: str, _: Gettext,
               key_image: Callable[[dict[str, Any], int], Path | None]) -> bytes:
    """The report of ``study`` (as :func:`appliance.store.studies.study` returns it) as PDF bytes."""
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    pdf = _Report(_("Screening report, generated %(at)s", at=generated), "Helvetica")
    font = pdf.font_name = _fonts(pdf)
    t = lambda value: _text(font, str(value))  # noqa: E731
    pdf.set_title(t(_("CT screening report")))
    pdf.alias_nb_pages()
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font(font, "B", 15)
    pdf.multi_cell(0, 8, t(site_name), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(font, "B", 12)
    pdf.multi_cell(0, 7, t(_("CT screening report")), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font(font, size=9)
    for label, value in patient_lines(study, _):
        pdf.set_font(font, "B", 9)
        pdf.cell(45, 5, t(label))
        pdf.set_font(font, size=9)
        pdf.multi_cell(0, 5, t(value), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    _impression(pdf, font, t, findings_text.impression(study, reviews, _), _)
    _findings(pdf, font, t, study, reviews, _, key_image)
    pdf.ln(3)
    _appendix(pdf, font, t, study, _)
    pdf.ln(3)
    pdf.set_font(font, "B", 10)
    pdf.multi_cell(0, 6, t(_("Disclaimers")), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(font, size=8)
    for line in disclaimers(_):
        pdf.multi_cell(0, 4.5, t(line), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _findings(pdf: FPDF, font: str, t: Callable[[Any], str], study: dict[str, Any],
              reviews: dict[int, dict[str, Any]], _: Gettext, key_image) -> None:
    pdf.set_font(font, "B", 11)
    pdf.multi_cell(0, 7, t(_("Findings")), new_x="LMARGIN", new_y="NEXT")
    for series in study["series"]:
        pdf.set_font(font, "B", 9)
        title = _("Series %(number)s %(description)s", number=series.get("series_number") or "",
                  description=series.get("series_description") or "")
        pdf.multi_cell(0, 5, t(title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(font, size=9)
        if series["status"] == "rejected":
            pdf.multi_cell(0, 5, t(_("Not analysed: %(code)s. %(reason)s", code=series["reason_code"],
                                     reason=series["reason"] or "")), new_x="LMARGIN", new_y="NEXT")
        if series["status"] == "analyzed" and not series["results"]:
            pdf.multi_cell(0, 5, t(_("No screening model applies to this series.")), new_x="LMARGIN", new_y="NEXT")
        for result in series["results"]:
            _result_block(pdf, font, t, result, result.get("review", reviews.get(result["id"])), _, key_image)


def _lines(pdf: FPDF, t, heading: str, lines: list[str], font: str) -> None:
    pdf.set_font(font, "B", 9)
    pdf.multi_cell(0, 5, t(heading), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(font, size=9)
    for line in lines:
        pdf.multi_cell(0, 4.8, t(f"- {line}"), new_x="LMARGIN", new_y="NEXT")


def _impression(pdf: FPDF, font: str, t, impression: findings_text.Impression, _: Gettext) -> None:
    """What needs review, what was measured, what could not be assessed: the report opens with it."""
    pdf.set_font(font, "B", 11)
    pdf.multi_cell(0, 7, t(_("Impression")), new_x="LMARGIN", new_y="NEXT")
    _lines(pdf, t, _("Needs review"), impression.needs_review or [_("No flagged result awaits review.")], font)
    if impression.measured:
        _lines(pdf, t, _("Measured"), impression.measured, font)
    if impression.not_assessed:
        _lines(pdf, t, _("Not assessed"), impression.not_assessed, font)
    pdf.ln(3)


def _appendix(pdf: FPDF, font: str, t, study: dict[str, Any], _: Gettext) -> None:
    """Each model's identity, version, backend, validation notice and threshold, after the findings."""
    pdf.set_font(font, "B", 11)
    pdf.multi_cell(0, 7, t(_("Models")), new_x="LMARGIN", new_y="NEXT")
    for result in (r for series in study["series"] for r in series["results"]):
        line = f"{result['model']}: {model_identity(result, _)}"
        if result.get("threshold") is not None:
            line += "; " + _("decision threshold %(threshold)s", threshold=result["threshold"])
        pdf.set_font(font, size=8)
        pdf.multi_cell(0, 4.5, t(line), new_x="LMARGIN", new_y="NEXT")
        notice = model_notice(result, _)
        if notice:
            pdf.set_text_color(160, 0, 0)
            pdf.set_font(font, "B", 8)
            pdf.multi_cell(0, 4.5, t(notice), new_x="LMARGIN", new_y="NEXT")
            pdf.set_text_color(0, 0, 0)


def _result_block(pdf: FPDF, font: str, t, result: dict[str, Any], review, _: Gettext, key_image) -> None:
    pdf.set_font(font, "B", 9)
    title = findings_text.model_name(result["model"], _)
    if is_reviewed(result):
        title = f"{title}: {result_summary(result, _)}"
    pdf.multi_cell(0, 5, t(title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(font, size=8)
    if is_reviewed(result):
        pdf.multi_cell(0, 4.5, t(review_line(review, _)), new_x="LMARGIN", new_y="NEXT")
    for sentence in findings_text.result_sentences(result, _):
        pdf.multi_cell(0, 4.5, t(f"- {sentence.text}"), new_x="LMARGIN", new_y="NEXT")
    _opacity_block(pdf, font, t, result, _)
    images = [p for p in (key_image(result, n) for n in result["key_images"][:3]) if p is not None]
    if images:
        size = 55.0
        if pdf.get_y() + size > pdf.h - 20:
            pdf.add_page()
        y = pdf.get_y() + 1
        for i, path in enumerate(images):
            pdf.image(str(path), x=pdf.l_margin + i * (size + 4), y=y, w=size, h=size)
        pdf.set_y(y + size + 2)
    pdf.ln(1)
