"""Which storage SOP classes and transfer syntaxes MedCap accepts, and which it captions."""

from __future__ import annotations

from pydicom import uid
from pydicom import uid as sc  # the storage SOP class UIDs, typed (pynetdicom makes the same names at import time)

#: Image classes the captioner reads.
CAPTIONABLE: frozenset[str] = frozenset(
    {
        sc.CTImageStorage,
        sc.EnhancedCTImageStorage,
        sc.LegacyConvertedEnhancedCTImageStorage,
        sc.MRImageStorage,
        sc.EnhancedMRImageStorage,
        sc.LegacyConvertedEnhancedMRImageStorage,
    }
)

_SECONDARY_CAPTURE: frozenset[str] = frozenset(
    {
        sc.SecondaryCaptureImageStorage,
        sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
        sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)

#: Classes that travel with CT/MR studies: accepted and recorded, never captioned.
COMPANIONS: frozenset[str] = _SECONDARY_CAPTURE | frozenset(
    {
        sc.EnhancedMRColorImageStorage,
        sc.BasicTextSRStorage,
        sc.EnhancedSRStorage,
        sc.ComprehensiveSRStorage,
        sc.Comprehensive3DSRStorage,
        sc.ExtensibleSRStorage,
        sc.KeyObjectSelectionDocumentStorage,
        sc.GrayscaleSoftcopyPresentationStateStorage,
        sc.ColorSoftcopyPresentationStateStorage,
        sc.PseudoColorSoftcopyPresentationStateStorage,
        sc.BlendingSoftcopyPresentationStateStorage,
        sc.EncapsulatedPDFStorage,
    }
)

ACCEPTED: frozenset[str] = CAPTIONABLE | COMPANIONS

#: Uncompressed first (preferred when a peer offers several), then the common compressed ones;
#: compressed pixel data is stored as received and decoded later (pylibjpeg/gdcm plugins).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)

#: Classes whose instances must carry pixel data to be usable.
IMAGE_CLASSES: frozenset[str] = CAPTIONABLE | _SECONDARY_CAPTURE | {sc.EnhancedMRColorImageStorage}


def is_captionable(sop_class_uid: str) -> bool:
    return sop_class_uid in CAPTIONABLE
