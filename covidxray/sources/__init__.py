"""Readers for the public data sources, each turning a folder as downloaded into a list of :class:`SourceImage`."""

from covidxray.sources.base import SourceImage, SourceScan, parse_age, parse_sex
from covidxray.sources.generic import read_generic
from covidxray.sources.ieee8023 import DEFAULT_FINDINGS, FRONTAL_VIEWS, read_ieee8023
from covidxray.sources.kermany import kermany_patient_id, read_kermany
from covidxray.sources.nih import NIH_VIEWS, read_nih
from covidxray.sources.presplit import read_presplit

__all__ = [
    "DEFAULT_FINDINGS",
    "FRONTAL_VIEWS",
    "NIH_VIEWS",
    "SourceImage",
    "SourceScan",
    "kermany_patient_id",
    "parse_age",
    "parse_sex",
    "read_generic",
    "read_ieee8023",
    "read_kermany",
    "read_nih",
    "read_presplit",
]
