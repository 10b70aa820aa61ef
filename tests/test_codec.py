"""Wire format: exact msgpack bytes, JSON, and a 4xx for each kind of bad input."""

import json
import struct

import msgpack
import numpy as np
import pytest

from services.codec import (
    JSON,
    MSGPACK,
    RequestError,
    decode_predict_request,
    decode_tensor,
    encode_body,
    encode_tensor,
    media_type_for,
    negotiate_response_media,
)

SHAPE = (4,)
LIMIT = 1 << 20


def decode(document, media=MSGPACK, max_rows=8):
    body = msgpack.packb(document, use_bin_type=True) if media == MSGPACK else json.dumps(document).encode()
    return decode_predict_request(body, media, SHAPE, max_rows, LIMIT)



class TestTensorRoundTrip:
    def test_exact_little_endian_bytes(self):
        array = np.array([[1.0, -2.5]], dtype=np.float32)

        tensor = encode_tensor(array)

        assert tensor == {"dtype": "float32", "shape": [1, 2], "data": struct.pack("<2f", 1.0, -2.5)}

    def test_negative_zero_survives(self):
        array = np.array([[-0.0, 0.0]], dtype=np.float32)

        decoded = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(array)), raw=False), "inputs")

        assert np.signbit(decoded[0, 0])
        assert not np.signbit(decoded[0, 1])

    def test_decoded_array_is_writable_copy(self):
        tensor = encode_tensor(np.ones((2, 4), dtype=np.float32))

        decoded = decode_tensor(tensor, "inputs")
        decoded[0, 0] = 5.0

        assert decoded.flags.writeable
        assert decoded.flags.owndata

    def test_big_endian_input_is_read_as_little_endian_contract(self):
        data = struct.pack("<4f", 1, 2, 3, 4)

        decoded = decode_tensor({"dtype": "float32", "shape": [1, 4], "data": data}, "inputs")

        assert decoded.tolist() == [[1.0, 2.0, 3.0, 4.0]]


