"""Readers for the public data sources, each turning a folder as downloaded into a list of :class:`SourceImage`."""

from covidxray.data.sources.base import SourceImage, SourceScan, parse_age, parse_sex
from covidxray.data.sources.generic import read_generic
from covidxray.data.sources.ieee8023 import DEFAULT_FINDINGS, FRONTAL_VIEWS, read_ieee8023
from covidxray.data.sources.kermany import kermany_patient_id, read_kermany
from covidxray.data.sources.nih import NIH_VIEWS, read_nih
from covidxray.data.sources.presplit import read_presplit

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
