"""DICOM in and out: reading and checking a series (series), writing the derived series (derived),
the chest X-ray SEG and Structured Report (cxr_outputs)."""
