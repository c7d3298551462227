"""Standard terminology (SNOMED CT codes from Slicer's own lists) for the structures this extension is used on, so
that its segments say what they are in a form DICOM SEG export and other tools understand, not only by a free-text
name. Each code is filed under the segmentation context that lists it in Slicer 5.8 (Modules/Loadable/Terminologies/
Resources): the "3D Slicer General Anatomy list" where it is there, else the "DICOM master list" (the atria, the
pulmonary artery, neoplasm); a structure in neither (myocardium) gets no code here.

A structure's name is matched loosely (case, '_' and '-' ignored, common abbreviations). A structure not known here
keeps Slicer's default entry; its name still says what it is.
"""

from __future__ import annotations

import re

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")

# (context, category, (scheme, code, meaning)) by normalised structure name; SNOMED CT concept ids.
_TERMS: dict[str, tuple[str, tuple[str, str, str], tuple[str, str, str]]] = {}


def _add(category: tuple[str, str, str], code: str, meaning: str, *names: str, context: str = CONTEXT) -> None:
    for name in (meaning, *names):
        _TERMS[normalise(name)] = (context, category, ("SCT", code, meaning))


def normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def terminology_entry(structure: str) -> str | None:
    """Slicer's terminology entry string for `structure` (the value of a segment's "TerminologyEntry" tag), or None
    where the structure is not known here."""
    found = _TERMS.get(normalise(structure))
    if found is None:
        return None
    context, category, kind = found
    return "~".join([context, "^".join(category), "^".join(kind), "^^", ANATOMIC_CONTEXT, "^^", "^^"])


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
_add(ANATOMY, "87878005", "Left ventricle", "lv", "lv blood", "lv blood pool", "left ventricle blood pool")
_add(ANATOMY, "53085002", "Right ventricle", "rv", "rv blood")
_add(ANATOMY, "82471001", "Left atrium", "la", "la blood", context=DICOM_CONTEXT)
_add(ANATOMY, "73829009", "Right atrium", "ra", "ra blood", context=DICOM_CONTEXT)
_add(ANATOMY, "15825003", "Aorta", "aa", "ascending aorta")
_add(ANATOMY, "81040000", "Pulmonary artery", "pa", context=DICOM_CONTEXT)
# Brain, spine, prostate
_add(ANATOMY, "12738006", "Brain")
_add(ANATOMY, "2748008", "Spinal cord", "cord")
_add(ANATOMY, "41216001", "Prostate", "prostate gland")
# Tumour regions (BraTS labels)
_add(ALTERED, "108369006", "Neoplasm", "tumour", "tumor", "lesion", "enhancing", "enhancing tumour",
     "enhancing tumor", "non enhancing", "non enhancing tumour", "non enhancing tumor", context=DICOM_CONTEXT)
_add(ALTERED, "79654002", "Edema", "oedema", "peritumoral edema", "peritumoural oedema")
_add(ALTERED, "6574001", "Necrosis", "necrotic core")
