"""Readers for the public data sources, each turning a folder as downloaded into a list of :class:`SourceImage`."""

from covidxray.sources.base import SourceImage, SourceScan
from covidxray.sources.ieee8023 import DEFAULT_FINDINGS, FRONTAL_VIEWS, read_ieee8023
from covidxray.sources.kermany import kermany_patient_id, read_kermany
from covidxray.sources.presplit import read_presplit

__all__ = [
    "DEFAULT_FINDINGS",
    "FRONTAL_VIEWS",
    "SourceImage",
    "SourceScan",
    "kermany_patient_id",
    "read_ieee8023",
    "read_kermany",
    "read_presplit",
]
