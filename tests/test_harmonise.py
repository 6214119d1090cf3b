"""The shared pathology names on the releases' real label sets, and the view spellings."""

from ark_core.data.adapters.vindr_cxr import VINDR_FULL_LABELS, VINDR_KAGGLE_CLASSES
from ark_core.data.harmonise import keep_views, pathology, sex, shared_labels, view
from ark_core.tasks import (
    CHESTXRAY14_LABELS,
    CHEXPERT_LABELS,
    RSNA_LABELS,
    SHENZHEN_LABELS,
    VINDR_ARK_LABELS,
)


def test_chexpert_labels_find_their_chestxray14_counterparts():
    pairs = shared_labels(CHESTXRAY14_LABELS, CHEXPERT_LABELS)
    by_name = {t: [CHESTXRAY14_LABELS[i] for i in s] for t, s in pairs.items()}
    assert by_name == {
        "Cardiomegaly": ["Cardiomegaly"], "Edema": ["Edema"], "Consolidation": ["Consolidation"],
        "Pneumonia": ["Pneumonia"], "Atelectasis": ["Atelectasis"],
        "Pneumothorax": ["Pneumothorax"], "Pleural Effusion": ["Effusion"],
    }
    # CheXpert's own findings without an NIH label stay undefined, not guessed.
    assert "Lung Opacity" not in pairs and "No Finding" not in pairs


def test_vindr_and_the_others_meet_in_one_name_space():
    nih = shared_labels(VINDR_FULL_LABELS, CHESTXRAY14_LABELS)
    assert {t: VINDR_FULL_LABELS[s[0]] for t, s in nih.items()} == {
        "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
        "Effusion": "Pleural effusion", "Infiltration": "Infiltration",
        "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax",
        "Consolidation": "Consolidation", "Emphysema": "Emphysema",
        "Fibrosis": "Pulmonary fibrosis", "Pleural_Thickening": "Pleural thickening",
        "Edema": "Edema",
    }
    assert "Nodule" not in nih and "Mass" not in nih  # VinDr-Kaggle's Nodule/Mass is neither
    assert "Nodule/Mass" in VINDR_KAGGLE_CLASSES
    ark = shared_labels(CHEXPERT_LABELS, VINDR_ARK_LABELS)
    assert [CHEXPERT_LABELS[ark[t][0]] for t in ("Pleural effusion", "Pneumonia", "No finding")] \
        == ["Pleural Effusion", "Pneumonia", "No Finding"]
    assert shared_labels(SHENZHEN_LABELS, VINDR_ARK_LABELS) == {"Tuberculosis": [0]}
    assert shared_labels(RSNA_LABELS, ("Lung Opacity", "normal")) == {"Lung Opacity": [2],
                                                                      "normal": [0]}
    assert shared_labels(SHENZHEN_LABELS, CHESTXRAY14_LABELS) == {}


def test_every_name_maps_to_one_spelling_of_its_own():
    names = {*CHESTXRAY14_LABELS, *CHEXPERT_LABELS, *VINDR_FULL_LABELS, *RSNA_LABELS}
    shared = {pathology(n) for n in names}
    # Spellings that differ only in case or separators are one pathology.
    squashed = {n.lower().replace("_", " ") for n in shared}
    assert len(squashed) == len(shared)


def test_views_and_sex_in_the_dicom_spellings():
    assert [view(v) for v in ("PA", " ap ", "LL", "RL", "LATERAL", "AP AXIAL", "", None)] == \
        ["PA", "AP", "LATERAL", "LATERAL", "LATERAL", "AP AXIAL", "", ""]
    assert [sex(v) for v in ("Male", "F", "female", "Unknown", "")] == ["M", "F", "F", "", ""]
    assert keep_views(["PA", "AP", "LATERAL", "", "AP AXIAL"], ["AP", "PA"]) == [0, 1]


def test_the_documented_map_is_the_one_in_the_code():
    import re
    from pathlib import Path

    from ark_core.data.harmonise import PATHOLOGY_SYNONYMS

    doc = (Path(__file__).parents[1] / "docs" / "datasets.md").read_text(encoding="utf-8")
    table = doc.split("| a release's label | shared name |", 1)[1].split("\n\n", 1)[0]
    assert dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", table, re.M)) == PATHOLOGY_SYNONYMS
