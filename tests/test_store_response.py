"""node.store_response writes the C-STORE-RSP command set pynetdicom would write, byte for byte."""
from __future__ import annotations

import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node import store_response


def response(message_id: int, sop_class: str, sop_instance: str, status: int, **optional) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    for name, value in optional.items():
        setattr(rsp, name, value)
    return rsp


def pynetdicom_bytes(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    [pdata] = list(message.encode_msg(1, 16384))
    [(context_id, pdv)] = pdata.presentation_data_value_list
    assert pdv[0] == 0x03  # command, last fragment
    return pdv[1:]


@pytest.mark.parametrize("message_id", [1, 2, 0x7FFF, 0xFFFF])
@pytest.mark.parametrize("sop_class", [CTImageStorage, SecondaryCaptureImageStorage])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "2.25." + "9" * 59])
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xB007, 0xC000])
def test_the_command_set_is_pynetdicoms_byte_for_byte(message_id, sop_class, sop_instance, status):
    rsp = response(message_id, sop_class, sop_instance, status)
    assert store_response.encode(rsp) == pynetdicom_bytes(rsp)


@pytest.mark.parametrize("optional", [{"ErrorComment": "disk full"}, {"OffendingElement": [0x00080018]}])
def test_optional_elements_are_left_to_pynetdicom(optional):
    assert store_response.encode(response(1, CTImageStorage, "1.2.3", 0xC000, **optional)) is None


def test_a_request_and_a_uid_that_is_not_ascii_are_left_to_pynetdicom():
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3"
    assert store_response.encode(request) is None
    assert store_response.encode(response(1, CTImageStorage, "1.2.\u00e93", 0)) is None