class TestPredictRequest:
    def test_msgpack_request(self):
        request = decode({"inputs": encode_tensor(np.zeros((3, 4), np.float32)), "request_id": "abc-1"})

        assert request.inputs.shape == (3, 4)
        assert request.request_id == "abc-1"
        assert request.path == "auto"

    def test_json_request_with_nested_lists(self):
        request = decode({"inputs": [[1, 2, 3, 4]], "path": "dense"}, media=JSON)

        assert request.inputs.dtype == np.float32
        assert request.path == "dense"

    @pytest.mark.parametrize("document, status, code, field", [
        ({"inputs": [[1, 2, 3]]}, 422, "invalid_shape", "inputs"),
        ({"inputs": [[1, 2, 3, 4], [1, 2, 3]]}, 422, "invalid_shape", "inputs[1]"),
        ({"inputs": [[1, 2, 3, "x"]]}, 422, "invalid_dtype", "inputs"),
        ({"inputs": [[True, False, True, False]]}, 422, "invalid_dtype", "inputs"),
        ({"inputs": [[None, 1, 2, 3]]}, 422, "invalid_dtype", "inputs"),
        ({"inputs": [[10**40, 1, 2, 3]]}, 422, "non_finite", "inputs[0]"),
        ({"inputs": [[1, 2, 3, 4]], "extra": 1}, 422, "unknown_field", "extra"),
        ({"request_id": "a"}, 422, "missing_field", "inputs"),
        ({"inputs": [[1, 2, 3, 4]], "request_id": "has space"}, 422, "invalid_field", "request_id"),
        ({"inputs": [[1, 2, 3, 4]], "path": "fast"}, 422, "invalid_field", "path"),
        ({"inputs": []}, 422, "invalid_shape", "inputs"),
        ({"inputs": [[0, 0, 0, 0]] * 9}, 422, "too_many_rows", "inputs"),
        ([1, 2], 400, "malformed_body", None),
    ])
    def test_bad_json_documents(self, document, status, code, field):
        with pytest.raises(RequestError) as caught:
            decode(document, media=JSON)

        assert (caught.value.status, caught.value.code, caught.value.field) == (status, code, field)

    @pytest.mark.parametrize("tensor, code, field", [
        ({"dtype": "float64", "shape": [1, 4], "data": b"\0" * 32}, "invalid_dtype", "inputs.dtype"),
        ({"dtype": "float32", "shape": [1, 4], "data": b"\0" * 15}, "invalid_shape", "inputs.data"),
        ({"dtype": "float32", "shape": "1x4", "data": b"\0" * 16}, "invalid_shape", "inputs.shape"),
        ({"dtype": "float32", "shape": [1, 4], "data": "text"}, "invalid_field", "inputs.data"),
        ({"dtype": "float32", "shape": [1, 4]}, "invalid_field", "inputs"),
    ])
    def test_bad_msgpack_tensors(self, tensor, code, field):
        with pytest.raises(RequestError) as caught:
            decode({"inputs": tensor})

        assert (caught.value.status, caught.value.code, caught.value.field) == (422, code, field)

    def test_nan_in_msgpack_tensor_names_the_row(self):
        array = np.zeros((3, 4), np.float32)
        array[2, 1] = np.nan

        with pytest.raises(RequestError, match=r"inputs\[2\] contains NaN") as caught:
            decode({"inputs": encode_tensor(array)})

        assert caught.value.field == "inputs[2]"

    def test_nan_in_msgpack_nested_lists_names_the_row(self):
        with pytest.raises(RequestError) as caught:
            decode({"inputs": [[1, 2, 3, 4], [1, 2, float("nan"), 4]]})

        assert (caught.value.status, caught.value.code, caught.value.field) == (422, "non_finite", "inputs[1]")

    def test_json_nan_token_is_malformed(self):
        with pytest.raises(RequestError) as caught:
            decode_predict_request(b'{"inputs": [[NaN, 1, 2, 3]]}', JSON, SHAPE, 8, LIMIT)

        assert caught.value.status == 400

    def test_overflowing_number_is_non_finite(self):
        with pytest.raises(RequestError) as caught:
            decode_predict_request(b'{"inputs": [[1e39, 1, 2, 3]]}', JSON, SHAPE, 8, LIMIT)

        assert caught.value.code == "non_finite"

    def test_body_over_limit_is_413(self):
        with pytest.raises(RequestError) as caught:
            decode_predict_request(b"x" * 2048, JSON, SHAPE, 8, 1024)

        assert caught.value.status == 413

    @pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", msgpack.packb({"inputs": 1}) + b"\x00"])
    def test_undecodable_msgpack_is_400(self, body):
        with pytest.raises(RequestError) as caught:
            decode_predict_request(body, MSGPACK, SHAPE, 8, LIMIT)

        assert caught.value.status == 400

    def test_msgpack_ext_type_is_rejected(self):
        body = msgpack.packb({"inputs": msgpack.ExtType(5, b"abc")})

        with pytest.raises(RequestError) as caught:
            decode_predict_request(body, MSGPACK, SHAPE, 8, LIMIT)

        assert caught.value.status == 400


class TestMediaTypes:
    def test_unsupported_content_type_is_415(self):
        with pytest.raises(RequestError) as caught:
            media_type_for("text/plain")

        assert caught.value.status == 415

    def test_content_type_parameters_ignored(self):
        assert media_type_for("application/json; charset=utf-8") == JSON
        assert media_type_for("application/x-msgpack") == MSGPACK

    def test_accept_overrides_response_encoding(self):
        assert negotiate_response_media(MSGPACK, "application/json") == JSON
        assert negotiate_response_media(JSON, None) == JSON
        assert negotiate_response_media(JSON, "*/*") == JSON


class TestEncodeBody:
    def test_json_outputs_are_lists(self):
        body = encode_body({"outputs": np.array([[0.5, 0.5]], np.float32)}, JSON)

        assert json.loads(body) == {"outputs": [[0.5, 0.5]]}

    def test_msgpack_outputs_are_tensor_maps(self):
        body = encode_body({"outputs": np.array([[0.25]], np.float32)}, MSGPACK)

        decoded = msgpack.unpackb(body, raw=False)
        assert decoded["outputs"]["shape"] == [1, 1]
        assert decoded["outputs"]["data"] == struct.pack("<f", 0.25)
