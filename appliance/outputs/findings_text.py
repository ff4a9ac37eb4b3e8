"""Findings as sentences a clinician reads: units, side, zone or organ, slice number and z in mm.

Pure functions over a stored result (``dict`` as :mod:`appliance.analysis` saves it) and one of its findings;
``_`` is the caller's gettext (Flask-Babel's in the web UI, :func:`appliance.outputs.report.translations` in
the worker), so the same sentence reads in English, French or Spanish on the page, in the PDF and in the SR.

Slice numbers are 1-based, as the viewer counts them (slice N is volume slice index N - 1); z is the slice
centre's position along the patient axis in mm, as the pipelines record it. English notes written by the
pipelines and the packs are rendered through :func:`note_text`, which knows every sentence they write today;
an unknown one stays as it is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

Gettext = Callable[..., str]
CHART_ONLY = frozenset({"opacity by slice"})  # drawn as the profile chart, not said in words
PANCREAS_PART_MM = 15.0  # a lesion this far right (left) of the gland's centre lies in its head (tail)
LUNG_SIDES = ("right", "left")


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One finding in words; ``slice_index`` (0-based, volume order) when it points at one slice."""

    text: str
    name: str
    slice_index: int | None = None


def number(value: Any, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals (a whole number without them when it is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    text = f"{value:.{digits}f}"
    return text[:-digits - 1] if digits and set(text[-digits:]) == {"0"} else text


def fixed(value: Any, digits: int = 2) -> str:
    """``value`` with exactly ``digits`` decimals (probabilities, Dice)."""
    return format(float(value), f".{digits}f")


def volume_ml(value: Any) -> str:
    """A volume in mL: whole millilitres from 100 mL up, one decimal below."""
    return number(float(value), 0 if abs(float(value)) >= 100 else 1)


def percent(value: Any) -> str:
    return number(float(value), 1 if abs(float(value)) >= 1 else 2)


def slice_number(index: Any) -> str:
    """The 1-based slice number shown for the 0-based volume slice ``index``."""
    return str(int(index) + 1)


def side_name(side: str, _: Gettext) -> str:
    return {"right": _("right lung"), "left": _("left lung")}.get(side, side)


def zone_name(zone: str, _: Gettext) -> str:
    return {"upper": _("upper zone"), "middle": _("middle zone"), "lower": _("lower zone")}.get(zone, zone)


def region_name(region: str, _: Gettext) -> str:
    names = {"head": _("head"), "neck": _("neck"), "chest": _("chest"), "abdomen": _("abdomen"),
             "pelvis": _("pelvis"), "legs": _("legs")}
    return names.get(str(region), str(region))


def _slice_and_z(finding: dict[str, Any], _: Gettext, z: Any = None) -> str:
    z = finding.get("z_mm") if z is None else z
    if z is None:
        return _("slice %(n)s", n=slice_number(finding["slice_index"]))
    return _("slice %(n)s (z = %(z)s mm)", n=slice_number(finding["slice_index"]), z=number(float(z)))


# one function per finding name the steps write; each returns the sentence or None (nothing to say)

def _coverage(result, f, _):
    fov = f.get("field_of_view_mm") or []
    if len(fov) == 2:
        return _("Scan length %(length)s mm, field of view %(rows)s x %(columns)s mm.",
                 length=number(f["length_mm"]), rows=number(fov[0]), columns=number(fov[1]))
    return _("Scan length %(length)s mm.", length=number(f["length_mm"]))


def _geometry(result, f, _):
    if f.get("action") == "rejected":
        return _("Geometry problem %(code)s: the series was not analysed.", code=f.get("reason_code", ""))
    return _("Geometry problem %(code)s corrected before analysis.", code=f.get("reason_code", ""))


def _air(result, f, _):
    if "air_hu" not in f:
        return _("Air calibration not measurable: no air around the patient.")
    tolerance = number(float(result.get("threshold") or 50.0))
    if result.get("flagged"):
        return _("Air reads %(air)s HU, more than %(tolerance)s HU from -1000 HU: check the scanner's air "
                 "calibration; image noise %(noise)s HU.", air=number(f["air_hu"]), tolerance=tolerance,
                 noise=number(f["noise_hu"]))
    return _("Air reads %(air)s HU (expected -1000 ± %(tolerance)s HU); image noise %(noise)s HU.",
             air=number(f["air_hu"]), tolerance=tolerance, noise=number(f["noise_hu"]))


def _body_region(result, f, _):
    parts = []
    for region in f.get("regions") or []:
        if not isinstance(region, dict):
            continue
        name = region_name(region.get("region", ""), _)
        slices = region.get("slices") or []
        if len(slices) == 2 and region.get("from_mm") is not None and region.get("to_mm") is not None:
            parts.append(_("%(region)s (slices %(first)s-%(last)s, z = %(from)s to %(to)s mm)", region=name,
                           first=slice_number(slices[0]), last=slice_number(slices[1]),
                           **{"from": number(float(region["from_mm"])), "to": number(float(region["to_mm"]))}))
        else:
            parts.append(name)
    if not parts:
        return _("Body region not determined.")
    return _("Body region: %(regions)s.", regions=", ".join(parts))


def _body(result, f, _):
    return _("Body volume %(volume)s mL.", volume=volume_ml(f["volume_ml"]))


def _lung(result, f, _):
    side = side_name(f["name"].split()[0], _)
    first, last = (f.get("slice_range") or [None, None])[:2]
    if first is None:
        return _("%(side)s: %(volume)s mL.", side=side.capitalize(), volume=volume_ml(f["volume_ml"]))
    return _("%(side)s: %(volume)s mL, slices %(first)s-%(last)s.", side=side.capitalize(),
             volume=volume_ml(f["volume_ml"]), first=slice_number(first), last=slice_number(last))


def _coverage_words(f, _) -> str:
    apex, base = f.get("apex_covered"), f.get("base_covered")
    if apex is None and base is None:
        return _("lungs covered from apex to base") if f.get("fully_covered") else _("lungs not fully covered")
    if apex and base:
        return _("lungs covered from apex to base")
    if not apex and not base:
        return _("apices and bases not covered")
    return _("apices not covered") if not apex else _("bases not covered")


def _lungs(result, f, _):
    text = _("Total lung volume %(volume)s mL; %(coverage)s.", volume=volume_ml(f["total_volume_ml"]),
             coverage=_coverage_words(f, _))
    if f.get("outside_adult_range"):
        text += " " + _("This is outside the 2-8 L of an adult at full inspiration.")
    return text


def _lung_coverage(result, f, _):
    words = _coverage_words(f, _)
    text = _("Lung coverage: %(coverage)s.", coverage=words)
    if not f.get("fully_covered", True):
        text += " " + _("Measurements cover the part of the lungs in the series.")
    return text


def _cross_check(result, f, _):
    dice = f.get("dice") or {}
    parts = [_("%(side)s %(dice)s", side=side_name(name.split()[0], _), dice=fixed(value))
             for name, value in dice.items()]
    return _("Agreement with the classical lung mask (Dice): %(values)s.", values=", ".join(parts))


def _key_slice(result, f, _):
    if "slice_index" not in f:
        return None
    where = _slice_and_z(f, _)
    if f.get("opacity_fraction") is not None:
        return _("Key image: %(where)s, opacity in %(percent)s %% of the lung on this slice.", where=where,
                 percent=percent(100.0 * float(f["opacity_fraction"])))
    if f.get("probability") is not None:
        return _("Key image: %(where)s, slice probability %(p)s.", where=where,
                 p=fixed(f["probability"]))
    return _("Key image: %(where)s.", where=where)


def _slices_scored(result, f, _):
    first, last = (f.get("slice_range") or [0, 0])[:2]
    return _("%(count)s lung slices scored (slices %(first)s-%(last)s); the study score is the mean of the "
             "highest quarter of slice probabilities.", count=f.get("count", 0), first=slice_number(first),
             last=slice_number(last))


def _opacity_by_lung(result, f, _):
    parts = [_("%(side)s %(opacity)s %% of %(volume)s mL (ground glass %(gg)s %%, consolidation %(cons)s %%)",
               side=side_name(row.get("lung", ""), _), opacity=percent(row.get("opacity_percent", 0)),
               volume=volume_ml(row.get("lung_ml", 0)), gg=percent(row.get("ground_glass_percent", 0)),
               cons=percent(row.get("consolidation_percent", 0)))
             for row in f.get("rows") or []]
    return _("Lung opacity: %(parts)s.", parts="; ".join(parts)) if parts else None


def _worst_zone(rows: Iterable[dict[str, Any]], key: str) -> dict[str, Any] | None:
    rows = [r for r in rows if r.get(key) is not None]
    worst = max(rows, key=lambda r: float(r[key]), default=None)
    return worst if worst is not None and float(worst[key]) > 0 else None


def _opacity_by_zone(result, f, _):
    worst = _worst_zone(f.get("rows") or [], "opacity_percent")
    if worst is None:
        return _("No opacity measured in any lung zone.")
    return _("Most opacity in the %(side)s, %(zone)s: %(percent)s %% of the zone.",
             side=side_name(worst.get("lung", ""), _), zone=zone_name(worst.get("zone", ""), _),
             percent=percent(worst["opacity_percent"]))


def _method(result, f, _):
    bands = f.get("bands_hu") or {}
    gg, cons = bands.get("ground_glass") or [], bands.get("consolidation") or []
    if len(gg) != 2 or len(cons) != 2:
        return None
    return _("Ground glass counted from %(g0)s to %(g1)s HU, consolidation from %(c0)s to %(c1)s HU; vessels, "
             "airway walls and the pleural rim left out.", g0=number(gg[0], 0), g1=number(gg[1], 0),
             c0=number(cons[0], 0), c1=number(cons[1], 0))


def _emphysema(result, f, _):
    text = _("Low-attenuation lung below %(hu)s HU: %(percent)s %% of the lung on %(mm)s mm slices "
             "(LAA-950 %(laa950)s %%, LAA-910 %(laa910)s %%); mean lung density %(mean)s HU.",
             hu=f.get("threshold_hu", ""), percent=percent(f["percent"]), mm=number(f.get("slice_thickness_mm", 0)),
             laa950=percent(f.get("laa950_percent", 0)), laa910=percent(f.get("laa910_percent", 0)),
             mean=number(f.get("mean_lung_hu", 0), 0))
    caveats = [note_text(c, _) for c in f.get("caveats") or []]
    return " ".join([text, *caveats])


def _emphysema_by_zone(result, f, _):
    worst = _worst_zone(f.get("rows") or [], "laa950_percent")
    if worst is None:
        return None
    return _("Most low-attenuation lung in the %(side)s, %(zone)s: LAA-950 %(percent)s %% of the zone.",
             side=side_name(worst.get("lung", ""), _), zone=zone_name(worst.get("zone", ""), _),
             percent=percent(worst["laa950_percent"]))


def _pancreas(result, f, _):
    first, last = (f.get("slice_range") or [0, 0])[:2]
    centre = f.get("centroid_mm") or [None, None, None]
    return _("Pancreas located: %(volume)s mL, slices %(first)s-%(last)s, centre at z = %(z)s mm.",
             volume=volume_ml(f.get("volume_ml", 0)), first=slice_number(first), last=slice_number(last),
             z=number(float(centre[2])) if centre[2] is not None else "?")


def pancreas_part(result: dict[str, Any], centre_mm: list[float], _: Gettext) -> str:
    """Head, body or tail by the lesion's left-right position against the localised gland's centre (LPS x:
    the head lies to the patient's right, the tail to the left); the pancreas alone when not known."""
    gland = next((f for f in result.get("findings", []) if f.get("name") == "pancreas (localised)"), None)
    if gland is None or not gland.get("centroid_mm"):
        return _("pancreas")
    offset = float(centre_mm[0]) - float(gland["centroid_mm"][0])
    if offset < -PANCREAS_PART_MM:
        return _("pancreatic head")
    if offset > PANCREAS_PART_MM:
        return _("pancreatic tail")
    return _("pancreatic body")


def _lesion(result, f, _):
    centre = f.get("centre_mm") or [0.0, 0.0, 0.0]
    where = pancreas_part(result, centre, _)
    if "slice_index" in f:
        where = _("%(organ)s, %(where)s", organ=where, where=_slice_and_z(f, _, z=centre[2]))
    else:
        where = _("%(organ)s at z = %(z)s mm", organ=where, z=number(float(centre[2])))
    size = (" " + _("about %(size)s mm across.", size=number(f["diameter_mm"]))) if f.get("diameter_mm") else ""
    if f["name"] == "lesion candidate":
        text = _("Lesion candidate in the %(where)s, probability %(p)s.", where=where, p=fixed(f["probability"]))
    else:
        text = _("No lesion above the threshold; the most suspicious region is in the %(where)s, probability %(p)s.",
                 where=where, p=fixed(f["probability"]))
    return text + size


SENTENCES: dict[str, Callable[[dict[str, Any], dict[str, Any], Gettext], str | None]] = {
    "coverage": _coverage, "geometry": _geometry, "air calibration": _air, "body region": _body_region,
    "body": _body, "right lung": _lung, "left lung": _lung, "lungs": _lungs, "lung coverage": _lung_coverage,
    "cross-check": _cross_check, "key slice": _key_slice, "slices scored": _slices_scored,
    "opacity by lung": _opacity_by_lung, "opacity by zone": _opacity_by_zone, "method": _method,
    "emphysema": _emphysema, "emphysema by zone": _emphysema_by_zone, "pancreas (localised)": _pancreas,
    "lesion candidate": _lesion, "most suspicious region": _lesion,
}


def plain_value(value: Any) -> str:
    """A value as words and numbers, never a Python repr: lists joined, mappings as ``key value``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, ".2f").rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return ", ".join(f"{str(k).replace('_', ' ')} {plain_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(plain_value(v) for v in value)
    return str(value)


def fallback_sentence(finding: dict[str, Any]) -> str:
    """``name: value, value`` for a finding no function knows."""
    values = [plain_value(v) for k, v in finding.items() if k not in ("name", "key_image")]
    return f"{finding.get('name', '?')}: {', '.join(v for v in values if v)}"


def finding_sentence(result: dict[str, Any], finding: dict[str, Any], _: Gettext) -> str | None:
    """The finding in words (None when there is nothing to say in words); bad or unknown content falls back
    to :func:`fallback_sentence`, never an exception."""
    render = SENTENCES.get(str(finding.get("name")))
    if render is None:
        return fallback_sentence(finding)
    try:
        return render(result, finding, _)
    except (KeyError, TypeError, ValueError, IndexError):
        return fallback_sentence(finding)


def finding_slice(finding: dict[str, Any]) -> int | None:
    value = finding.get("slice_index")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def result_sentences(result: dict[str, Any], _: Gettext) -> list[Sentence]:
    """Every finding of ``result`` said in words, in the order the step wrote them."""
    out = []
    for finding in result.get("findings") or []:
        if not isinstance(finding, dict) or finding.get("name") in CHART_ONLY:
            continue
        text = finding_sentence(result, finding, _)
        if text:
            out.append(Sentence(text, str(finding.get("name")), finding_slice(finding)))
    return out


def model_name(model: str, _: Gettext) -> str:
    """What a model measures or screens for, in words (its id when unknown)."""
    names = {"series-qa": _("Series quality"), "lungs-classical": _("Lung volumes (HU threshold mask)"),
             "lung-segmentation": _("Lung volumes (learned lung mask)"), "chest-opacity": _("Lung opacity"),
             "lung-emphysema": _("Emphysema (low-attenuation lung)"), "chest-covid19": _("COVID-19 pneumonia screen"),
             "abdomen-pancreas": _("Pancreatic lesion screen"), "body-region": _("Body region")}
    return names.get(model, model)


# the English notes the pipelines and packs write today, each as a pattern and its translatable sentence
_NOTES: list[tuple[re.Pattern[str], Callable[[re.Match[str], Gettext], str]]] = [
    (re.compile(r"Both lungs are covered from apex to base\."),
     lambda m, _: _("Both lungs are covered from apex to base.")),
    (re.compile(r"The lungs run beyond both ends of the series: apices and bases are not covered\."),
     lambda m, _: _("The lungs run beyond both ends of the series: apices and bases are not covered.")),
    (re.compile(r"The lung apices are cut off at the top of the series; volumes are partial\."),
     lambda m, _: _("The lung apices are cut off at the top of the series; volumes are partial.")),
    (re.compile(r"The lung bases are cut off at the bottom of the series; volumes are partial\."),
     lambda m, _: _("The lung bases are cut off at the bottom of the series; volumes are partial.")),
    (re.compile(r"Volumes from HU thresholds; an adult at full inspiration has 2-8 L of lung\."),
     lambda m, _: _("Volumes from HU thresholds; an adult at full inspiration has 2-8 L of lung.")),
    (re.compile(r"The total, (\d+) mL, is outside that range\."),
     lambda m, _: _("The total, %(volume)s mL, is outside that range.", volume=m[1])),
    (re.compile(r"The total lung volume, (\d+) mL, is outside the 2-8 L of an adult at full inspiration\."),
     lambda m, _: _("The total lung volume, %(volume)s mL, is outside the 2-8 L of an adult at full inspiration.",
                    volume=m[1])),
    (re.compile(r"The learned and the classical lung masks disagree \(Dice ([^)]*), below ([\d.]+)\): check the key "
                r"slices before relying on lung measurements\."),
     lambda m, _: _("The learned and the classical lung masks disagree (Dice %(values)s, below %(limit)s): check "
                    "the key slices before relying on lung measurements.", values=m[1].replace(" lung", ""),
                    limit=m[2])),
    (re.compile(r"Not validated: a Hounsfield-unit measurement of lung opacity, not validated on this site's "
                r"patients; research use only\."),
     lambda m, _: _("A Hounsfield-unit measurement of lung opacity, not validated on this site's patients.")),
    (re.compile(r"Not validated: a Hounsfield-unit measurement of low-attenuation lung, not validated on this "
                r"site's patients or scanners; research use only\."),
     lambda m, _: _("A Hounsfield-unit measurement of low-attenuation lung, not validated on this site's patients "
                    "or scanners.")),
    (re.compile(r"Research use only, not for clinical decisions: trained on the SARS-CoV-2 CT-scan dataset "
                r"\(non-commercial licence, cropped slice images from one source\); it has not been validated on "
                r"patients at this site\. Check it on local cases with `appliance evaluate` before relying on it\."),
     lambda m, _: _("Trained on the SARS-CoV-2 CT-scan dataset (non-commercial licence, cropped slice images from "
                    "one source); not validated on patients at this site. Check it on local cases with "
                    "`appliance evaluate` before relying on it.")),
    (re.compile(r"synthetic-data demonstration, not for clinical use"),
     lambda m, _: _("synthetic-data demonstration, not for clinical use")),
    (re.compile(r"Not validated at this site: a published research model \(trained on 8 LCTSC 2017 chest CT "
                r"cases\) checked here only against its own full-resolution output and the classical lung mask on "
                r"one real series\. Lung volumes are for orientation, not for clinical decisions\."),
     lambda m, _: _("A published research model (trained on 8 LCTSC 2017 chest CT cases), checked here only "
                    "against its own full-resolution output and the classical lung mask on one real series. Lung "
                    "volumes are for orientation, not for clinical decisions.")),
    # the emphysema measurement's caveats
    (re.compile(r"Slice thickness ([\d.]+) mm \((\w+)\)\."),
     lambda m, _: _("Slice thickness %(mm)s mm (%(source)s).", mm=m[1], source=m[2])),
    (re.compile(r"Sections thicker than ([\d.]+) mm: -950 HU under-reads them, so -910 HU \(the thick-section density "
                r"mask\) is primary and not comparable with thin-section %LAA-950; no published cut-off is applied\."),
     lambda m, _: _("Sections thicker than %(mm)s mm: -950 HU under-reads them, so -910 HU (the thick-section "
                    "density mask) is primary and not comparable with thin-section %%LAA-950; no published cut-off "
                    "is applied.", mm=m[1])),
    (re.compile(r"Contrast-enhanced \(([^)]*)\): enhancement raises lung density and lowers %LAA\."),
     lambda m, _: _("Contrast-enhanced (%(agent)s): enhancement raises lung density and lowers %%LAA.", agent=m[1])),
    (re.compile(r"Mean lung density (-?\d+) HU is denser than full inspiration usually gives: an expiratory or "
                r"shallow-breath scan lowers %LAA\."),
     lambda m, _: _("Mean lung density %(hu)s HU is denser than full inspiration usually gives: an expiratory or "
                    "shallow-breath scan lowers %%LAA.", hu=m[1])),
    # why a model did not run (analysis.py and the steps' NotApplicable)
    (re.compile(r"the series is not axial \(a coronal or sagittal reformat\); the models read axial slices"),
     lambda m, _: _("the series is not axial (a coronal or sagittal reformat); the models read axial slices")),
    (re.compile(r"model packs? not installed or refused"), lambda m, _: _("model pack not installed or refused")),
    (re.compile(r"model pack not installed"), lambda m, _: _("model pack not installed")),
    (re.compile(r"no lungs found in this series"), lambda m, _: _("no lungs found in this series")),
    (re.compile(r"No lung was found in this series, so lung density cannot be measured\."),
     lambda m, _: _("No lung was found in this series, so lung density cannot be measured.")),
    (re.compile(r"No lung remained once the airways and the pleural rim were left out\."),
     lambda m, _: _("No lung remained once the airways and the pleural rim were left out.")),
    (re.compile(r"no pancreas found in this series \(is the upper abdomen covered\?\)"),
     lambda m, _: _("no pancreas found in this series (is the upper abdomen covered?)")),
    (re.compile(r"Slices are ([\d.]+) mm thick; low-attenuation percentages are only defined on sections up to "
                r"([\d.]+) mm\."),
     lambda m, _: _("Slices are %(thickness)s mm thick; low-attenuation percentages are only defined on sections "
                    "up to %(limit)s mm.", thickness=m[1], limit=m[2])),
    (re.compile(r"the learned lung mask found no lung where the classical mask found (\d+) mL \(images unlike the "
                r"chest CT it was trained on, e\.g\. a small matrix or thick slices\)"),
     lambda m, _: _("the learned lung mask found no lung where the classical mask found %(volume)s mL (images "
                    "unlike the chest CT it was trained on, e.g. a small matrix or thick slices)", volume=m[1])),
    (re.compile(r"; the classical lung mask was used"), lambda m, _: _("; the classical lung mask was used")),
    (re.compile(r"classifier (\S+) (\S+) is off at this site: its evaluation may not hold on this site's scanners; "
                r"the admin can switch it on from the admin page after `appliance evaluate --model \S+ DATA "
                r"--record` on local cases"),
     lambda m, _: _("classifier %(model)s %(version)s is off at this site: its evaluation may not hold on this "
                    "site's scanners; the admin can switch it on from the admin page after `appliance evaluate "
                    "--model %(model)s DATA --record` on local cases", model=m[1], version=m[2])),
]


def note_text(text: str | None, _: Gettext) -> str:
    """An English note written by a pipeline, a pack or the analysis, in the reader's language: every known
    sentence is translated, anything else is kept as written."""
    out = text or ""
    for pattern, render in _NOTES:
        out = pattern.sub(_with(render, _), out)
    return out


def _with(render: Callable[[re.Match[str], Gettext], str], _: Gettext) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return render(match, _)
    return replace


def skipped_sentence(entry: dict[str, Any], _: Gettext) -> str:
    """One ``skipped_models`` entry of an analysis record: which model did not run and why."""
    outside = entry.get("not_applicable")
    if isinstance(outside, dict) and outside.get("reads"):
        covers = [region_name(str(r), _) for r in outside.get("covers") or []]
        return _("%(model)s not applicable: this series covers %(covers)s; the model reads the %(region)s",
                 model=model_name(str(entry.get("model", "?")), _),
                 covers=", ".join(covers) if covers else _("no body region that could be recognised"),
                 region=region_name(str(outside["reads"]), _))
    return _("%(model)s not assessed: %(why)s", model=model_name(str(entry.get("model", "?")), _),
             why=note_text(str(entry.get("why", "")), _))


# the report's impression: what needs review, what was measured, what could not be assessed

HEADLINE = {"series-qa": ("air calibration",), "lungs-classical": ("lungs",), "lung-segmentation": ("lungs",),
            "chest-opacity": ("opacity by lung",), "lung-emphysema": ("emphysema",),
            "chest-covid19": ("key slice",), "abdomen-pancreas": ("lesion candidate", "most suspicious region"),
            "body-region": ("body region",)}
MEASUREMENTS = frozenset({"series-qa", "lungs-classical", "lung-segmentation", "body-region"})


@dataclasses.dataclass
class Impression:
    """The opening of the report, each item a sentence: flagged results nobody has reviewed yet, the key
    measurements, and what could not be assessed (models that did not run, series refused) with the reason."""

    needs_review: list[str] = dataclasses.field(default_factory=list)
    measured: list[str] = dataclasses.field(default_factory=list)
    not_assessed: list[str] = dataclasses.field(default_factory=list)


def headline(result: dict[str, Any], _: Gettext) -> str | None:
    """The one sentence that says most about ``result`` (its main measurement or its strongest finding)."""
    wanted = HEADLINE.get(result.get("model", ""), ())
    for finding in result.get("findings") or []:
        if isinstance(finding, dict) and finding.get("name") in wanted:
            return finding_sentence(result, finding, _)
    sentences = result_sentences(result, _)
    return sentences[0].text if sentences else None


def _verdict(result: dict[str, Any], _: Gettext) -> str:
    from appliance.outputs.report import result_summary  # the report module imports this one

    return result_summary(result, _)


def result_line(result: dict[str, Any], _: Gettext) -> str:
    """``Model name: verdict. Headline sentence`` (a measurement has no verdict)."""
    said = headline(result, _) or ""
    if result.get("model") in MEASUREMENTS:
        return f"{model_name(result['model'], _)}: {said}".strip()
    return f"{model_name(result['model'], _)}: {_verdict(result, _)}. {said}".strip()


def _awaits_review(result: dict[str, Any], reviews: dict[int, dict[str, Any]]) -> bool:
    """No review applies to ``result``: none was made, or the earlier one no longer applies (needs re-review)."""
    state = getattr(result.get("review"), "state", None)
    if state is not None:
        return str(state) in ("not reviewed", "needs re-review")
    return result.get("id") not in reviews


def impression(study: dict[str, Any], reviews: dict[int, dict[str, Any]], _: Gettext) -> Impression:
    """The impression of ``study`` (as :func:`appliance.store.studies.study` returns it) given the latest review
    of each result."""
    out = Impression()
    for series in study.get("series") or []:
        if series.get("status") == "rejected":
            out.not_assessed.append(_("Series %(number)s not analysed: %(code)s. %(reason)s",
                                      number=series.get("series_number") or "", code=series.get("reason_code") or "",
                                      reason=note_text(series.get("reason") or "", _)))
        for entry in series.get("skipped_models") or []:
            out.not_assessed.append(skipped_sentence(entry, _))
        for result in series.get("results") or []:
            waiting = result.get("flagged") and result.get("model") not in MEASUREMENTS and \
                _awaits_review(result, reviews)
            (out.needs_review if waiting else out.measured).append(result_line(result, _))
    return out
