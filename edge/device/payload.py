"""Parse a ``/predict`` request body into model inputs, within fixed limits.

Every body a client can send ends here, in a worker thread (never on the event
loop), and leaves as one float32 tensor ``(N, *input_shape)`` ready for the
model, or as a ``BadRequest`` carrying the 4xx status to answer. The limits
bound what one request can cost: bytes, examples, multipart parts, decoded
pixels summed over the request (headers are read before any pixel is decoded),
JSON nesting, and parse time. Formats:

- ``application/json``: ``{"inputs": [...], "preprocessed": bool, "return_logits": bool}``;
  numbers only (no strings, booleans or nulls), every axis non-empty.
- ``application/x-npy``: one ``.npy`` array (no pickles): uint8 raw images, or
  float model inputs (image tasks); rows (tabular tasks).
- ``application/octet-stream``: raw little-endian float32 model inputs, C order;
  the batch size is the byte count over one example's.
- ``image/*``: one encoded image; ``multipart/form-data``: file parts, one image each.
"""

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.edge.device.inputs import array_inputs
from fedge.shared.errors import DataError
from fedge.shared.preprocess import prepare
from fedge.shared.tasks import ImagePreprocessing, TaskSpec

JSON_TYPES = ("application/json", "text/json")
NPY_TYPES = ("application/x-npy", "application/npy")
TENSOR_TYPE = "application/octet-stream"
MULTIPART_TYPE = "multipart/form-data"
MAX_JSON_DEPTH = 6  # (N, C, H, W) tensors nest 5 deep inside "inputs"
MAX_NUMBER_CHARS = 64  # longer numerals are refused before conversion
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


class BadRequest(Exception):
    """A request the server refuses, with the status code and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one ``/predict`` request may cost."""

    max_body_bytes: int = 8 << 20
    max_batch: int = 256
    max_image_pixels: int = 25_000_000  # one image (width x height)
    max_request_pixels: int = 1 << 24  # all images of a request together (4096 x 4096)
    max_parts: int = 300  # multipart parts of any kind
    parse_seconds: float = 5.0


@dataclass(frozen=True)
class Parsed:
    """Model inputs of one request and what the client asked to get back."""

    x: np.ndarray  # (N, *input_shape) float32
    return_logits: bool = False


def parses_inline(content_type: str) -> bool:
    """Whether a body of this type is cheap enough to parse on the event loop.

    A raw float32 tensor is one vectorised pass over at most ``max_batch`` examples
    (counted from its length first; about 2 ms for 8 MiB), less than the hop to a
    worker thread costs for the usual sizes. JSON, ``.npy`` headers, images and
    multipart bodies do per-item work whose time a client controls, so they are
    parsed in a thread.
    """
    return content_type.split(";")[0].strip().lower() == TENSOR_TYPE


def parse_body(body: bytes, content_type: str, task: TaskSpec, limits: Limits) -> Parsed:
    """Turn a request body into model inputs (blocking: call it in a worker thread).

    Parameters
    ----------
    body
        The request body, already bounded by ``limits.max_body_bytes``.
    content_type
        The request's ``Content-Type`` header, parameters included.
    task
        The served model's task (its preprocessing and input shape).
    limits
        The bounds to enforce.

    Raises
    ------
    BadRequest
        A 4xx status and a message for anything malformed, oversized or unsupported.
    """
    kind = content_type.split(";")[0].strip().lower()
    deadline = time.monotonic() + limits.parse_seconds
    image_task = isinstance(task.preprocessing, ImagePreprocessing)
    try:
        if kind in JSON_TYPES:
            parsed = _json_inputs(body, task, deadline)
        elif kind in NPY_TYPES:
            parsed = Parsed(array_inputs(_load_npy(body), task, None, "the .npy body"))
        elif kind == TENSOR_TYPE:
            parsed = Parsed(_raw_tensor(body, task, limits.max_batch))
        elif kind.startswith("image/") or kind == MULTIPART_TYPE:
            if not image_task:
                raise BadRequest(415, "this model takes tabular rows (JSON or .npy), not images")
            blobs = [body] if kind != MULTIPART_TYPE else _multipart_files(
                body, content_type, limits, deadline
            )  # fmt: skip
            if len(blobs) > limits.max_batch:
                raise BadRequest(413, f"{len(blobs)} images; the limit is {limits.max_batch}")
            parsed = Parsed(_decode_images(blobs, task.preprocessing, limits))  # type: ignore[arg-type]
        else:
            raise BadRequest(
                415,
                f"unsupported content type {kind!r}; send JSON, .npy "
                f"({NPY_TYPES[0]}), raw float32 ({TENSOR_TYPE}) or images",
            )
    except DataError as e:
        raise BadRequest(422, str(e)) from e
    if len(parsed.x) > limits.max_batch:
        raise BadRequest(
            413, f"{len(parsed.x)} examples in one request; the limit is {limits.max_batch}"
        )
    return parsed


# ---------------------------------------------------------------------------- JSON


