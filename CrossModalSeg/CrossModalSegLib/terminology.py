"""Standard terminology (SNOMED CT codes, as in Slicer's "3D Slicer General Anatomy list" context) for the
structures this extension is used on, so that its segments say what they are in a form DICOM SEG export and other
tools understand, not only by a free-text name.

A structure's name is matched loosely (case, '_' and '-' ignored, common abbreviations). A structure not known here
keeps Slicer's default entry; its name still says what it is.
"""

from __future__ import annotations

import re

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")

# (category, (scheme, code, meaning)) by normalised structure name; SNOMED CT concept ids.
_TERMS: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {}


def _add(category: tuple[str, str, str], code: str, meaning: str, *names: str) -> None:
    for name in (meaning, *names):
        _TERMS[normalise(name)] = (category, ("SCT", code, meaning))


def normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def terminology_entry(structure: str) -> str | None:
    """Slicer's terminology entry string for `structure` (the value of a segment's "TerminologyEntry" tag), or None
    where the structure is not known here."""
    found = _TERMS.get(normalise(structure))
    if found is None:
        return None
    category, kind = found
    return "~".join([CONTEXT, "^".join(category), "^".join(kind), "^^", ANATOMIC_CONTEXT, "^^", "^^"])


# Abdomen (CT and MR)
_add(ANATOMY, "10200004", "Liver")
_add(ANATOMY, "64033007", "Kidney", "kidneys")
_add(ANATOMY, "78961009", "Spleen")
_add(ANATOMY, "15776009", "Pancreas")
_add(ANATOMY, "28231008", "Gallbladder", "gall bladder")
_add(ANATOMY, "23451007", "Adrenal gland")
_add(ANATOMY, "69695003", "Stomach")
# Heart (MM-WHS)
_add(ANATOMY, "80891009", "Heart")
_add(ANATOMY, "74281007", "Myocardium", "lv myo", "lv myocardium", "left ventricle myocardium")
_add(ANATOMY, "87878005", "Left ventricle", "lv", "lv blood", "lv blood pool", "left ventricle blood pool")
_add(ANATOMY, "53085002", "Right ventricle", "rv", "rv blood")
_add(ANATOMY, "82471001", "Left atrium", "la", "la blood")
_add(ANATOMY, "73829009", "Right atrium", "ra", "ra blood")
_add(ANATOMY, "15825003", "Aorta", "aa", "ascending aorta")
_add(ANATOMY, "81040000", "Pulmonary artery", "pa")
# Brain, spine, prostate
_add(ANATOMY, "12738006", "Brain")
_add(ANATOMY, "2748008", "Spinal cord", "cord")
_add(ANATOMY, "41216001", "Prostate", "prostate gland")
# Tumour regions (BraTS labels)
_add(ALTERED, "108369006", "Neoplasm", "tumour", "tumor", "lesion", "enhancing", "enhancing tumour",
     "enhancing tumor", "non enhancing", "non enhancing tumour", "non enhancing tumor")
_add(ALTERED, "79654002", "Edema", "oedema", "peritumoral edema", "peritumoural oedema")
_add(ALTERED, "6574001", "Necrosis", "necrotic core")
