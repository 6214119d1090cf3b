"""One adapter per public chest X-ray release, registered by the name a task config uses."""

from .base import Adapter, DatasetError
from .chestdr import ChestDr
from .chestxray14 import ChestXray14
from .chexpert import CheXpert
from .covidx import Covidx
from .csv_generic import CsvDataset
from .cxr_lt import CxrLt
from .mimic_cxr import MimicCxr
from .node21 import Node21
from .pediatric_pneumonia import PediatricPneumonia
from .rsna_pneumonia import RsnaPneumonia
from .shenzhen import Shenzhen
from .siim_acr import SiimAcr
from .tbx11k import Tbx11k
from .vindr_cxr import VinDrCxr

ADAPTERS: dict[str, type[Adapter]] = {
    a.name: a
    for a in (
        ChestXray14, CheXpert, MimicCxr, RsnaPneumonia, VinDrCxr, Shenzhen, PediatricPneumonia,
        CxrLt, Covidx, SiimAcr, Tbx11k, Node21, ChestDr, CsvDataset,
    )
}  # fmt: skip


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "Adapter", "DatasetError", "get_adapter"]
