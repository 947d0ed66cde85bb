from pynetdicom import sop_class as sc

from dicom_io.sop_classes import ACCEPTED, CAPTIONABLE, IMAGE_CLASSES, is_captionable


def test_ct_and_mr_families_are_captioned_and_companions_are_not():
    assert {
        sc.CTImageStorage,
        sc.EnhancedCTImageStorage,
        sc.LegacyConvertedEnhancedCTImageStorage,
        sc.MRImageStorage,
        sc.EnhancedMRImageStorage,
        sc.LegacyConvertedEnhancedMRImageStorage,
    } == CAPTIONABLE
    for companion in (sc.ComprehensiveSRStorage, sc.SecondaryCaptureImageStorage, sc.GrayscaleSoftcopyPresentationStateStorage):
        assert companion in ACCEPTED and not is_captionable(companion)


def test_image_classes_need_pixel_data_and_documents_do_not():
    assert CAPTIONABLE <= IMAGE_CLASSES and sc.SecondaryCaptureImageStorage in IMAGE_CLASSES
    assert sc.ComprehensiveSRStorage not in IMAGE_CLASSES and sc.EncapsulatedPDFStorage not in IMAGE_CLASSES