def _number(text: str) -> float:
    # A Python function (not ``float`` itself) on purpose: the C JSON scanner holds the
    # GIL for a whole document, and calling bytecode per number lets the event loop's
    # thread run meanwhile. Long numerals are refused before int()/float() sees them
    # (int() refuses >4300 digits with a ValueError; float64 overflows at 309).
    if len(text) > MAX_NUMBER_CHARS:
        raise BadRequest(422, f"a number has {len(text)} characters; at most {MAX_NUMBER_CHARS}")
    return float(text)


def _constant(name: str) -> Any:
    raise BadRequest(400, f"JSON contains {name}; numbers must be finite")


def _json_inputs(body: bytes, task: TaskSpec, deadline: float) -> Parsed:
    try:
        payload = json.loads(body, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except RecursionError as e:
        raise BadRequest(400, "JSON is nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BadRequest(400, f"body is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(400, 'expected a JSON object {"inputs": [...]}')
    inputs = payload["inputs"]
    flags = {}
    for flag in ("preprocessed", "return_logits"):
        value = payload.get(flag, False)
        if not isinstance(value, bool):
            raise BadRequest(422, f'"{flag}" must be true or false')
        flags[flag] = value
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(422, '"inputs" must be a non-empty list of examples')
    pre = task.preprocessing
    if flags["preprocessed"]:
        x = _numbers(inputs, "inputs", deadline).astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise BadRequest(422, "inputs have values beyond float32's range")
        if x.shape[1:] != task.input_shape:
            shape = ", ".join(map(str, task.input_shape))
            raise BadRequest(422, f"inputs have shape {x.shape}; the model expects (N, {shape})")
        return Parsed(np.ascontiguousarray(x), flags["return_logits"])
    if isinstance(pre, ImagePreprocessing):
        images = []
        for i, item in enumerate(inputs):
            array = _numbers(item, f"inputs[{i}]", deadline)
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
                raise BadRequest(422, f"inputs[{i}] has shape {array.shape}; expected HxW or HxWxC")
            if array.min() < 0 or array.max() > 255 or not np.all(array == np.round(array)):
                raise BadRequest(422, f"inputs[{i}] must hold integer pixel values 0..255")
            images.append(array.astype(np.uint8))
        return Parsed(prepare(images, pre), flags["return_logits"])
    rows = [_row(item, pre.columns, i) for i, item in enumerate(inputs)]
    x = _numbers(rows, "inputs", deadline)
    if x.ndim != 2:
        raise BadRequest(422, f"inputs have shape {x.shape}; expected rows of {len(pre.columns)}")
    return Parsed(prepare(x, pre), flags["return_logits"])


def _row(item: Any, columns: tuple[str, ...], i: int) -> Any:
    """A tabular row given as a list, or as an object keyed by column name."""
    if not isinstance(item, dict):
        return item
    missing = [c for c in columns if c not in item]
    if missing:
        raise BadRequest(422, f"inputs[{i}] lacks columns {missing}")
    return [item[c] for c in columns]


def _numbers(value: Any, where: str, deadline: float, depth: int = 0) -> np.ndarray:
    """Nested lists of numbers -> a float64 array, refusing anything else.

    Checked element by element (strings and booleans would otherwise be cast
    silently: ``np.asarray(["255", True], float)`` succeeds), and converted one
    2-D block at a time, so that no single numpy call holds the GIL for long.
    """
    if type(value) is not list:
        raise BadRequest(422, f"{where} must be nested lists of numbers")
    if not value:
        raise BadRequest(422, f"{where} has an empty axis")
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(422, f"{where} is nested more than {MAX_JSON_DEPTH} lists deep")
    if time.monotonic() > deadline:
        raise BadRequest(413, "the request took too long to parse")
    first = value[0]
    if type(first) is list and first and type(first[0]) is list:  # 3-D or more: recurse
        parts = [_numbers(v, where, deadline, depth + 1) for v in value]
        shape = parts[0].shape
        if any(p.shape != shape for p in parts):
            raise BadRequest(422, f"{where} is not a regular array (rows differ in shape)")
        return np.stack(parts)
    rows = value if type(first) is list else [value]
    for row in rows:
        if type(row) is not list:
            raise BadRequest(422, f"{where} mixes numbers and lists at one level")
        if not row:
            raise BadRequest(422, f"{where} has an empty axis")
        if depth + (row is not value) > MAX_JSON_DEPTH:
            raise BadRequest(422, f"{where} is nested more than {MAX_JSON_DEPTH} lists deep")
        if any(type(v) is not float for v in row):  # every JSON number was parsed to float
            raise BadRequest(422, f"{where} must hold numbers only (no strings, booleans or null)")
    try:
        array = np.array(value, dtype=np.float64)
    except ValueError as e:  # rows of different lengths
        raise BadRequest(422, f"{where} is not a regular array (rows differ in length)") from e
    if not np.all(np.isfinite(array)):
        raise BadRequest(422, f"{where} contains non-finite numbers")
    return array


# ---------------------------------------------------------------------------- binary


def _load_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` body as an array view, its header checked against its length first.

    ``np.load`` would allocate what the header claims before reading the data, so
    a 100-byte body claiming 10**10 elements could ask for 80 GB.
    """
    import tokenize

    from numpy.lib import format as npy

    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(stream, max_header_size=10_000)
    except (OSError, ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as e:
        # numpy parses the header with Python's tokenizer: a garbled one raises TokenError.
        raise BadRequest(400, f"the body is not a readable .npy array: {e}") from e
    if dtype.hasobject:
        raise BadRequest(400, "the .npy body holds Python objects (pickles are refused)")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(body) - stream.tell():
        raise BadRequest(
            400, f"the .npy header claims shape {shape} {dtype}, which the body does not hold"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def _raw_tensor(body: bytes, task: TaskSpec, max_batch: int) -> np.ndarray:
    shape = task.input_shape
    example = int(np.prod(shape)) * 4
    if not body or example <= 0 or len(body) % example:
        raise BadRequest(
            422,
            f"{len(body)} bytes is not a whole number of float32 examples shaped "
            f"({', '.join(map(str, shape))}) ({example} bytes each)",
        )
    # Counted before any pass over the bytes: this runs on the event loop (``parses_inline``),
    # so its work is bounded by max_batch examples whatever body limit the operator set.
    if len(body) // example > max_batch:
        raise BadRequest(
            413, f"{len(body) // example} examples in one request; the limit is {max_batch}"
        )
    x = np.frombuffer(body, dtype="<f4").reshape(-1, *shape)
    if not np.all(np.isfinite(x)):
        raise BadRequest(422, "inputs contain non-finite numbers")
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------- images


def _multipart_files(body: bytes, content_type: str, limits: Limits, deadline: float
                     ) -> list[bytes]:  # fmt: skip
    """File parts of a multipart/form-data body, with python-multipart's streaming parser.

    Any part counts against ``limits.max_parts`` and the parse time is bounded:
    a body of many tiny parts is refused early instead of being parsed whole.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest(400, "multipart body without a boundary")
    files: list[bytes] = []
    state: dict[str, Any] = {"parts": 0, "field": b"", "value": b"", "headers": {}}
    current: list[bytes] = []

    def check() -> None:
        if time.monotonic() > deadline:
            raise BadRequest(413, "the multipart body took too long to parse")

    def part_begin() -> None:
        state["parts"] += 1
        if state["parts"] > limits.max_parts:
            raise BadRequest(413, f"more than {limits.max_parts} multipart parts")
        check()
        state["headers"] = {}
        current.clear()

    def header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def part_data(data: bytes, start: int, end: int) -> None:
        current.append(data[start:end])

    def part_end() -> None:
        headers = state["headers"]
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        media = headers.get(b"content-type", b"").lower()
        if b"filename" in options or media.startswith(b"image/"):
            files.append(b"".join(current))
        current.clear()
        check()

    callbacks: Any = {
        "on_part_begin": part_begin,
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_part_end": part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(400, f"malformed multipart body: {e}") from e
    if not files:
        raise BadRequest(400, "multipart body has no file part (send each image as a file)")
    return files


def _open_image(data: bytes, index: int, limits: Limits) -> Any:
    """Open an image lazily (header only) and check its size before any decoding."""
    from PIL import Image

    try:
        # Only plain raster formats: Pillow's EPS plugin, for one, runs Ghostscript.
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own bound, far above ours
        raise BadRequest(413, f"image {index} has too many pixels ({e})") from e
    except Exception as e:  # Pillow's plugins raise many types on malformed files
        raise BadRequest(400, f"image {index} is not a readable image ({e})") from e
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise BadRequest(400, f"image {index} is {width}x{height}: empty")
    if width * height > limits.max_image_pixels:
        image.close()
        raise BadRequest(
            413, f"image {index} is {width}x{height}; at most {limits.max_image_pixels} pixels"
        )
    return image


def _decode_images(blobs: list[bytes], spec: ImagePreprocessing, limits: Limits) -> np.ndarray:
    """Check every header against the per-request pixel budget, then decode one at a time.

    Each image is preprocessed (resized to the model's size) right after it is
    decoded, so at most one full-size image is in memory at once.
    """
    images = []
    total = 0
    try:
        for i, blob in enumerate(blobs):
            image = _open_image(blob, i, limits)
            images.append(image)
            total += image.size[0] * image.size[1]
            if total > limits.max_request_pixels:
                raise BadRequest(
                    413,
                    f"the images of this request hold over {limits.max_request_pixels} "
                    "pixels together; send fewer or smaller images",
                )
        mode = "L" if spec.channels == 1 else "RGB"
        return np.concatenate([_decode(image, i, mode, spec) for i, image in enumerate(images)])
    finally:
        for image in images:
            image.close()


def _decode(image: Any, index: int, mode: str, spec: ImagePreprocessing) -> np.ndarray:
    try:
        pixels = np.asarray(image.convert(mode), dtype=np.uint8)
        return prepare([pixels], spec)
    except Exception as e:  # truncated or corrupt data shows only when decoding
        raise BadRequest(400, f"image {index} is not a readable image ({e})") from e
