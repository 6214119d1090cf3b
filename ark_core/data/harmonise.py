"""One name space for pathologies, views and sex across releases.

Releases spell the same finding differently ("Effusion", "Pleural Effusion", "Pleural
effusion"), so a head trained on one cannot be scored on another's films by name. Each
label maps to a shared pathology name (``pathology``); names not listed are already shared
(e.g. "Cardiomegaly") or have no counterpart (e.g. VinDr's "Nodule/Mass", which is neither
"Nodule" nor "Mass"). Views and sex are normalised to the DICOM spellings (PA, AP,
LATERAL; M, F) so that ``views: [PA, AP]`` and the subgroup report mean one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# A release's label -> the shared name (only where they differ).
PATHOLOGY_SYNONYMS: dict[str, str] = {
    # ChestX-ray14
    "Pleural_Thickening": "Pleural Thickening",
    # CheXpert, MIMIC-CXR (CheXpert labeler)
    "Pleural Effusion": "Effusion",
    # VinDr-CXR
    "Pleural effusion": "Effusion",
    "Pleural thickening": "Pleural Thickening",
    "Pulmonary fibrosis": "Fibrosis",
    "Aortic enlargement": "Aortic Enlargement",
    "Lung tumor": "Lung Tumor",
    "No finding": "No Finding",
    "Other diseases": "Other Diseases",
    "Other lesion": "Other Lesion",
    # RSNA Pneumonia, the Mendeley-V2 pediatric set, COVIDx
    "Normal": "No Finding",
    "normal": "No Finding",
    "pneumonia": "Pneumonia",
    # TBX11K
    "Healthy": "No Finding",
    # ChestDR (MedFMC); its "pneumonia" is spelled as above
    "pleural_effusion": "Effusion",
    "nodule": "Nodule",
    "cardiomegaly": "Cardiomegaly",
    "hilar_enlargement": "Hilar Enlargement",
    "fracture_old": "Old Fracture",
    "fibrosis": "Fibrosis",
    "aortic_calcification": "Calcification of the Aorta",
    "tortuous_aorta": "Tortuous Aorta",
    "thickened_pleura": "Pleural Thickening",
    "TB": "Tuberculosis",
    "pneumothorax": "Pneumothorax",
    "emphysema": "Emphysema",
    "atelectasis": "Atelectasis",
    "calcification": "Calcification",
    "pulmonary_edema": "Edema",
    "increased_lung_markings": "Increased Lung Markings",
    "elevated_diaphragm": "Elevated Diaphragm",
    "consolidation": "Consolidation",
}

VIEWS = ("PA", "AP", "LATERAL")
_VIEW_SYNONYMS = {"POSTEROANTERIOR": "PA", "ANTEROPOSTERIOR": "AP", "LL": "LATERAL",
                  "RL": "LATERAL", "LAT": "LATERAL", "XTABLE LATERAL": "LATERAL"}
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}


def pathology(label: str) -> str:
    """The shared name of a release's label."""
    return PATHOLOGY_SYNONYMS.get(label, label)


def shared_labels(source: Sequence[str], target: Sequence[str]) -> dict[str, list[int]]:
    """For each ``target`` label, the ``source`` labels of the same pathology (by index).

    Target labels without a counterpart are absent: their AUC is undefined, not 0.5.
    """
    out: dict[str, list[int]] = {}
    for t in target:
        found = [i for i, s in enumerate(source) if pathology(s) == pathology(t)]
        if found:
            out[t] = found
    return out


def view(raw: str) -> str:
    """PA, AP or LATERAL; other positions upper-cased as written ("AP AXIAL"); "" unknown."""
    v = " ".join(str(raw or "").upper().split())
    return _VIEW_SYNONYMS.get(v, v)


def sex(raw: str) -> str:
    """M or F; "" when unknown."""
    return _SEX.get(str(raw or "").strip().upper(), "")


def normalise_meta(meta: dict[str, list]) -> None:
    """Views and sex of an adapter's metadata in the shared spellings, in place."""
    for key, fn in (("view", view), ("sex", sex)):
        if key in meta:
            spelled = {v: fn(v) for v in set(meta[key])}  # a release has few spellings
            meta[key] = [spelled[v] for v in meta[key]]


def keep_views(values: Iterable[str], views: Sequence[str]) -> list[int]:
    """Rows whose (normalised) view is one of ``views``."""
    wanted = {view(v) for v in views}
    return [i for i, v in enumerate(values) if v in wanted]
